"""Speculative decoding in one jitted draft -> verify -> accept ``lax.while_loop`` (decode_methods.md §A1–§A6),
and entropy-adaptive model switching (EAD, §A4).

Lossless loop (:func:`speculative_generate`). Every row keeps its committed sequence in a fixed buffer
``seq [B, S]`` = ``W`` pad columns | left-padded prompt ``P`` | up to ``N + γmax + 1`` emitted tokens, and
``n [B]`` = committed length; the newest token ``seq[n-1]`` is not yet in the target's KV cache. A round:

1. the draft-length policy picks the row's cap γ_b (``decode.draft_len`` = γmax is the static cap);
2. the drafter proposes ``d [B, γmax]`` with raw logits and a validity mask (leading True, at most γ_b);
3. ONE target forward on ``[seq[n-1], d_1..d_k]`` at per-row cache offsets gives ``p_1..p_{k+1}``, k the smallest
   of a few static widths (:func:`verify_widths`) covering every live row's drafts: γmax for ``fixed`` drafting,
   else also 0 (no row drafted: an AR step, so ``batch_gamma`` at γ* = 0 runs AR inside the loop) and γmax // 2;
4. exact speculative sampling (``sampling.speculative_accept``: accept w.p. min(1, p/q), residual
   ``max(0, p - q)`` with the degenerate fallback to ``p``, bonus from ``p_{γ+1}``) or the greedy variant
   (``speculative_accept_greedy``) for rows with temperature 0; the same sampling transform S (temperature,
   top-k, top-p, min-p) is applied to p and q;
5. the accepted drafts and the next token are written at ``seq[n:]``; the target cache is rolled back to
   ``n + num_accepted`` (``KVCache.rollback``: stale slots are masked, never copied); rows that emitted a stop
   token or reached ``max_new_tokens`` are frozen with ``where``.

FASER (§A7): ``verify_chunk=c`` splits step 3 into frontier forwards of c positions with early pruning (greedy
rows only, off by default: :func:`_frontier_logits`); the round itself is :func:`spec_round` on a
:class:`SpecState` built by :func:`spec_prefill`, which the continuous-batching engine
(:mod:`jaxtok.decode.serving`) reuses slot by slot.

Drafters are small pytrees whose static fields (a model's ``GraphDef``, n-gram sizes) are part of the jit cache
key and whose arrays are traced:

- :class:`ModelDrafter` — a smaller AR model with its own KV cache. Each round it rolls its cache back to
  ``n - R`` and re-feeds the last R committed tokens in one forward (stale or rejected KV is overwritten). R = 2
  suffices for a drafter whose drafts were the ones verified: its cache already holds exact KV for every committed
  token but the newest two (the bonus token, and the last draft, which is never fed, when every draft was
  accepted; :func:`refeed_width`); a TAPS sub-drafter whose draft lost the routing re-feeds the window W = γmax + 1;
- :class:`NgramDrafter` — prompt lookup: the tokens that followed the latest earlier occurrence of the last
  g committed tokens (g = max_ngram .. min_ngram); deterministic drafts, q = one-hot (§A1.1);
- :class:`DeerDrafter` — DEER (§A6): a masked-diffusion decoder drafts γmax tokens in ONE bidirectional forward
  on ``committed | <mask> x γmax`` (independent per-position marginals; no prefix cache: the full buffer is
  re-encoded each round);
- :class:`RoutedDrafter` — TAPS (§A5): several drafters; each round every row takes the draft of the drafter
  whose FIRST draft step is the most confident (top-1 probability of ``q_1``, known before any token is sampled, so
  the chosen draft is still distributed as that drafter's q and verification stays lossless); all drafters run
  and their caches stay valid through the re-feed scheme.

Sharding: with ``mesh=`` the rows and every per-row buffer of the loop (``seq``, KV caches, counters) live on the
mesh's batch axes and the target's and model drafters' weights on their declared axes (heads / MLP / vocabulary on
``tensor``); the output equals the single-device run (greedy token-identical; sampled rows too, since the
partitionable threefry stream does not depend on the sharding). ``return_logprobs=True`` adds each emitted token's
log-probability under the target's processed distribution, the sampler log-prob of speculative RL rollouts
(:mod:`jaxtok.train.rollout`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtok import sampling
from jaxtok.mesh import axis_rules, batch_sharding, param_shardings, place
from jaxtok.models import KVCache
from jaxtok.sampling import RowParams, SamplingParams

from .draft_policies import DraftPolicy, EADArgs, Fixed, draft_stats, ead_switch, top1_prob
from .generate import DEFAULT_EOS_ID, DEFAULT_PAD_ID, _validate
from .rows import (ALL_GREEDY, greedy_tokens, kept_tokens, processed_probs, rows_slice, rows_write, sample_rows,
                   token_logprob, token_prob)

_TRACES = [0]  # incremented each time a jitted body of this module is traced


def num_traces() -> int:
    """How many times :func:`speculative_generate`'s / :func:`ead_generate`'s jitted bodies have been traced."""
    return _TRACES[0]


# ----------------------------------------------------------------------------------------------------------------
# Small array helpers
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Drafters
# ----------------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftContext:
    """What a drafter sees in a round. ``seq [B, S]``/``seq_valid [B, S]`` committed buffer, ``n [B]`` committed
    length (``seq[n-1]`` = newest token), ``live [B]`` rows still generating, ``gamma [B]`` the policy's caps,
    ``params`` per-row sampling parameters (:class:`~jaxtok.sampling.RowParams`), ``key``; static: ``gamma_max``,
    ``window`` (= γmax + 1), ``pad_id``,
    ``refeed`` (how many of the newest committed tokens a model drafter re-feeds: :func:`refeed_width`)."""

    seq: jax.Array
    seq_valid: jax.Array
    n: jax.Array
    live: jax.Array
    gamma: jax.Array
    params: RowParams
    key: jax.Array
    gamma_max: int = dataclasses.field(metadata=dict(static=True))
    window: int = dataclasses.field(metadata=dict(static=True))
    pad_id: int = dataclasses.field(metadata=dict(static=True))
    refeed: int = dataclasses.field(default=0, metadata=dict(static=True))  # 0: the whole window


def refeed_width(window: int, own_drafts_verified: bool = True) -> int:
    """Tokens a :class:`ModelDrafter` re-feeds per round so that its KV cache is exact for every committed token.

    In a round at committed length n the drafter's cache is exact below n (induction) and it feeds its valid drafts
    ``d_1 .. d_{k-1}`` (never the last valid one, ``d_k``) at slots n .. n+k-2. Verification commits ``a <= k``
    accepted drafts and one target token, so the next round's n' = n + a + 1 and slots below n + min(a, k-1) are
    exact: at most ``n' - (n + a - 1) = 2`` tokens are missing (the target's token, and ``d_k`` when a = k). That
    holds only when the verified drafts were this drafter's own (``own_drafts_verified``); a TAPS sub-drafter whose
    draft lost the routing may have drafted none of the accepted tokens and re-feeds the whole ``window``."""
    return min(2, window) if own_drafts_verified else window


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Draft:
    """A round's proposal: ``tokens [B, γmax]`` int32 (pad where invalid), raw ``logits [B, γmax, V]`` float32 (the
    distribution q = S(logits) the tokens were drawn from), ``valid [B, γmax]`` (leading True), ``forwards`` []
    int32 drafter forwards, ``state`` the drafter's new state, ``choice [B]`` int32 (routing; 0 for one drafter)."""

    tokens: jax.Array
    logits: jax.Array
    valid: jax.Array
    forwards: jax.Array
    state: Any
    choice: jax.Array


def policy_mask(policy: DraftPolicy, logits: jax.Array, gamma: jax.Array, valid: Optional[jax.Array] = None,
                token_prob: Optional[jax.Array] = None) -> jax.Array:
    """Apply a draft-length policy to drafts proposed all at once (n-gram, DEER): ``[B, γ]`` leading-True mask
    ``active_j = active_{j-1} & continue_{j-1} & (j < gamma_b) & valid_j``. ``token_prob [B, γ]``: ``q_j(d_j)``, the
    probability of each draft under its draft distribution (needed by ``needs_token_prob`` policies)."""
    b, g = logits.shape[:2]
    carry = policy.round_init(b)
    active = gamma > 0
    out = []
    for j in range(g):
        if valid is not None:
            active = active & valid[:, j]
        out.append(active)
        cont, carry = policy.after(carry, j, logits[:, j], None, None if token_prob is None else token_prob[:, j])
        active = active & cont & (j + 1 < gamma)
    return jnp.stack(out, axis=1)


