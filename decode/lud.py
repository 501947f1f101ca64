"""LUD — Lexical Unit Decoding (arXiv:2405.15208; decode_methods.md §A8): several tokens per forward from ONE model
fine-tuned on lexical units (:mod:`jaxtok.train.objectives.lud`), no drafter, no verification.

The paper released no code; the rule below is the INFERRED one of §A8. Every row keeps its committed sequence in a
fixed buffer ``seq [B, S]`` (left-padded prompt ``P``, then up to ``N + k`` emitted tokens), ``n [B]`` committed
length and ``pend [B]`` the newest committed tokens whose KV is not in the cache yet (the last step's output: its KV
was computed from placeholder inputs, so it is recomputed). One step = ONE causal forward:

1. input ``[x_{n-pend} .. x_{n-1}, <ph> × (k-1)]`` (width ``2k-1`` static: rows with ``pend < k`` pad the tail with
   invalid slots) at per-row cache offsets ``n - pend``; the prefill is the same with the whole prompt;
2. the k outputs at ``pend-1 .. pend+k-2`` give ``ŷ_1 .. ŷ_k`` (``ŷ_1`` is the ordinary AR token: its context is
   all real) with confidences ``c_j = S(logits_j)[ŷ_j]`` (greedy rows: the untempered softmax of the argmax);
3. accept the longest prefix with ``c_j ≥ α`` (``ŷ_1`` always: at least one token per forward); the optional
   repetition guard (``repeat_ngram`` g > 0) also stops before a parallel token ``ŷ_j`` (j ≥ 2) whose g-gram equals
   the g-gram right before it (``abab``, ``aa``), the degenerate repeats parallel heads are prone to;
4. cut after the first stop token and at ``max_new_tokens`` (:func:`jaxtok.decode.rows.kept_tokens`), write the
   tokens at ``seq[n:]``, roll the cache back to ``n`` (``KVCache.rollback``: the pending tokens' KV, now computed
   from real inputs, is kept; the placeholders' is dropped) and set ``pend`` = the tokens just emitted.

Limits: ``k = 1`` or ``α > 1`` accept one token per forward (the AR token: equal to greedy AR token for token); ``α =
0`` accepts k per forward. The forward is ``2k-1`` wide (vs 1 for AR), so fewer forwards is a speed-up only where a
forward is latency-bound.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok import sampling as sampling_lib
from jaxtok.models import KVCache
from jaxtok.sampling import RowParams, SamplingParams

from .generate import DEFAULT_EOS_ID, DEFAULT_PAD_ID, _validate, check_positions
from .rows import ALL_GREEDY, kept_tokens, rows_slice, rows_write, sample_rows, token_prob

_TRACES = [0]


def num_traces() -> int:
    """How many times :func:`lud_generate`'s jitted body has been traced."""
    return _TRACES[0]


