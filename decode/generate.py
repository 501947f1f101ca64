"""Jitted autoregressive generation: prefill a left-padded prompt into a KV cache, then one ``lax.while_loop``
that appends one token per row per step until every row has emitted a stop token or ``max_new_tokens`` is reached
(decode_methods.md §0.1; DESIGN.md principle 3).

The whole call is one ``jax.jit`` of a module-level function whose static arguments are the model's ``GraphDef``,
the shapes and the switches (which filters are on, what to return); sampling values (a
:class:`~jaxtok.sampling.SamplingParams`: temperature, top-k, top-p, min-p) are traced, so a second call with equal
shapes and switches reuses the compiled program. Finished rows are frozen with ``where``: they emit ``pad_id``,
log-prob 0 and are invalid; their forward input is masked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxtok import sampling
from jaxtok.mesh import axis_rules, batch_sharding, constrain, param_shardings, place
from jaxtok.models import KVCache, check_token_ids
from jaxtok.sampling import SamplingParams, host_value

DEFAULT_EOS_ID = 2  # "<eos>" of the jaxtok task tokenizer (<pad>=0, <bos>=1, <eos>=2, <mask>=3)
DEFAULT_PAD_ID = 0

_TRACES = [0]  # incremented each time the jitted body is traced (tests check that a second call does not retrace)


def num_traces() -> int:
    """How many times :func:`generate`'s jitted body has been traced in this process."""
    return _TRACES[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """Output of :func:`generate`.

    Attributes:
      tokens: ``[B, N]`` int32 generated ids (the stop token included), ``pad_id`` after a row is done.
      logprobs: ``[B, N]`` float32 log-probability of each token under the sampling distribution (temperature and
        filters applied; greedy rows at temperature 1); 0 where invalid. None with ``return_logprobs=False``.
      valid: ``[B, N]`` bool, True for generated tokens.
      done: ``[B]`` bool, True when the row emitted a stop token (False: it ran into ``max_new_tokens``).
      lengths: ``[B]`` int32 number of valid tokens per row.
      num_forwards: ``[]`` int32 model forwards (the prefill counts as one).
      entropy: ``[B, N]`` float32 entropy of the sampling distribution, 0 where invalid (``return_entropy``).
      topk_probs, topk_ids: ``[B, N, K]`` the K most likely tokens of the sampling distribution and their
        probabilities, 0 where invalid (``return_topk=K``, e.g. for CPPO).
    """

    tokens: jax.Array
    logprobs: Optional[jax.Array]
    valid: jax.Array
    done: jax.Array
    lengths: jax.Array
    num_forwards: jax.Array
    entropy: Optional[jax.Array] = None
    topk_probs: Optional[jax.Array] = None
    topk_ids: Optional[jax.Array] = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    """Loop carry: ``step`` = index of the next token to write; ``last [B]`` = the newest token (not yet in the
    cache); the output buffers of :class:`GenerateResult`."""

    step: jax.Array
    last: jax.Array
    done: jax.Array
    cache: KVCache
    num_forwards: jax.Array
    tokens: jax.Array
    logprobs: Optional[jax.Array]
    valid: jax.Array
    entropy: Optional[jax.Array]
    topk_probs: Optional[jax.Array]
    topk_ids: Optional[jax.Array]


# ----------------------------------------------------------------------------------------------------------------
# Jitted core
# ----------------------------------------------------------------------------------------------------------------


def _constrain_cache(cache: KVCache) -> KVCache:
    return KVCache(
        k=constrain(cache.k, ("layers", "batch", "kv_length", "kv_heads", "head_dim")),
        v=constrain(cache.v, ("layers", "batch", "kv_length", "kv_heads", "head_dim")),
        positions=constrain(cache.positions, ("batch", "kv_length")),
        lengths=constrain(cache.lengths, ("batch",)),
    )


def _vocab_block(v: int) -> int:
    """A block length dividing the vocabulary for the two-level reductions (1: none fits, reduce flat)."""
    for c in (128, 256, 64, 512, 32, 1024, 16):
        if v % c == 0:
            return c
    return 1


def _argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x [B, V], axis=-1)`` (the first index of the max, the first NaN if any) in two levels: the max
    of each block of ``c`` entries, the argmax over the ``V / c`` block maxima, then the argmax inside the chosen
    block. XLA:CPU runs ``jnp.argmax``'s (value, index) reduction over a long row unvectorised: on ``[16, 151936]``
    logits 16.6 ms, in two levels 2.6 ms (``[64, 151936]``: 71 vs 8 ms; docs/performance.md)."""
    b, v = x.shape
    c = _vocab_block(v)
    if c == 1:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    xb = x.reshape(b, v // c, c)
    blk = jnp.argmax(jnp.max(xb, axis=-1), axis=-1).astype(jnp.int32)  # [B]; NaN propagates into its block's max
    row = jnp.take_along_axis(xb, blk[:, None, None], axis=1)[:, 0]  # [B, c]
    return blk * c + jnp.argmax(row, axis=-1).astype(jnp.int32)


def _logsumexp_from(x: jax.Array, top: jax.Array) -> jax.Array:
    """``log(sum(exp(x - top)))`` over the last axis of ``x [B, V]`` (``top [B, 1]``), summed in blocks as
    :func:`_argmax` reduces (a long-row reduction is several times slower on XLA:CPU)."""
    b, v = x.shape
    c = _vocab_block(v)
    e = jnp.exp(x - top)
    if c == 1:
        return jnp.log(jnp.sum(e, axis=-1))
    return jnp.log(jnp.sum(jnp.sum(e.reshape(b, v // c, c), axis=-1), axis=-1))


def _greedy_sample(logits: jax.Array, params: sampling.RowParams, full: bool,
                   want_logprobs: bool = True) -> sampling.Sample:
    """:func:`jaxtok.sampling.sample` for an all-greedy batch (every temperature <= 0, known on the host), without
    its Gumbel noise: the ``[B, V]`` uniform draw (threefry) was the largest per-step cost outside the forward
    (docs/performance.md). Same tokens (the argmax of the raw logits) and the same log-probs (those of the
    untempered distribution with the filters applied). With no filter and no full distribution asked for
    (``full``: entropy or top-K), the argmax token's log-prob is ``-log(sum(exp(logits - m)))`` with ``m`` the
    logit at the argmax (= the max), the value ``jax.nn.log_softmax`` gives there (its ``shifted[tok]`` is exactly
    0): two passes over ``[B, V]`` (argmax, sum of exp) and no second ``[B, V]`` array."""
    logits = logits.astype(jnp.float32)
    tokens = _argmax(logits)
    if full or params.filtered:
        log_probs = jax.nn.log_softmax(params.process(logits, temperature=1.0), axis=-1)
        return sampling.Sample(tokens, sampling.token_log_probs(log_probs, tokens), log_probs)
    if not want_logprobs:
        return sampling.Sample(tokens, None, None)
    top = sampling.token_log_probs(logits, tokens)[:, None]  # [B, 1], the max (a gather, not another pass)
    return sampling.Sample(tokens, -_logsumexp_from(logits, top), None)


def _record(state: _State, logits: jax.Array, key: jax.Array, params: sampling.RowParams, stop: jax.Array,
            pad_id: int, greedy: bool = False) -> _State:
    """Sample token ``state.step`` of every live row from ``logits [B, V]`` and write it into the buffers
    (``greedy``: every row is greedy, known at trace time; see :func:`_greedy_sample`)."""
    if greedy:
        s = _greedy_sample(logits, params, full=state.entropy is not None or state.topk_probs is not None,
                           want_logprobs=state.logprobs is not None)
    else:
        s = params.sample(key, logits)
    live = ~state.done  # [B]
    tok = jnp.where(live, s.tokens, pad_id)
    col = state.step

    def put(buf, value, fill):
        if buf is None:
            return None
        mask = live.reshape(live.shape + (1,) * (value.ndim - 1))
        return buf.at[:, col].set(jnp.where(mask, value, fill).astype(buf.dtype))

    topk_probs = topk_ids = None
    if state.topk_probs is not None:
        topk_probs, topk_ids = jax.lax.top_k(jnp.exp(s.log_probs), state.topk_probs.shape[-1])  # [B, K]
    return dataclasses.replace(
        state,
        step=col + 1,
        last=tok,
        done=state.done | (live & jnp.any(tok[:, None] == stop[None, :], axis=-1)),
        tokens=put(state.tokens, tok, pad_id),
        logprobs=put(state.logprobs, s.logprobs, 0.0),
        valid=put(state.valid, live, False),
        entropy=put(state.entropy, None if state.entropy is None else sampling.entropy_from_log_probs(s.log_probs),
                    0.0),
        topk_probs=put(state.topk_probs, topk_probs, 0.0),
        topk_ids=put(state.topk_ids, topk_ids, pad_id),
    )


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "stop_tokens", "pad_id", "return_entropy", "return_topk", "mesh",
                     "guide_spec", "greedy", "return_logprobs"),
)
def _generate_jit(graphdef, model_state, prompt, prompt_valid, rng, params, guide_arrays, *, max_new_tokens,
                  stop_tokens, pad_id, return_entropy, return_topk, mesh, guide_spec, greedy=False,
                  return_logprobs=True):
    _TRACES[0] += 1
    rules = axis_rules(mesh) if mesh is not None else contextlib.nullcontext()
    with rules:
        return _generate_core(graphdef, model_state, prompt, prompt_valid, rng, params, max_new_tokens, stop_tokens,
                              pad_id, return_entropy, return_topk, guide_spec, guide_arrays, greedy,
                              return_logprobs, mesh_free=mesh is None)


def _tied_decoder_head(model) -> bool:
    """The model's logits are ``final-normed hidden · embed_vd.T`` (a jaxtok Decoder with tied embeddings whose
    ``logits`` method is not overridden), so :func:`_matvec_logits` computes the same product."""
    from jaxtok.models.transformer import Decoder

    cfg = model.cfg
    return (isinstance(model, Decoder) and type(model).logits is Decoder.logits and cfg.tie_embeddings
            and not cfg.shift_logits)


def _matvec_logits(model, hidden: jax.Array) -> jax.Array:
    """Batch-1 logits ``[1, V]`` of a tied-embedding Decoder as the matrix-vector product ``embed_vd · h``.

    Inside the decode loop XLA:CPU fuses the final RMSNorm and the ``[V, D]`` embedding's transpose into the
    ``[1, D] x [D, V]`` product and runs it as one loop fusion, 35 ms per step on a 151,936 x 256 vocabulary (under
    load); as ``embed_vd · h`` behind an optimization barrier it is a plain row-major matvec, 1.5-1.7x faster
    (docs/performance.md). Same dtypes as ``Decoder.logits``; the sums run in another order (logits differ in the
    last bits)."""
    dt = jnp.dtype(model.cfg.dtype)
    h = jax.lax.optimization_barrier(hidden[0].astype(dt))  # [D]
    w = model.embed_vd[...].astype(dt)  # [V, D]
    return jnp.dot(w, h, preferred_element_type=jnp.float32).astype(jnp.float32)[None]


def _generate_core(graphdef, model_state, prompt, prompt_valid, rng, params, n, stop_tokens, pad_id,
                   return_entropy, return_topk, guide_spec=None, guide_arrays=None, greedy=False,
                   return_logprobs=True, mesh_free=True) -> GenerateResult:
    model = nnx.merge(graphdef, model_state)
    cfg = model.cfg
    b, p = prompt.shape
    stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)  # -1 never matches

    # prefill: every row's last prompt token sits at column P-1 (left padding)
    cache = _constrain_cache(KVCache.init(cfg, b, p + n))
    out = model(prompt, valid=prompt_valid, cache=cache, logits_at=jnp.full((b, 1), p - 1, jnp.int32))

    def zeros(shape, dtype, on):
        return jnp.zeros((b, n) + shape, dtype) if on else None

    state = _State(
        step=jnp.zeros((), jnp.int32),
        last=jnp.full((b,), pad_id, jnp.int32),
        done=jnp.zeros((b,), bool),
        cache=out.cache,
        num_forwards=jnp.ones((), jnp.int32),
        tokens=jnp.full((b, n), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, n), jnp.float32) if return_logprobs else None,
        valid=jnp.zeros((b, n), bool),
        entropy=zeros((), jnp.float32, return_entropy),
        topk_probs=zeros((return_topk,), jnp.float32, return_topk > 0),
        topk_ids=zeros((return_topk,), jnp.int32, return_topk > 0),
    )

    def record(s: _State, g, logits):
        """Sample token ``s.step`` from ``logits [B, V]``, through the guide when there is one."""
        if guide_spec is not None:
            logits, g = guide_spec.adjust(guide_arrays, g, logits, s.step, s.done)
        s = _record(s, logits, None if greedy else jax.random.fold_in(rng, s.step), params, stop, pad_id, greedy)
        return s, (guide_spec.advance(g, s.last) if guide_spec is not None else g)

    g0 = guide_spec.init(guide_arrays, prompt, prompt_valid, n) if guide_spec is not None else None
    state, g0 = record(state, g0, out.logits[:, 0])

    def cond(carry):
        s, _ = carry
        return (s.step < n) & ~jnp.all(s.done)

    matvec_head = b == 1 and mesh_free and _tied_decoder_head(model)

    def body(carry):
        s, g = carry
        step_model = nnx.merge(graphdef, model_state)
        if matvec_head:
            o = step_model(s.last[:, None], valid=~s.done[:, None], cache=s.cache, return_logits=False,
                           return_hidden=True)
            logits = _matvec_logits(step_model, o.hidden[:, 0])
        else:
            o = step_model(s.last[:, None], valid=~s.done[:, None], cache=s.cache)
            logits = o.logits[:, 0]
        s = dataclasses.replace(s, cache=_constrain_cache(o.cache), num_forwards=s.num_forwards + 1)
        return record(s, g, logits)

    state, _ = jax.lax.while_loop(cond, body, (state, g0))
    return GenerateResult(
        tokens=state.tokens,
        logprobs=state.logprobs,
        valid=state.valid,
        done=state.done,
        lengths=jnp.sum(state.valid, axis=1, dtype=jnp.int32),
        num_forwards=state.num_forwards,
        entropy=state.entropy,
        topk_probs=state.topk_probs,
        topk_ids=state.topk_ids,
    )


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def _validate(model, prompt, prompt_valid, max_new_tokens, sampling_, stop_tokens, pad_id, return_topk, mesh):
    """Host checks of :func:`generate`'s arguments (the sampling values are checked by ``SamplingParams``)."""
    vocab = model.cfg.vocab_size
    if prompt.ndim != 2:
        raise ValueError(f"prompt: expected a [B, P] int array, got shape {prompt.shape}")
    if prompt_valid.shape != prompt.shape:
        raise ValueError(f"prompt_valid: shape {prompt_valid.shape} must equal prompt's {prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt: dtype {prompt.dtype} is not an integer type")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: allowed a positive integer")
    if not isinstance(sampling_, SamplingParams):
        raise ValueError(f"sampling={sampling_!r}: allowed a jaxtok.sampling.SamplingParams")
    for name, ids in (("stop_tokens", tuple(stop_tokens)), ("pad_id", (pad_id,))):
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
                raise ValueError(f"{name}: id {t!r} is outside the vocabulary [0, {vocab})")
    if isinstance(return_topk, bool) or not isinstance(return_topk, (int, np.integer)) or not 0 <= return_topk <= vocab:
        raise ValueError(f"return_topk={return_topk!r}: allowed an integer in [0, {vocab}]")
    valid = host_value(prompt_valid)
    if valid is not None:
        valid = valid.astype(bool)
        if not np.all(valid[:, -1]) or np.any(valid[:, 1:] < valid[:, :-1]):
            rows = np.nonzero(~valid[:, -1] | np.any(valid[:, 1:] < valid[:, :-1], axis=1))[0].tolist()
            raise ValueError(f"prompt_valid: rows {rows} are not left-padded with at least one token (each row must "
                             f"be False...False True...True)")
        toks = host_value(prompt)
        if toks is not None:
            check_token_ids(np.where(valid, toks, 0), vocab, name="prompt")
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise ValueError(f"mesh={mesh!r}: allowed a jax.sharding.Mesh or None")
        spec = batch_sharding(mesh).spec[0]
        axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        shards = int(np.prod([mesh.shape[a] for a in axes]))
        if prompt.shape[0] % shards:
            raise ValueError(f"prompt: batch {prompt.shape[0]} is not divisible by the {shards} batch shards of the "
                             f"mesh (axes {axes})")