class Drafter:
    """Drafter protocol: ``init(seq, seq_valid, prefill_len, capacity) -> state`` (prefill),
    ``draft(state, ctx, policy) -> Draft``, ``has_hidden`` (whether ``policy.after`` gets hidden states)."""

    has_hidden = False
    prefill_forwards = 0  # batched forwards spent by ``init``
    vocab_size: int

    def init(self, seq, seq_valid, prefill_len: int, capacity: int):
        return ()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelDrafter(Drafter):
    """A smaller autoregressive model (§A1.4) with its own KV cache (the drafter state)."""

    graphdef: Any = dataclasses.field(metadata=dict(static=True))
    state: Any
    has_hidden = True
    prefill_forwards = 1

    @classmethod
    def of(cls, model: nnx.Module) -> "ModelDrafter":
        graphdef, state = nnx.split(model)
        return cls(graphdef=graphdef, state=state)

    @property
    def cfg(self):
        return cfg_of(self.graphdef, self.state)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def init(self, seq, seq_valid, prefill_len, capacity):
        model = nnx.merge(self.graphdef, self.state)
        cache = KVCache.init(model.cfg, seq.shape[0], capacity)
        return model(seq[:, :prefill_len], valid=seq_valid[:, :prefill_len], cache=cache, return_logits=False).cache

    def draft(self, cache: KVCache, ctx: DraftContext, policy: DraftPolicy) -> Draft:
        model = nnx.merge(self.graphdef, self.state)
        b, g = ctx.n.shape[0], ctx.gamma_max
        w = ctx.refeed or ctx.window  # R: re-feed the last R committed tokens (their KV may be stale or missing)
        need_hidden = policy.needs_hidden
        start = ctx.n - w
        chunk = rows_slice(ctx.seq, start, w)  # [B, R]
        cvalid = rows_slice(ctx.seq_valid, start, w) & ctx.live[:, None]
        out = model(chunk, valid=cvalid, cache=cache.rollback(start), logits_at=jnp.full((b, 1), w - 1, jnp.int32),
                    return_hidden=need_hidden)
        hidden0 = out.hidden[:, -1] if need_hidden else None
        vocab = out.logits.shape[-1]

        def step(c: _DraftCarry) -> _DraftCarry:
            """Draft ``d_j`` from the current logits, then (unless no row continues) one drafter forward on it."""
            j = c.j
            tok = sample_rows(jax.random.fold_in(ctx.key, j), c.logits, ctx.params)  # [B]
            tprob = token_prob(c.logits, tok, ctx.params) if policy.needs_token_prob else None  # q_j(d_j) [B]
            tok = jnp.where(c.active, tok, ctx.pad_id)
            cont, pcarry = policy.after(c.pcarry, j, c.logits, c.hidden, tprob)
            nxt = c.active & cont & (j + 1 < ctx.gamma)

            def fwd(_):
                m = nnx.merge(self.graphdef, self.state)
                o = m(tok[:, None], valid=nxt[:, None], cache=c.cache, return_hidden=need_hidden)
                h = o.hidden[:, 0] if need_hidden else c.hidden
                return o.cache, o.logits[:, 0], h, jnp.int32(1)

            def skip(_):
                return c.cache, c.logits, c.hidden, jnp.int32(0)

            cache_, logits_, hidden_, f = jax.lax.cond(jnp.any(nxt) & (j + 1 < g), fwd, skip, None)
            return _DraftCarry(j=j + 1, cache=cache_, logits=logits_, hidden=hidden_, active=nxt, pcarry=pcarry,
                               tokens=c.tokens.at[:, j].set(tok), logits_buf=c.logits_buf.at[:, j].set(c.logits),
                               valid=c.valid.at[:, j].set(c.active), forwards=c.forwards + f)

        init = _DraftCarry(j=jnp.int32(0), cache=out.cache, logits=out.logits[:, 0], hidden=hidden0,
                           active=ctx.live & (ctx.gamma > 0), pcarry=policy.round_init(b),
                           tokens=jnp.full((b, g), ctx.pad_id, jnp.int32),
                           logits_buf=jnp.zeros((b, g, vocab), jnp.float32), valid=jnp.zeros((b, g), bool),
                           forwards=jnp.int32(1))
        c = jax.lax.while_loop(lambda c: (c.j < g) & jnp.any(c.active), step, init)
        return Draft(c.tokens, c.logits_buf, c.valid, c.forwards, c.cache, jnp.zeros((b,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DraftCarry:
    """Loop carry of :meth:`ModelDrafter.draft`: ``j []`` the next draft index; the drafter's ``cache``, ``logits
    [B, V]`` and ``hidden [B, D]`` (None unless the policy reads hidden states) after the newest input; ``active
    [B]`` rows still drafting; ``pcarry`` the policy's in-round carry; the outputs ``tokens [B, γ]``, ``logits_buf
    [B, γ, V]`` (the logits each draft was drawn from), ``valid [B, γ]`` and ``forwards []``."""

    j: jax.Array
    cache: KVCache
    logits: jax.Array
    hidden: Optional[jax.Array]
    active: jax.Array
    pcarry: Any
    tokens: jax.Array
    logits_buf: jax.Array
    valid: jax.Array
    forwards: jax.Array


def cfg_of(graphdef, state):
    """The model config of a split module."""
    return nnx.merge(graphdef, state).cfg


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NgramDrafter(Drafter):
    """Prompt lookup / n-gram drafting (§A1.1 deterministic drafts): find the latest earlier occurrence of the last
    g committed tokens (g = ``max_ngram`` down to ``min_ngram``, first hit wins) and propose the tokens that
    followed it (only committed ones). No hit: no drafts (the round emits the target's token). q = one-hot."""

    vocab_size: int = dataclasses.field(metadata=dict(static=True))
    max_ngram: int = dataclasses.field(default=3, metadata=dict(static=True))
    min_ngram: int = dataclasses.field(default=1, metadata=dict(static=True))

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"min_ngram={self.min_ngram!r}, max_ngram={self.max_ngram!r}: allowed "
                             f"1 <= min_ngram <= max_ngram")

    def draft(self, state, ctx: DraftContext, policy: DraftPolicy) -> Draft:
        tokens, valid = ngram_lookup(ctx.seq, ctx.seq_valid, ctx.n, ctx.gamma_max, self.max_ngram, self.min_ngram,
                                     ctx.pad_id)
        logits = jnp.where(jax.nn.one_hot(tokens, self.vocab_size, dtype=bool), 0.0, -jnp.inf)  # [B, γ, V]
        tprob = jnp.ones(tokens.shape, jnp.float32) if policy.needs_token_prob else None  # q = one-hot: q(d) = 1
        valid = policy_mask(policy, logits, ctx.gamma, valid & ctx.live[:, None], tprob)
        tokens = jnp.where(valid, tokens, ctx.pad_id)
        b = tokens.shape[0]
        return Draft(tokens, logits, valid, jnp.int32(0), state, jnp.zeros((b,), jnp.int32))


def ngram_lookup(seq, seq_valid, n, gamma, max_ngram, min_ngram, pad_id=0):
    """Prompt-lookup drafts: ``(tokens [B, γ], valid [B, γ])``. For g from ``max_ngram`` down to ``min_ngram``: the
    latest start ``i`` with ``seq[i:i+g] == seq[n-g:n]`` (all valid) and ``i + g < n``; drafts ``seq[i+g : i+g+γ]``,
    valid while ``< n``. Rows without any hit get no valid drafts."""
    b, s = seq.shape
    idx = jnp.arange(s)[None, :]  # [1, S]
    found = jnp.zeros((b,), bool)
    best = jnp.zeros((b,), jnp.int32)  # start of the continuation
    for g in range(max_ngram, min_ngram - 1, -1):
        pattern = rows_slice(seq, jnp.maximum(n - g, 0), g)  # [B, g]
        pat_ok = jnp.all(rows_slice(seq_valid, jnp.maximum(n - g, 0), g), axis=1) & (n >= g)
        match = jnp.ones((b, s), bool)
        for k in range(g):
            shifted = jnp.roll(seq, -k, axis=1)  # shifted[:, i] = seq[:, i + k]
            sv = jnp.roll(seq_valid, -k, axis=1)
            match = match & (shifted == pattern[:, k:k + 1]) & sv
        match = match & (idx + g < n[:, None]) & (idx + g <= s - 1)
        hit = jnp.any(match, axis=1) & pat_ok
        last = (s - 1 - jnp.argmax(match[:, ::-1], axis=1)).astype(jnp.int32)
        take = hit & ~found
        best = jnp.where(take, last + g, best)
        found = found | hit
    toks = rows_slice(jnp.pad(seq, ((0, 0), (0, gamma))), best, gamma)
    valid = found[:, None] & (best[:, None] + jnp.arange(gamma)[None, :] < n[:, None])
    return jnp.where(valid, toks, pad_id).astype(jnp.int32), valid


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeerDrafter(Drafter):
    """DEER (§A6): a masked-diffusion ``Decoder`` (``cfg.mask_token_id`` set) drafts γmax tokens in one
    bidirectional forward on ``committed tokens | <mask> * γmax``; ``d_j ~ S(q_j)`` independently. Lossless under
    A1 verification because q_j does not depend on the other drafts."""

    graphdef: Any = dataclasses.field(metadata=dict(static=True))
    state: Any
    mask_id: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def of(cls, model: nnx.Module, mask_id: Optional[int] = None) -> "DeerDrafter":
        mask_id = model.cfg.mask_token_id if mask_id is None else mask_id
        if mask_id is None:
            raise ValueError("DeerDrafter: the model's cfg.mask_token_id is None and no mask_id was given; a DEER "
                             "drafter must be a masked-diffusion LM (e.g. preset tiny_diffusion, <mask> id 3)")
        graphdef, state = nnx.split(model)
        return cls(graphdef=graphdef, state=state, mask_id=int(mask_id))

    @property
    def vocab_size(self) -> int:
        return cfg_of(self.graphdef, self.state).vocab_size

    def draft(self, state, ctx: DraftContext, policy: DraftPolicy) -> Draft:
        model = nnx.merge(self.graphdef, self.state)
        b, s = ctx.seq.shape
        g = ctx.gamma_max
        idx = jnp.arange(s)[None, :]
        n = ctx.n[:, None]
        is_mask = (idx >= n) & (idx < n + g)
        tokens = jnp.where(idx < n, ctx.seq, jnp.where(is_mask, self.mask_id, ctx.pad_id))
        valid = ((idx < n) & ctx.seq_valid) | is_mask
        at = ctx.n[:, None] + jnp.arange(g)[None, :]  # [B, γ]
        logits = model(tokens, valid=valid & ctx.live[:, None], attention="bidirectional", logits_at=at).logits
        drafts = sample_rows(ctx.key, logits, ctx.params)  # [B, γ]
        tprob = token_prob(logits, drafts, ctx.params) if policy.needs_token_prob else None  # [B, γ]
        dvalid = policy_mask(policy, logits, ctx.gamma, jnp.broadcast_to(ctx.live[:, None], (b, g)), tprob)
        return Draft(jnp.where(dvalid, drafts, ctx.pad_id), logits, dvalid, jnp.int32(1), state,
                     jnp.zeros((b,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutedDrafter(Drafter):
    """TAPS confidence routing (§A5, the paper's granularity): every drafter drafts; row b takes the drafter whose
    first draft step has the highest top-1 probability (:func:`routing_confidence`; a drafter without a first draft
    scores -1). Its ``choice [B]`` is reported.

    Lossless at T > 0: the score depends only on the committed prefix (the first step's logits), never on the
    tokens a drafter sampled, so the chosen draft has exactly that drafter's distribution q, the one verification
    uses. Scoring whole drafts (the earlier mean over all drafts) selects drafts by their own sampled tokens and
    biases the output whenever a drafter's later logits depend on its samples (AR drafters)."""

    drafters: tuple

    @property
    def vocab_size(self) -> int:
        return self.drafters[0].vocab_size

    @property
    def has_hidden(self) -> bool:
        return all(d.has_hidden for d in self.drafters)

    @property
    def prefill_forwards(self) -> int:
        return sum(d.prefill_forwards for d in self.drafters)

    def init(self, seq, seq_valid, prefill_len, capacity):
        return tuple(d.init(seq, seq_valid, prefill_len, capacity) for d in self.drafters)

    def draft(self, state, ctx: DraftContext, policy: DraftPolicy) -> Draft:
        # a sub-drafter's draft may lose the routing, so its cache may miss up to γmax + 1 committed tokens
        ctx = dataclasses.replace(ctx, refeed=refeed_width(ctx.window, own_drafts_verified=False))
        outs = [d.draft(st, dataclasses.replace(ctx, key=jax.random.fold_in(ctx.key, 1000 + i)), policy)
                for i, (d, st) in enumerate(zip(self.drafters, state))]
        conf = jnp.stack([routing_confidence(o.logits, o.valid) for o in outs], axis=1)  # [B, K]
        choice = jnp.argmax(conf, axis=1).astype(jnp.int32)  # [B]

        def pick(*xs):
            stacked = jnp.stack(xs, axis=1)  # [B, K, ...]
            return jnp.take_along_axis(stacked, choice.reshape((-1, 1) + (1,) * (stacked.ndim - 2)), axis=1)[:, 0]

        return Draft(pick(*[o.tokens for o in outs]), pick(*[o.logits for o in outs]),
                     pick(*[o.valid for o in outs]), sum(o.forwards for o in outs),
                     tuple(o.state for o in outs), choice)


def routing_confidence(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """TAPS routing score ``[B]`` (§A5): top-1 probability of the FIRST draft step's raw logits ``logits[:, 0]``
    (``[B, γ, V]`` given), -1 where the first draft is not valid. Uses nothing a drafter sampled: ``logits[:, 0]`` and
    ``valid[:, 0]`` are functions of the committed prefix only (later steps are not: they condition on drafts)."""
    return jnp.where(valid[:, 0], top1_prob(logits[:, 0]), -1.0)


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """Output of :func:`speculative_generate`.

    Attributes:
      tokens ``[B, N]`` int32 (stop token included, ``pad_id`` after), valid ``[B, N]``, lengths ``[B]``,
      done ``[B]`` (a stop token was emitted);
      target_forwards ``[]`` batched target forwards (prefill included), draft_forwards ``[]`` batched drafter
      forwards (prefill included; n-gram drafts cost none);
      rounds ``[B]`` verification rounds per row; accepted ``[B]`` accepted drafts per row; drafted ``[B]``
      proposed (valid) drafts per row;
      accepted_by_position / drafted_by_position ``[B, γmax]``: per row, over its rounds, how often draft j was
      accepted / proposed;
      route_counts ``[B, K]`` rounds of each row routed to each drafter (TAPS; ``K = 1`` otherwise);
      logprobs ``[B, N]`` float32 (``return_logprobs=True``, else None): log-probability of each emitted token under
      the TARGET's processed distribution S(p) (temperature and filters applied; greedy rows at temperature 1), 0
      where invalid: the same quantity :func:`jaxtok.decode.generate.generate` returns, whichever way the token was
      produced (accepted draft, residual or bonus draw).
    Per-row statistics let callers that pad a short last batch count only its real rows (``rows=``).
    """

    tokens: jax.Array
    valid: jax.Array
    lengths: jax.Array
    done: jax.Array
    target_forwards: jax.Array
    draft_forwards: jax.Array
    rounds: jax.Array
    accepted: jax.Array
    drafted: jax.Array
    accepted_by_position: jax.Array
    drafted_by_position: jax.Array
    route_counts: jax.Array
    logprobs: Optional[jax.Array] = None

    @property
    def tokens_per_target_forward(self) -> float:
        """Emitted tokens per target forward per row: ``sum(lengths) / sum(rounds + 1)`` (prefill counted)."""
        return float(np.sum(self.lengths) / max(np.sum(np.asarray(self.rounds) + 1), 1))

    @property
    def mean_accepted_length(self) -> float:
        """Mean accepted drafts per verification round (the bonus/recovered token excluded)."""
        return float(np.sum(self.accepted) / max(np.sum(self.rounds), 1))

    @property
    def acceptance_rate_by_position(self) -> np.ndarray:
        """``[γmax]`` P(draft j accepted | proposed) over all rows; NaN where never proposed."""
        d = np.asarray(self.drafted_by_position, np.float64).sum(0)
        return np.where(d > 0, np.asarray(self.accepted_by_position).sum(0) / np.maximum(d, 1), np.nan)

    def metrics(self) -> dict:
        """Host-side summary of the call (JSON-ready)."""
        return {
            "target_forwards": int(self.target_forwards),
            "draft_forwards": int(self.draft_forwards),
            "tokens_per_target_forward": self.tokens_per_target_forward,
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_rate": float(np.sum(self.accepted) / max(np.sum(self.drafted), 1)),
            "acceptance_rate_by_position": [None if np.isnan(x) else float(x)
                                            for x in self.acceptance_rate_by_position],
            "route_counts": np.asarray(self.route_counts).sum(0).tolist(),
        }


# ----------------------------------------------------------------------------------------------------------------
# Jitted loop
# ----------------------------------------------------------------------------------------------------------------


def seq_layout(b, p, n, g):
    """Buffer geometry: W pad columns before the prompt, then P, then N + γ + 1 emitted slots."""
    w = g + 1
    return w, w + p + n + g + 1


def poison_stale(cache: KVCache) -> KVCache:
    """Fill every stale slot (at or beyond a row's length) with NaN keys/values and garbage positions: a test hook
    proving that rolled-back entries are never read (§A1.5 property 6)."""
    stale = jnp.arange(cache.capacity)[None, :] >= cache.lengths[:, None]  # [B, S]
    m = stale[None, :, :, None, None]
    return dataclasses.replace(cache, k=jnp.where(m, jnp.nan, cache.k), v=jnp.where(m, jnp.nan, cache.v),
                               positions=jnp.where(stale, 7, cache.positions))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoDrafter(Drafter):
    """Proposes nothing, at no cost: every round verifies width 0, i.e. the loop runs plain AR steps (the AR
    baseline of the serving engine, :mod:`jaxtok.decode.serving`, on the same slot machinery)."""

    vocab_size: int = dataclasses.field(metadata=dict(static=True))

    def draft(self, state, ctx: DraftContext, policy: DraftPolicy) -> Draft:
        b, g = ctx.n.shape[0], ctx.gamma_max
        return Draft(jnp.full((b, g), ctx.pad_id, jnp.int32), jnp.zeros((b, g, 1), jnp.float32),
                     jnp.zeros((b, g), bool), jnp.int32(0), state, jnp.zeros((b,), jnp.int32))


def _drafts_fewer(drafter: Drafter) -> bool:
    """Whether ``drafter`` may propose fewer than γ valid drafts for a live row under the ``fixed`` policy (n-gram
    lookups miss; model and DEER drafters always fill γ)."""
    if isinstance(drafter, RoutedDrafter):
        return any(_drafts_fewer(d) for d in drafter.drafters)
    return not isinstance(drafter, (ModelDrafter, DeerDrafter))


def verify_widths(policy: DraftPolicy, drafter: Drafter, gamma_max: int, batch: int) -> tuple:
    """The static verification widths (drafts verified per round, increasing) a round picks from: the smallest that
    covers every live row's valid drafts. ``(γ,)`` when every round drafts the same γ (the policy's
    ``constant_gamma``: ``fixed``'s γmax, ``batch_gamma``'s γ* at this batch size; a drafter that fills γ); else
    ``(0, γmax)``, plus ``γmax // 2`` for γmax >= 4. Width 0 is an AR step (no row drafted: e.g. ``batch_gamma``
    with γ* = 0, or an n-gram miss on every row); each width is a branch of a ``lax.switch`` (one more target
    forward compiled per width, and the switch's cost every round). :class:`NoDrafter`: ``(0,)``."""
    if isinstance(drafter, NoDrafter):
        return (0,)
    constant = policy.constant_gamma(gamma_max, batch)
    if constant is not None and not _drafts_fewer(drafter):
        return (constant,)
    return tuple(sorted({0, gamma_max // 2 if gamma_max >= 4 else 0, gamma_max}))


def _accept_round(key, tokens, d_logits, dvalid, t_logits, params, pad_id: int, greedy: bool):
    """Verification of ``k`` drafts ``tokens [B, k]`` (draft logits ``[B, k, V]``, ``dvalid [B, k]``) against the
    target's ``t_logits [B, k+1, V]`` -> ``(num_accepted [B], emitted [B, k+1])``: exact speculative sampling, or
    greedy verification for temperature-0 rows (only that when ``greedy``). ``k = 0``: the target's next token
    drawn from S(p_1), as an AR step (argmax for greedy rows, as the greedy verdict's)."""
    b, k = tokens.shape
    if k == 0:
        return jnp.zeros((b,), jnp.int32), sample_rows(key, t_logits[:, 0], params)[:, None].astype(jnp.int32)
    if greedy:  # = sampling.speculative_accept_greedy with the blocked argmax
        a = greedy_tokens(t_logits)  # [B, k+1]
        nacc = sampling.count_leading_true(dvalid & (tokens == a[:, :k]))
        return nacc, sampling._emit(tokens, nacc, jnp.take_along_axis(a, nacc[:, None], axis=1)[:, 0], pad_id)
    q = processed_probs(d_logits, params)  # [B, k, V]
    p_ = processed_probs(t_logits, params)  # [B, k+1, V]
    exact = sampling.speculative_accept(key, tokens, q, p_, dvalid, pad_id)
    verdict = sampling.speculative_accept_greedy(tokens, t_logits, dvalid, pad_id)
    is_greedy = params.temperature <= 0
    return (jnp.where(is_greedy, verdict.num_accepted, exact.num_accepted),
            jnp.where(is_greedy[:, None], verdict.tokens, exact.tokens))  # [B, k+1]


@functools.partial(jax.jit, static_argnames=("target_graphdef", "max_new_tokens", "gamma_max", "stop_tokens",
                                             "pad_id", "poison", "greedy", "mesh", "return_logprobs",
                                             "verify_chunk"))
def _speculative_jit(target_graphdef, target_state, drafter, policy, prompt, prompt_valid, rng, params, *,
                     max_new_tokens, gamma_max, stop_tokens, pad_id, poison=False, greedy=False, mesh=None,
                     return_logprobs=False, verify_chunk=0):
    """``greedy``: every row has temperature 0 (known on the host): drafts and the first token are argmaxes and
    verification is greedy only (the exact-sampling branch, its two ``[B, γ(+1), V]`` softmaxes and the Gumbel
    draws are not traced). Same tokens as the general loop, whose greedy rows take the same argmaxes. ``mesh``:
    the model code's activation constraints follow ``jaxtok.mesh``'s rules on it (rows on the batch axes, heads /
    MLP / vocabulary on ``tensor``); the arguments arrive placed by :func:`speculative_generate`."""
    flag = ALL_GREEDY.set(bool(greedy))
    rules = axis_rules(mesh) if mesh is not None else contextlib.nullcontext()
    try:
        with rules:
            return _speculative_core(target_graphdef, target_state, drafter, policy, prompt, prompt_valid, rng,
                                     params, max_new_tokens, gamma_max, stop_tokens, pad_id, poison, greedy,
                                     return_logprobs, verify_chunk)
    finally:
        ALL_GREEDY.reset(flag)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    """Loop carry of :func:`_speculative_core` (the speculative counterpart of ``generate``'s ``_State``).

    ``round []`` rounds run (round r draws with ``fold_in(rng, r + 1)``); ``seq / seq_valid [B, S]`` the committed
    buffer (:func:`seq_layout`); ``lp_seq [B, S]`` the target log-prob of each committed token (``return_logprobs``,
    else None); ``count [B]`` emitted tokens; ``done [B]`` a stop token was emitted; ``finished [B]`` done or at
    ``max_new_tokens``; ``cache`` the target's KV cache (exact below ``n - 1``); ``dstate`` / ``pstate`` the
    drafter's and the draft-length policy's states; the counters of :class:`SpeculativeResult`."""

    round: jax.Array
    seq: jax.Array
    seq_valid: jax.Array
    lp_seq: Optional[jax.Array]
    count: jax.Array
    done: jax.Array
    finished: jax.Array
    cache: KVCache
    dstate: Any
    pstate: Any
    target_forwards: jax.Array
    draft_forwards: jax.Array
    rounds: jax.Array
    accepted: jax.Array
    drafted: jax.Array
    accepted_by_position: jax.Array
    drafted_by_position: jax.Array
    route_counts: jax.Array
    verify_tokens: jax.Array  # [] sum over rounds of the verified positions per row (width + 1; 0 when skipped)


def _verify(target_graphdef, target_state, cache: KVCache, last, d: Draft, dvalid, live, key, params: RowParams,
            widths: tuple, pad_id: int, greedy: bool, return_logprobs: bool, chunk: int = 0):
    """Step 3-4 of a round: ONE target forward on ``[last, d_1..d_k]`` (``last [B, 1]`` the newest committed token)
    at slots n-1 .. n-1+k, k = the smallest static width in ``widths`` covering every live row's drafts (k = 0: an
    AR step, when no row drafted), then acceptance (:func:`_accept_round`). ``chunk`` c > 0 (greedy only):
    frontier verification (:func:`_frontier_logits`). Returns ``(cache, num_accepted [B], emitted [B, γ+1],
    logprobs [B, γ+1], target_forwards [], verified_positions [])``: the emitted tokens padded with ``pad_id`` and
    their target log-probs ``log S(p_j)[emitted_j]`` (zeros unless ``return_logprobs``), the target forwards run
    (1, or the chunks run) and the positions they verified per row."""
    b, g = d.tokens.shape

    def at_width(k):
        toks = jnp.concatenate([last, d.tokens[:, :k]], axis=1)  # [B, k+1]
        if chunk and k + 1 > chunk:
            vcache, logits, fwd, pos = _frontier_logits(target_graphdef, target_state, cache, toks, dvalid[:, :k],
                                                        live, chunk)
        else:
            vo = nnx.merge(target_graphdef, target_state)(toks, valid=jnp.broadcast_to(live[:, None], (b, k + 1)),
                                                           cache=cache)
            vcache, logits, fwd, pos = vo.cache, vo.logits, jnp.int32(1), jnp.int32(k + 1)
        nacc, emitted = _accept_round(key, d.tokens[:, :k], d.logits[:, :k], dvalid[:, :k], logits, params,
                                      pad_id, greedy)
        lp = token_logprob(logits, emitted, params) if return_logprobs else jnp.zeros(emitted.shape)
        widen = ((0, 0), (0, g - k))
        return (vcache, nacc, jnp.pad(emitted, widen, constant_values=pad_id),  # [B, γ+1]
                jnp.pad(lp, widen), fwd, pos)

    if len(widths) == 1:
        return at_width(widths[0])
    need = jnp.max(jnp.where(live, jnp.sum(dvalid, axis=1), 0))  # the round's largest γ over live rows
    branch = jnp.sum(need > jnp.asarray(widths[:-1], jnp.int32))  # smallest width >= need
    return jax.lax.switch(branch, [functools.partial(at_width, k) for k in widths])


def _frontier_logits(target_graphdef, target_state, cache: KVCache, toks, dvalid, live, chunk: int):
    """FASER's frontier verification with early pruning (§A7, greedy rows): the verification inputs ``toks [B,
    k+1]`` = ``[last, d_1..d_k]`` are fed in chunks of ``chunk`` positions (the last one shorter), each a target
    forward that appends its KV at the rows' cache offsets. A row needs the logits at input position j iff its
    drafts ``d_1..d_j`` were all accepted (they verify ``d_{j+1}``, or give the bonus token when j = its draft
    count), so before the chunk starting at position a the rows alive are those whose greedy verdict so far accepts
    ``d_1..d_a``; a chunk with no row alive is skipped (``lax.cond``), and so are all later ones. Rows not alive
    are fed as invalid (their slots are stale and rolled back). Exact: every logit the greedy verdict reads is
    computed (the others are zeros). Returns ``(cache, logits [B, k+1, V], forwards [], positions [])``: the
    positions run (per row) sum the widths of the chunks not skipped."""
    b, t = toks.shape
    vocab = nnx.merge(target_graphdef, target_state).cfg.vocab_size
    logits = jnp.zeros((b, t, vocab), jnp.float32)
    fwd, pos = jnp.int32(0), jnp.int32(0)
    for a in range(0, t, chunk):
        e = min(a + chunk, t)
        if a == 0:
            alive = live
        else:  # greedy verdict on d_1..d_a from the logits at positions 0..a-1
            match = dvalid[:, :a] & (toks[:, 1:a + 1] == greedy_tokens(logits[:, :a]))
            alive = live & (sampling.count_leading_true(match) >= a)

        def run(args, a=a, e=e, alive=alive):
            c, lg = args
            vo = nnx.merge(target_graphdef, target_state)(toks[:, a:e], valid=jnp.broadcast_to(
                alive[:, None], (b, e - a)), cache=c)
            return vo.cache, lg.at[:, a:e].set(vo.logits.astype(lg.dtype)), jnp.int32(1)

        def skip(args):
            return args[0], args[1], jnp.int32(0)

        cache, logits, ran = jax.lax.cond(jnp.any(alive), run, skip, (cache, logits))
        fwd, pos = fwd + ran, pos + ran * (e - a)
    return cache, logits, fwd, pos


def spec_prefill(target_graphdef, target_state, drafter, policy, prompt, prompt_valid, key, params, *, n_new,
                  gamma_max, stop, pad_id, return_logprobs, limit=None) -> SpecState:
    """Prefill of the loop (before round 0): both models on ``pad | prompt`` (``[B, P]`` left-padded), the first
    token from the target (``key``; as in AR generation), counters at their prefill values. ``n_new``: the static
    cap on emitted tokens (buffer size); ``limit``: the cap a row finishes at (default ``n_new``; ``[B]`` per-row
    caps <= ``n_new`` in the serving engine, :mod:`jaxtok.decode.serving`)."""
    target = nnx.merge(target_graphdef, target_state)
    b, p = prompt.shape
    g = gamma_max
    w, s = seq_layout(b, p, n_new, g)
    limit = n_new if limit is None else limit
    seq = jnp.full((b, s), pad_id, jnp.int32).at[:, w:w + p].set(prompt)
    seq_valid = jnp.zeros((b, s), bool).at[:, w:w + p].set(prompt_valid)
    out = target(seq[:, :w + p], valid=seq_valid[:, :w + p], cache=KVCache.init(target.cfg, b, s),
                 logits_at=jnp.full((b, 1), w + p - 1, jnp.int32))
    first = sample_rows(key, out.logits[:, 0], params)
    # per-token target log-probs, aligned with ``seq`` (return_logprobs only): [B, S] float32
    lp_seq = (jnp.zeros((b, s), jnp.float32).at[:, w + p].set(token_logprob(out.logits[:, 0], first, params))
              if return_logprobs else None)
    seq = seq.at[:, w + p].set(first)
    seq_valid = seq_valid.at[:, w + p].set(True)
    done = jnp.any(first[:, None] == stop[None, :], axis=-1)
    count = jnp.ones((b,), jnp.int32)
    routes = len(drafter.drafters) if isinstance(drafter, RoutedDrafter) else 1

    def zeros(*shape):
        return jnp.zeros((b,) + shape, jnp.int32)

    return SpecState(
        round=jnp.int32(0), seq=seq, seq_valid=seq_valid, lp_seq=lp_seq, count=count, done=done,
        finished=done | (count >= limit), cache=out.cache, dstate=drafter.init(seq, seq_valid, w + p, s),
        pstate=policy.init(b, g), target_forwards=jnp.int32(1), draft_forwards=jnp.int32(drafter.prefill_forwards),
        rounds=zeros(), accepted=zeros(), drafted=zeros(), accepted_by_position=zeros(g),
        drafted_by_position=zeros(g), route_counts=zeros(routes), verify_tokens=jnp.int32(0),
    )


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    """Static settings of :func:`spec_round`: prompt width ``p``, γmax ``g``, stop ids, verification ``widths``
    (:func:`verify_widths`), ``pad_id``, the ``poison`` test hook, ``greedy`` (all rows at temperature 0),
    ``return_logprobs`` and ``verify_chunk`` (0: one verification forward; c > 0: frontier verification in chunks
    of c positions with early pruning, :func:`_verify`)."""

    p: int
    g: int
    stop_tokens: tuple
    widths: tuple
    pad_id: int
    poison: bool = False
    greedy: bool = False
    return_logprobs: bool = False
    verify_chunk: int = 0


def spec_round(st: SpecState, target_graphdef, target_state, drafter, policy, rng, params, limit,
                rc: RoundConfig) -> SpecState:
    """One draft -> verify -> accept round (module docstring, steps 1-5) on every row of ``st``; ``limit``: the cap
    on emitted tokens (the int ``max_new_tokens``, or ``[B]`` per row in the serving engine)."""
    p, g, pad_id = rc.p, rc.g, rc.pad_id
    w = g + 1
    b = st.count.shape[0]
    stop = jnp.asarray(rc.stop_tokens if rc.stop_tokens else (-1,), jnp.int32)
    routes = st.route_counts.shape[1]
    live = ~st.finished
    n = w + p + st.count  # committed length; seq[n-1] is the newest token
    k_draft, k_accept = jax.random.split(jax.random.fold_in(rng, st.round + 1))
    gamma = jnp.clip(policy.gamma_for_round(st.pstate, g, b, live), 0, g)
    ctx = DraftContext(seq=st.seq, seq_valid=st.seq_valid, n=n, live=live, gamma=gamma, params=params,
                       key=k_draft, gamma_max=g, window=w, pad_id=pad_id, refeed=refeed_width(w))
    d = drafter.draft(st.dstate, ctx, policy)
    dvalid = d.valid & live[:, None]
    last = jnp.take_along_axis(st.seq, (n - 1)[:, None], axis=1)  # [B, 1]
    vcache, nacc, emitted, lp, vforwards, vtokens = _verify(
        target_graphdef, target_state, st.cache, last, d, dvalid, live, k_accept, params, rc.widths, pad_id,
        rc.greedy, rc.return_logprobs, rc.verify_chunk)
    n_emit, hit = kept_tokens(emitted, nacc, st.count, live, stop, limit)
    keep = jnp.arange(g + 1)[None, :] < n_emit[:, None]
    count = st.count + n_emit
    done = st.done | (live & hit)
    # target KV: keep last + accepted drafts; frozen rows back to their old length
    cache = vcache.rollback(jnp.where(live, n + nacc, n - 1))
    dstate = d.state
    if rc.poison:
        cache = poison_stale(cache)
        dstate = jax.tree.map(lambda x: poison_stale(x) if isinstance(x, KVCache) else x, dstate,
                              is_leaf=lambda x: isinstance(x, KVCache))
    pstate = policy.update(st.pstate, gamma, jnp.sum(dvalid, axis=1), nacc, draft_stats(d.logits, dvalid), live)
    acc_mask = (jnp.arange(g)[None, :] < nacc[:, None]) & dvalid
    return SpecState(
        round=st.round + 1, seq=rows_write(st.seq, jnp.where(keep, emitted, pad_id), n),
        seq_valid=rows_write(st.seq_valid, keep, n),
        lp_seq=rows_write(st.lp_seq, jnp.where(keep, lp, 0.0), n) if rc.return_logprobs else None,
        count=count, done=done, finished=done | (count >= limit), cache=cache, dstate=dstate, pstate=pstate,
        target_forwards=st.target_forwards + vforwards, draft_forwards=st.draft_forwards + d.forwards,
        rounds=st.rounds + live, accepted=st.accepted + jnp.where(live, nacc, 0),
        drafted=st.drafted + jnp.sum(dvalid, axis=1),
        accepted_by_position=st.accepted_by_position + acc_mask,
        drafted_by_position=st.drafted_by_position + dvalid,
        route_counts=st.route_counts + jax.nn.one_hot(d.choice, routes, dtype=jnp.int32) * live[:, None],
        verify_tokens=st.verify_tokens + vtokens,
    )


def _speculative_core(target_graphdef, target_state, drafter, policy, prompt, prompt_valid, rng, params,
                      max_new_tokens, gamma_max, stop_tokens, pad_id, poison, greedy, return_logprobs=False,
                      verify_chunk=0):
    _TRACES[0] += 1
    b, p = prompt.shape
    n_new, g = max_new_tokens, gamma_max
    stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    state = spec_prefill(target_graphdef, target_state, drafter, policy, prompt, prompt_valid,
                          jax.random.fold_in(rng, 0), params, n_new=n_new, gamma_max=g, stop=stop, pad_id=pad_id,
                          return_logprobs=return_logprobs)
    rc = RoundConfig(p=p, g=g, stop_tokens=tuple(stop_tokens), widths=verify_widths(policy, drafter, g, b),
                      pad_id=pad_id, poison=poison, greedy=greedy, return_logprobs=return_logprobs,
                      verify_chunk=verify_chunk)
    st = jax.lax.while_loop(
        lambda st: ~jnp.all(st.finished),
        lambda st: spec_round(st, target_graphdef, target_state, drafter, policy, rng, params, n_new, rc), state)
    return spec_result(st, p, n_new, g, pad_id, return_logprobs)


def spec_result(st: SpecState, p: int, n_new: int, g: int, pad_id: int, return_logprobs: bool,
                 rows=None) -> SpeculativeResult:
    """:class:`SpeculativeResult` of a loop state (the emitted tokens are ``seq[w + p : w + p + N]``)."""
    w = g + 1
    out_valid = jnp.arange(n_new)[None, :] < st.count[:, None]
    return SpeculativeResult(
        tokens=jnp.where(out_valid, st.seq[:, w + p:w + p + n_new], pad_id), valid=out_valid, lengths=st.count,
        done=st.done, target_forwards=st.target_forwards, draft_forwards=st.draft_forwards, rounds=st.rounds,
        accepted=st.accepted, drafted=st.drafted, accepted_by_position=st.accepted_by_position,
        drafted_by_position=st.drafted_by_position, route_counts=st.route_counts,
        logprobs=(jnp.where(out_valid, st.lp_seq[:, w + p:w + p + n_new], 0.0) if return_logprobs else None),
    )


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


def check_length(name: str, cfg, p: int, n: int, g: int) -> None:
    """ValueError naming model ``name`` when prompt ``p`` + ``n`` new tokens + γmax ``g`` + 1 (the loop's widest
    position) exceed its ``max_position_embeddings``."""
    need = p + n + g + 1
    if need > cfg.max_position_embeddings:
        raise ValueError(f"prompt: length {p} + max_new_tokens {n} + draft_len {g} + 1 = {need} positions exceed "
                         f"the {name}'s max_position_embeddings={cfg.max_position_embeddings}")


def check_verify_chunk(verify_chunk, sampling: SamplingParams) -> None:
    """``verify_chunk`` must be an integer >= 0, and > 0 only with greedy sampling (frontier pruning reads the
    greedy verdict chunk by chunk; the exact rule for sampled rows draws its uniforms over the whole draft)."""
    if isinstance(verify_chunk, bool) or not isinstance(verify_chunk, (int, np.integer)) or verify_chunk < 0:
        raise ValueError(f"verify_chunk={verify_chunk!r}: allowed an integer >= 0 (0 = one verification forward)")
    if verify_chunk and not sampling.all_greedy:
        raise ValueError(f"verify_chunk={verify_chunk}: frontier verification is implemented for greedy sampling "
                         f"only (temperature 0); allowed verify_chunk=0 with sampled rows")


def place_drafter(drafter: Drafter, mesh) -> Drafter:
    """``drafter`` with its model weights placed on ``mesh`` as their ``logical_axes`` declare (a model drafter's
    or DEER's heads / MLP / vocabulary on ``tensor``, like the target's); n-gram drafters hold no arrays; TAPS
    places each of its drafters."""
    if isinstance(drafter, RoutedDrafter):
        return RoutedDrafter(tuple(place_drafter(d, mesh) for d in drafter.drafters))
    if isinstance(drafter, (ModelDrafter, DeerDrafter)):
        return dataclasses.replace(drafter, state=place(drafter.state, param_shardings(drafter.state, mesh)))
    return drafter


def as_drafter(drafter) -> Drafter:
    """A :class:`Drafter`, or an NNX decoder wrapped as one (a masked-diffusion LM -> DEER, else AR)."""
    if isinstance(drafter, Drafter):
        return drafter
    if isinstance(drafter, nnx.Module) and hasattr(drafter, "cfg"):
        return DeerDrafter.of(drafter) if drafter.cfg.is_diffusion else ModelDrafter.of(drafter)
    raise ValueError(f"drafter={type(drafter).__name__}: allowed a Drafter (ModelDrafter, NgramDrafter, DeerDrafter, "
                     f"RoutedDrafter) or a jaxtok Decoder")


def speculative_generate(
    target: nnx.Module,
    drafter,
    prompt,
    prompt_valid,
    *,
    max_new_tokens: int,
    draft_len: int = 4,
    policy: Optional[DraftPolicy] = None,
    sampling: SamplingParams = SamplingParams(),
    stop_tokens: Sequence[int] = (DEFAULT_EOS_ID,),
    rng: jax.Array,
    pad_id: int = DEFAULT_PAD_ID,
    poison_stale_cache: bool = False,
    mesh: Optional[Mesh] = None,
    return_logprobs: bool = False,
    verify_chunk: int = 0,
) -> SpeculativeResult:
    """Lossless speculative decoding of a left-padded prompt batch in one jitted call (§A1).

    Args:
      target: the verifier, a ``jaxtok.models.Decoder``.
      drafter: a :class:`Drafter` or a Decoder (AR -> :class:`ModelDrafter`, masked diffusion -> :class:`DeerDrafter`).
      prompt / prompt_valid: ``[B, P]`` LEFT-padded ids and mask (at least one token per row).
      max_new_tokens: N, cap on emitted tokens per row.
      draft_len: γmax, the static cap on drafts per round (the target verifies γmax + 1 positions per round).
      policy: a :class:`~jaxtok.decode.draft_policies.DraftPolicy` (default ``fixed``: γmax every round).
      sampling: the sampling transform S (:class:`~jaxtok.sampling.SamplingParams`: temperature, top-k, top-p,
        min-p; scalar or ``[B]``), applied identically to target and drafter; rows with temperature 0 use greedy
        verification (token-identical to greedy AR).
      stop_tokens: ids that end a row (emitted, then frozen). rng: PRNG key (round r uses ``fold_in(rng, r+1)``).
      pad_id: filler after a row's tokens.
      poison_stale_cache: test hook: NaN-fill stale KV slots of the target and model drafters after every round.
      mesh: when given, the rows (and every per-row buffer of the loop: committed sequence, KV caches, acceptance
        counters) are sharded over the mesh's batch axes (``data``, ``fsdp``) and the target's and model drafters'
        weights as their ``logical_axes`` declare (heads / MLP / vocabulary on ``tensor``); greedy output equals
        the unsharded run token for token (tests/test_speculative_sharded.py).
      return_logprobs: also return ``logprobs [B, N]``, each emitted token's log-probability under the target's
        processed distribution (what ``generate`` returns; the RL sampler log-probs of speculative rollouts).
      verify_chunk: 0 (default): one verification forward per round. c > 0: FASER's frontier verification with
        early pruning (§A7, :func:`_frontier_logits`): the γ + 1 verified positions in chunks of c, a chunk skipped
        when every row has a rejection in an earlier one. Greedy sampling only (exact: the same greedy verdict).

    Returns:
      :class:`SpeculativeResult` (tokens, valid, lengths, done and the acceptance metrics).
    """
    prompt = prompt if isinstance(prompt, jax.Array) else np.asarray(prompt)
    prompt_valid = prompt_valid if isinstance(prompt_valid, jax.Array) else np.asarray(prompt_valid)
    stop_tokens = tuple(int(t) for t in stop_tokens)
    _validate(target, prompt, prompt_valid, max_new_tokens, sampling, stop_tokens, pad_id, 0, mesh)
    if isinstance(draft_len, bool) or not isinstance(draft_len, (int, np.integer)) or draft_len < 1:
        raise ValueError(f"draft_len={draft_len!r}: allowed a positive integer")
    drafter = as_drafter(drafter)
    policy = Fixed() if policy is None else policy
    if not isinstance(policy, DraftPolicy):
        raise ValueError(f"policy={policy!r}: allowed a DraftPolicy (see jaxtok.decode.draft_policies.build_policy)")
    policy.check(int(draft_len))
    if policy.needs_hidden and not drafter.has_hidden:
        raise ValueError(f"policy {type(policy).__name__} needs drafter hidden states; drafter "
                         f"{type(drafter).__name__} has none (use an autoregressive ModelDrafter)")
    if drafter.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"drafter: vocab_size {drafter.vocab_size} differs from the target's "
                         f"{target.cfg.vocab_size}")
    check_verify_chunk(verify_chunk, sampling)
    b, p = prompt.shape
    check_length("target", target.cfg, p, int(max_new_tokens), int(draft_len))
    for d in (drafter.drafters if isinstance(drafter, RoutedDrafter) else (drafter,)):
        if isinstance(d, (ModelDrafter, DeerDrafter)):
            check_length("drafter", cfg_of(d.graphdef, d.state), p, int(max_new_tokens), int(draft_len))
    params = sampling.per_row(b)
    prompt_valid = jnp.asarray(prompt_valid, bool)
    prompt = jnp.where(prompt_valid, jnp.asarray(prompt, jnp.int32), pad_id)
    graphdef, state = nnx.split(target)
    if mesh is not None:  # weights by their logical axes, rows (and so every per-row loop buffer) on the batch axes
        state = place(state, param_shardings(state, mesh))
        drafter = place_drafter(drafter, mesh)
        policy = place(policy, NamedSharding(mesh, PartitionSpec()))  # a policy's head weights: replicated
        prompt, prompt_valid, params = place((prompt, prompt_valid, params), batch_sharding(mesh))
        rng = place(rng, NamedSharding(mesh, PartitionSpec()))
    return _speculative_jit(graphdef, state, drafter, policy, prompt, prompt_valid, rng, params,
                            max_new_tokens=int(max_new_tokens), gamma_max=int(draft_len), stop_tokens=stop_tokens,
                            pad_id=int(pad_id), poison=bool(poison_stale_cache), greedy=sampling.all_greedy,
                            mesh=mesh, return_logprobs=bool(return_logprobs), verify_chunk=int(verify_chunk))


# ----------------------------------------------------------------------------------------------------------------
# EAD: entropy-adaptive switching between a small and a large model (lossy, §A4)
# ----------------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EADResult:
    """Output of :func:`ead_generate`: ``tokens/valid [B, N]``, ``lengths/done [B]``, ``from_large [B, N]`` (token
    produced by the large model), ``small_forwards/large_forwards []`` batched forwards (prefill included)."""

    tokens: jax.Array
    valid: jax.Array
    lengths: jax.Array
    done: jax.Array
    from_large: jax.Array
    small_forwards: jax.Array
    large_forwards: jax.Array

    @property
    def large_share(self) -> float:
        """Share of emitted tokens produced by the large model."""
        return float(np.sum(self.from_large) / max(np.sum(self.lengths), 1))


def _sync_logits(graphdef, state, cache: KVCache, seq, seq_valid, n, use, chunk: int):
    """Bring ``cache`` (valid for ``seq[:lengths]``) up to ``n-1`` for rows in ``use`` by chunked catch-up forwards,
    then run the newest token ``seq[n-1]`` -> ``(logits [B, V], cache, forwards)``. Other rows are untouched."""
    target = n - 1

    def cond(c):
        return jnp.any(use & (c[0].lengths < target))

    def body(c):
        cache, f = c
        model = nnx.merge(graphdef, state)
        start = cache.lengths
        pos = start[:, None] + jnp.arange(chunk)[None, :]
        toks = rows_slice(seq, start, chunk)
        v = rows_slice(seq_valid, start, chunk) & use[:, None] & (pos < target[:, None])
        o = model(toks, valid=v, cache=cache, return_logits=False)
        return o.cache.rollback(jnp.where(use, jnp.minimum(start + chunk, target), start)), f + 1

    cache, f = jax.lax.while_loop(cond, body, (cache, jnp.int32(0)))
    model = nnx.merge(graphdef, state)
    before = cache.lengths
    newest = jnp.take_along_axis(seq, target[:, None], axis=1)  # [B, 1]
    o = model(newest, valid=use[:, None], cache=cache)
    return o.logits[:, 0], o.cache.rollback(jnp.where(use, before + 1, before)), f + 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _EADState:
    """Loop carry of :func:`_ead_jit`: ``seq / seq_valid [B, P + N + chunk]`` prompt and emitted tokens, ``count``
    ``done`` ``finished [B]`` as in :class:`SpecState`; each model's KV cache (``small`` / ``large``, exact for the
    tokens that model has seen) and batched forwards; ``mode [B]`` True = the large model, ``dwell [B]`` tokens
    since the last switch, ``hist [B, window]`` the entropy ring buffer (bits), ``from_large [B, N + 1]``."""

    seq: jax.Array
    seq_valid: jax.Array
    count: jax.Array
    done: jax.Array
    finished: jax.Array
    small: KVCache
    large: KVCache
    small_forwards: jax.Array
    large_forwards: jax.Array
    mode: jax.Array
    dwell: jax.Array
    hist: jax.Array
    from_large: jax.Array


@functools.partial(jax.jit, static_argnames=("small_graphdef", "large_graphdef", "max_new_tokens", "stop_tokens",
                                             "pad_id", "args"))
def _ead_jit(small_graphdef, small_state, large_graphdef, large_state, prompt, prompt_valid, rng, params, *,
             max_new_tokens, stop_tokens, pad_id, args: EADArgs):
    _TRACES[0] += 1
    b, p = prompt.shape
    n_new, c = max_new_tokens, args.chunk
    s = p + n_new + c
    stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    seq = jnp.full((b, s), pad_id, jnp.int32).at[:, :p].set(prompt)
    seq_valid = jnp.zeros((b, s), bool).at[:, :p].set(prompt_valid)

    def prefill(graphdef, state):  # every prompt token but the newest (the loop's first step runs that one)
        model = nnx.merge(graphdef, state)
        cache = KVCache.init(model.cfg, b, s)
        if p == 1:
            return cache
        return model(seq[:, :p - 1], valid=seq_valid[:, :p - 1], cache=cache, return_logits=False).cache

    w = args.window
    vocab = nnx.merge(small_graphdef, small_state).cfg.vocab_size
    state = _EADState(
        seq=seq, seq_valid=seq_valid, count=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
        finished=jnp.zeros((b,), bool), small=prefill(small_graphdef, small_state),
        large=prefill(large_graphdef, large_state), small_forwards=jnp.int32(p > 1), large_forwards=jnp.int32(p > 1),
        mode=jnp.full((b,), args.start == "large"), dwell=jnp.zeros((b,), jnp.int32),
        hist=jnp.zeros((b, w), jnp.float32), from_large=jnp.zeros((b, n_new + 1), bool),
    )

    def step(st: _EADState) -> _EADState:
        """One token per live row from its current model, then the entropy window and the switch rule."""
        live = ~st.finished
        n = p + st.count
        use_l = live & st.mode
        use_s = live & ~st.mode
        zeros = jnp.zeros((b, vocab), jnp.float32)

        def run(graphdef, state, cache, use):
            return jax.lax.cond(
                jnp.any(use),
                lambda: _sync_logits(graphdef, state, cache, st.seq, st.seq_valid, n, use, c),
                lambda: (zeros, cache, jnp.int32(0)))

        ls, cache_s, fs = run(small_graphdef, small_state, st.small, use_s)
        ll, cache_l, fl = run(large_graphdef, large_state, st.large, use_l)
        logits = jnp.where(use_l[:, None], ll, ls)
        tok = sample_rows(jax.random.fold_in(rng, jnp.max(st.count)), logits, params)
        tok = jnp.where(live, tok, pad_id)
        ent = draft_stats(logits[:, None], live[:, None]).entropy_bits[:, 0]  # bits, untempered
        slot = jax.nn.one_hot(st.count % w, w, dtype=bool) & live[:, None]
        hist = jnp.where(slot, ent[:, None], st.hist)
        filled = jnp.minimum(st.count + 1, w)
        mean_h = jnp.sum(jnp.where(jnp.arange(w)[None, :] < filled[:, None], hist, 0.0), axis=1) / filled
        mode, dwell = ead_switch(st.mode, st.dwell + 1, mean_h, args)
        count = st.count + live
        done = st.done | (live & jnp.any(tok[:, None] == stop[None, :], axis=-1))
        return _EADState(
            seq=rows_write(st.seq, tok[:, None], n), seq_valid=rows_write(st.seq_valid, live[:, None], n),
            count=count, done=done, finished=done | (count >= n_new), small=cache_s, large=cache_l,
            small_forwards=st.small_forwards + fs, large_forwards=st.large_forwards + fl,
            mode=jnp.where(live, mode, st.mode), dwell=jnp.where(live, dwell, st.dwell), hist=hist,
            from_large=rows_write(st.from_large, use_l[:, None], st.count),
        )

    st = jax.lax.while_loop(lambda st: ~jnp.all(st.finished), step, state)
    valid = jnp.arange(n_new)[None, :] < st.count[:, None]
    return EADResult(tokens=jnp.where(valid, st.seq[:, p:p + n_new], pad_id), valid=valid, lengths=st.count,
                     done=st.done, from_large=st.from_large[:, :n_new] & valid, small_forwards=st.small_forwards,
                     large_forwards=st.large_forwards)


def ead_generate(
    small: nnx.Module,
    large: nnx.Module,
    prompt,
    prompt_valid,
    *,
    max_new_tokens: int,
    args: EADArgs = EADArgs(),
    sampling: SamplingParams = SamplingParams(),
    stop_tokens: Sequence[int] = (DEFAULT_EOS_ID,),
    rng: jax.Array,
    pad_id: int = DEFAULT_PAD_ID,
) -> EADResult:
    """Entropy Adaptive Decoding (lossy, §A4): each token comes from the small or the large model, switched by
    the rolling mean entropy (:func:`ead_switch`); both keep KV caches, and a model that re-joins first catches up
    on the tokens the other produced. Rows of a batch choosing different models run both. One jitted call.

    Arguments as :func:`speculative_generate`; ``args`` an :class:`EADArgs`. Returns :class:`EADResult`
    (``large_share`` = share of tokens from the large model).
    """
    prompt = prompt if isinstance(prompt, jax.Array) else np.asarray(prompt)
    prompt_valid = prompt_valid if isinstance(prompt_valid, jax.Array) else np.asarray(prompt_valid)
    stop_tokens = tuple(int(t) for t in stop_tokens)
    _validate(large, prompt, prompt_valid, max_new_tokens, sampling, stop_tokens, pad_id, 0, None)
    if small.cfg.vocab_size != large.cfg.vocab_size:
        raise ValueError(f"small: vocab_size {small.cfg.vocab_size} differs from large's {large.cfg.vocab_size}")
    if not isinstance(args, EADArgs):
        raise ValueError(f"args={args!r}: allowed an EADArgs")
    b, p = prompt.shape
    for name, m in (("small", small), ("large", large)):
        check_length(name, m.cfg, p, int(max_new_tokens), 0)
    params = sampling.per_row(b)
    prompt_valid = jnp.asarray(prompt_valid, bool)
    prompt = jnp.where(prompt_valid, jnp.asarray(prompt, jnp.int32), pad_id)
    sg, ss = nnx.split(small)
    lg, ls = nnx.split(large)
    return _ead_jit(sg, ss, lg, ls, prompt, prompt_valid, rng, params, max_new_tokens=int(max_new_tokens),
                    stop_tokens=stop_tokens, pad_id=int(pad_id), args=args)