@dataclasses.dataclass(frozen=True)
class LUDArgs:
    """LUD decoding (``decode.method: lud``, ``decode.policy_args``): ``k`` tokens predicted per forward (the
    newest committed token + k-1 placeholders), ``threshold`` α on each parallel token's confidence (α > 1: AR),
    ``repeat_ngram`` g of the repetition guard (0: off), ``placeholder_id`` (None: the tokenizer's mask token,
    ``<mask>`` = 3 for the task tokenizer; must be the id the model was fine-tuned with)."""

    k: int = 4
    threshold: float = 0.9
    repeat_ngram: int = 0
    placeholder_id: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={self.k!r}: allowed an integer >= 1")
        if not self.threshold >= 0.0:
            raise ValueError(f"threshold={self.threshold!r}: allowed a number >= 0 (> 1: one token per forward)")
        if self.repeat_ngram < 0:
            raise ValueError(f"repeat_ngram={self.repeat_ngram!r}: allowed an integer >= 0 (0: off)")
        if self.placeholder_id is not None and self.placeholder_id < 0:
            raise ValueError(f"placeholder_id={self.placeholder_id!r}: allowed a token id >= 0 or null")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LUDResult:
    """Output of :func:`lud_generate`: ``tokens / valid [B, N]`` (stop token included, ``pad_id`` after), ``lengths
    / done [B]``, ``forwards []`` batched forwards (prefill included), ``row_forwards [B]`` the forwards each row
    took part in, ``accept_hist [B, k]`` steps whose rule accepted ``j + 1`` tokens (before the stop / length cut)."""

    tokens: jax.Array
    valid: jax.Array
    lengths: jax.Array
    done: jax.Array
    forwards: jax.Array
    row_forwards: jax.Array
    accept_hist: jax.Array

    @property
    def tokens_per_forward(self) -> float:
        """Emitted tokens per forward per row: ``sum(lengths) / sum(row_forwards)``."""
        return float(np.sum(self.lengths) / max(np.sum(self.row_forwards), 1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LUDState:
    """Loop carry: ``step []``; ``seq / seq_valid [B, S]``; ``count [B]`` emitted tokens; ``pend [B]`` newest
    committed tokens not in the cache; ``done [B]`` stop emitted; ``finished [B]`` done or at ``max_new_tokens``;
    ``cache`` (exact below ``P + count - pend``); the counters of :class:`LUDResult`."""

    step: jax.Array
    seq: jax.Array
    seq_valid: jax.Array
    count: jax.Array
    pend: jax.Array
    done: jax.Array
    finished: jax.Array
    cache: KVCache
    forwards: jax.Array
    row_forwards: jax.Array
    accept_hist: jax.Array


def accept_count(conf: jax.Array, threshold: float) -> jax.Array:
    """LUD's adaptive span: ``1 +`` the number of leading parallel tokens ``j ≥ 2`` with ``c_j ≥ α``.
    ``conf [B, k]`` -> ``[B]`` int32 in ``[1, k]``."""
    return 1 + sampling_lib.count_leading_true(conf[:, 1:] >= threshold)


def repeats(hist: jax.Array, hist_valid: jax.Array, pred: jax.Array, g: int) -> jax.Array:
    """Repetition guard: ``rep [B, k]``, True at ``ŷ_j`` when the g-gram ending at it equals the g-gram right
    before it over ``[hist, ŷ]`` (``hist [B, 2g]`` the newest committed tokens, ``hist_valid`` their mask).
    ``rep[:, 0]`` is False (the AR token is never refused)."""
    b, k = pred.shape
    full = jnp.concatenate([hist, pred], axis=1)  # [B, 2g + k]
    ok = jnp.concatenate([hist_valid, jnp.ones_like(pred, bool)], axis=1)
    out = [jnp.zeros((b,), bool)]
    for j in range(1, k):
        e = 2 * g + j  # index of ŷ_{j+1} in full
        same = jnp.ones((b,), bool)
        for i in range(g):
            same = same & (full[:, e - i] == full[:, e - g - i]) & ok[:, e - i] & ok[:, e - g - i]
        out.append(same)
    return jnp.stack(out, axis=1)


def _forward(model, cache: KVCache, x, x_valid, at):
    """One causal forward on ``x [B, W]`` at the cache's offsets; logits at ``at [B, k]`` -> ``(logits, cache)``."""
    out = model(x, valid=x_valid, cache=cache, logits_at=at)
    return out.logits, out.cache


def step_inputs(seq, n, pend, live, k: int, placeholder_id: int, pad_id: int):
    """Step 1's input: ``(x [B, 2k-1], valid [B, 2k-1], at [B, k])`` = the ``pend`` pending committed tokens
    ``seq[n-pend : n]``, then k-1 placeholders, then invalid padding; ``at`` the k output columns."""
    w = 2 * k - 1
    j = jnp.arange(w, dtype=jnp.int32)[None, :]
    chunk = rows_slice(seq, n - pend, w)  # [B, W]
    p = pend[:, None]
    x = jnp.where(j < p, chunk, jnp.where(j < p + k - 1, placeholder_id, pad_id)).astype(jnp.int32)
    valid = (j < p + k - 1) & live[:, None]
    return x, valid, p - 1 + jnp.arange(k, dtype=jnp.int32)[None, :]


def lud_init(model, prompt, prompt_valid, key, params: RowParams, *, max_new_tokens: int, k: int,
             threshold: float, repeat_ngram: int, placeholder_id: int, stop_tokens: tuple, pad_id: int) -> LUDState:
    """Prefill: ONE forward on ``[prompt, <ph> × (k-1)]`` and the first accepted span (steps 2-4)."""
    b, p = prompt.shape
    s = p + max_new_tokens + 2 * k
    seq = jnp.full((b, s), pad_id, jnp.int32).at[:, :p].set(prompt)
    seq_valid = jnp.zeros((b, s), bool).at[:, :p].set(prompt_valid)
    x = jnp.concatenate([prompt, jnp.full((b, k - 1), placeholder_id, jnp.int32)], axis=1)
    xv = jnp.concatenate([prompt_valid, jnp.ones((b, k - 1), bool)], axis=1)
    at = jnp.broadcast_to(p - 1 + jnp.arange(k, dtype=jnp.int32)[None, :], (b, k))
    logits, cache = _forward(model, KVCache.init(model.cfg, b, s), x, xv, at)
    st = LUDState(step=jnp.int32(0), seq=seq, seq_valid=seq_valid, count=jnp.zeros((b,), jnp.int32),
                  pend=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), finished=jnp.zeros((b,), bool),
                  cache=cache.rollback(jnp.full((b,), p, jnp.int32)), forwards=jnp.int32(1),
                  row_forwards=jnp.ones((b,), jnp.int32), accept_hist=jnp.zeros((b, k), jnp.int32))
    return _commit(st, logits, key, params, jnp.ones((b,), bool), max_new_tokens=max_new_tokens,
                   threshold=threshold, repeat_ngram=repeat_ngram, stop_tokens=stop_tokens, pad_id=pad_id)


def _commit(st: LUDState, logits, key, params: RowParams, live, *, max_new_tokens, threshold, repeat_ngram,
            stop_tokens, pad_id) -> LUDState:
    """Steps 2-4 on the forward's ``logits [B, k, V]`` (the cache already rolled back to ``n``)."""
    b, k = logits.shape[:2]
    p = st.seq.shape[1] - max_new_tokens - 2 * k
    n = p + st.count
    pred = sample_rows(key, logits, params)  # [B, k]
    conf = token_prob(logits, pred, params)  # [B, k]
    m = accept_count(conf, threshold)
    if repeat_ngram > 0 and k > 1:
        g = repeat_ngram
        ext = jnp.pad(st.seq, ((0, 0), (2 * g, 0)), constant_values=pad_id)
        ext_v = jnp.pad(st.seq_valid, ((0, 0), (2 * g, 0)))
        rep = repeats(rows_slice(ext, n, 2 * g), rows_slice(ext_v, n, 2 * g), pred, g)  # ext col n+2g-1 = n-1
        m = jnp.minimum(m, 1 + sampling_lib.count_leading_true(~rep[:, 1:]))
    stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    n_emit, hit = kept_tokens(pred, m - 1, st.count, live, stop, max_new_tokens)
    keep = jnp.arange(k)[None, :] < n_emit[:, None]
    count = st.count + n_emit
    done = st.done | (live & hit)
    return dataclasses.replace(
        st, step=st.step + 1, seq=rows_write(st.seq, jnp.where(keep, pred, pad_id), n),
        seq_valid=rows_write(st.seq_valid, keep, n), count=count, pend=jnp.where(live, n_emit, st.pend),
        done=done, finished=done | (count >= max_new_tokens),
        accept_hist=st.accept_hist + jax.nn.one_hot(m - 1, k, dtype=jnp.int32) * live[:, None])


def lud_round(model, st: LUDState, key, params: RowParams, *, max_new_tokens: int, k: int, threshold: float,
              repeat_ngram: int, placeholder_id: int, stop_tokens: tuple, pad_id: int) -> LUDState:
    """One LUD step (module docstring 1-4): recompute the pending tokens' KV, predict k tokens, accept a span."""
    live = ~st.finished
    p = st.seq.shape[1] - max_new_tokens - 2 * k
    n = p + st.count
    x, xv, at = step_inputs(st.seq, n, st.pend, live, k, placeholder_id, pad_id)
    before = st.cache.lengths
    logits, cache = _forward(model, st.cache, x, xv, at)
    cache = cache.rollback(jnp.where(live, n, before))  # keep the recomputed pending KV, drop the placeholders'
    st = dataclasses.replace(st, cache=cache, forwards=st.forwards + 1, row_forwards=st.row_forwards + live)
    return _commit(st, logits, key, params, live, max_new_tokens=max_new_tokens, threshold=threshold,
                   repeat_ngram=repeat_ngram, stop_tokens=stop_tokens, pad_id=pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "k", "threshold", "repeat_ngram",
                                             "placeholder_id", "stop_tokens", "pad_id", "greedy"))