def check_positions(cfg, prompt_len: int, max_new_tokens: int, name: str = "model") -> None:
    """Raise a ValueError when a ``[B, prompt_len]`` prompt plus ``max_new_tokens`` generated tokens need more
    positions than ``cfg.max_position_embeddings`` (the bound speculative decoding and EAD check too)."""
    need = prompt_len + max_new_tokens
    if need > cfg.max_position_embeddings:
        raise ValueError(f"prompt: length {prompt_len} + max_new_tokens {max_new_tokens} = {need} positions exceed "
                         f"the {name}'s max_position_embeddings={cfg.max_position_embeddings}")


def generate(
    model: nnx.Module,
    prompt,
    prompt_valid,
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_tokens: Sequence[int] = (DEFAULT_EOS_ID,),
    rng: jax.Array,
    return_entropy: bool = False,
    return_topk: int = 0,
    return_logprobs: bool = True,
    mesh: Optional[Mesh] = None,
    pad_id: int = DEFAULT_PAD_ID,
    guide=None,
) -> GenerateResult:
    """Autoregressive generation from a left-padded prompt batch in one jitted call.

    Args:
      model: a ``jaxtok.models.Decoder`` (any NNX module with ``cfg`` and the decoder call contract).
      prompt: ``[B, P]`` int ids, LEFT-padded.
      prompt_valid: ``[B, P]`` bool, False on padding; every row needs at least one token.
      max_new_tokens: N, the cap on generated tokens per row.
      sampling: the sampling transform (:class:`~jaxtok.sampling.SamplingParams`: temperature, 0 = greedy; top-k,
        top-p, min-p; each a scalar or ``[B]``); an all-greedy batch draws no Gumbel noise.
      stop_tokens: ids that end a row (emitted, then the row is frozen).
      rng: a PRNG key; step t uses ``fold_in(rng, t)``.
      return_entropy / return_topk: also return per-token entropies / the K most likely tokens and probabilities
        of the sampling distribution.
      return_logprobs: False skips the per-token log-probs (``GenerateResult.logprobs`` is None): for an all-greedy
        batch that saves a pass of ``exp`` over the ``[B, V]`` logits per step.
      mesh: when given, the batch is sharded over its ``batch`` axes (``data``, ``fsdp``) and the weights as their
        ``logical_axes`` declare; the result equals the unsharded one.
      pad_id: id written after a row is done.
      guide: a logit guide re-weighting each step's logits before sampling, e.g. LenVM length control
        (:class:`jaxtok.decode.length_control.LengthGuide`); ``guide.spec`` is static, ``guide.arrays`` traced.

    Returns:
      :class:`GenerateResult`.
    """
    prompt = prompt if isinstance(prompt, jax.Array) else np.asarray(prompt)
    prompt_valid = prompt_valid if isinstance(prompt_valid, jax.Array) else np.asarray(prompt_valid)
    stop_tokens = tuple(int(t) for t in stop_tokens)
    _validate(model, prompt, prompt_valid, max_new_tokens, sampling, stop_tokens, pad_id, return_topk, mesh)
    b, p = prompt.shape
    check_positions(model.cfg, p, int(max_new_tokens))
    params = sampling.per_row(b)

    prompt = jnp.where(jnp.asarray(prompt_valid, bool), jnp.asarray(prompt, jnp.int32), pad_id)
    prompt_valid = jnp.asarray(prompt_valid, bool)
    guide_arrays = None
    if guide is not None:
        guide.check(b, model.cfg.vocab_size)
        guide_arrays = guide.for_batch(b)
    graphdef, model_state = nnx.split(model)
    if mesh is not None:
        model_state = place(model_state, param_shardings(model_state, mesh))
        prompt, prompt_valid, params = place((prompt, prompt_valid, params), batch_sharding(mesh))
        if guide_arrays is not None:
            guide_arrays = {**guide_arrays, "model": place(guide_arrays["model"],
                                                          param_shardings(guide_arrays["model"], mesh))}
    return _generate_jit(graphdef, model_state, prompt, prompt_valid, rng, params, guide_arrays,
                         max_new_tokens=int(max_new_tokens), stop_tokens=stop_tokens, pad_id=int(pad_id),
                         return_entropy=bool(return_entropy), return_topk=int(return_topk), mesh=mesh,
                         guide_spec=None if guide is None else guide.spec, greedy=sampling.all_greedy,
                         return_logprobs=bool(return_logprobs))