def _lud_jit(graphdef, state, prompt, prompt_valid, rng, params, *, max_new_tokens, k, threshold, repeat_ngram,
             placeholder_id, stop_tokens, pad_id, greedy):
    _TRACES[0] += 1
    flag = ALL_GREEDY.set(bool(greedy))
    try:
        kw = dict(max_new_tokens=max_new_tokens, k=k, threshold=threshold, repeat_ngram=repeat_ngram,
                  placeholder_id=placeholder_id, stop_tokens=stop_tokens, pad_id=pad_id)
        st = lud_init(nnx.merge(graphdef, state), prompt, prompt_valid, jax.random.fold_in(rng, 0), params, **kw)

        def body(st):
            return lud_round(nnx.merge(graphdef, state), st, jax.random.fold_in(rng, st.step), params, **kw)

        st = jax.lax.while_loop(lambda st: ~jnp.all(st.finished), body, st)
    finally:
        ALL_GREEDY.reset(flag)
    p = prompt.shape[1]
    out_valid = jnp.arange(max_new_tokens)[None, :] < st.count[:, None]
    return LUDResult(tokens=jnp.where(out_valid, st.seq[:, p:p + max_new_tokens], pad_id), valid=out_valid,
                     lengths=st.count, done=st.done, forwards=st.forwards, row_forwards=st.row_forwards,
                     accept_hist=st.accept_hist)


def lud_generate(model: nnx.Module, prompt, prompt_valid, *, max_new_tokens: int, args: LUDArgs = LUDArgs(),
                 sampling: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (DEFAULT_EOS_ID,),
                 rng: jax.Array, pad_id: int = DEFAULT_PAD_ID, placeholder_id: Optional[int] = None) -> LUDResult:
    """LUD decoding of a left-padded prompt batch in one jitted call (module docstring).

    Args:
      model: a ``jaxtok.models.Decoder`` fine-tuned with objective ``lud`` (any AR decoder runs; an untuned one
        simply gives unconfident placeholder predictions, so few parallel tokens pass α).
      prompt / prompt_valid: ``[B, P]`` LEFT-padded ids and mask.
      max_new_tokens: N. args: :class:`LUDArgs` (k, α, repetition guard, placeholder id).
      sampling: S (temperature 0 = greedy); ``ŷ_j ~ S(logits_j)`` and ``c_j = S(logits_j)[ŷ_j]``.
      stop_tokens / rng / pad_id: as :func:`jaxtok.decode.generate.generate` (step t uses ``fold_in(rng, t)``).
      placeholder_id: overrides ``args.placeholder_id`` (the caller resolves None to the tokenizer's mask token).
    """
    if not isinstance(args, LUDArgs):
        raise ValueError(f"args={args!r}: allowed a LUDArgs")
    ph = args.placeholder_id if placeholder_id is None else placeholder_id
    if ph is None:
        raise ValueError("placeholder_id: none given (LUDArgs.placeholder_id or the tokenizer's mask token)")
    prompt = prompt if isinstance(prompt, jax.Array) else np.asarray(prompt)
    prompt_valid = prompt_valid if isinstance(prompt_valid, jax.Array) else np.asarray(prompt_valid)
    stop_tokens = tuple(int(t) for t in stop_tokens)
    _validate(model, prompt, prompt_valid, max_new_tokens, sampling, stop_tokens, pad_id, 0, None)
    if not 0 <= int(ph) < model.cfg.vocab_size:
        raise ValueError(f"placeholder_id={ph}: outside the vocabulary [0, {model.cfg.vocab_size})")
    b, p = prompt.shape
    check_positions(model.cfg, p, int(max_new_tokens) + args.k - 1)
    params = sampling.per_row(b)
    prompt_valid = jnp.asarray(prompt_valid, bool)
    prompt = jnp.where(prompt_valid, jnp.asarray(prompt, jnp.int32), pad_id)
    graphdef, state = nnx.split(model)
    return _lud_jit(graphdef, state, prompt, prompt_valid, rng, params, max_new_tokens=int(max_new_tokens),
                    k=int(args.k), threshold=float(args.threshold), repeat_ngram=int(args.repeat_ngram),
                    placeholder_id=int(ph), stop_tokens=stop_tokens, pad_id=int(pad_id),
                    greedy=sampling.all_greedy)
