"""Commit policies of the diffusion sampler (decode_methods.md Part B), registered in
``jaxtok.registry.COMMIT_POLICIES``.

A policy is a pure function ``fn(info, args, state, spec, heads) -> Decision`` called once per denoising step by
:func:`jaxtok.decode.diffusion_generate`:

- ``info`` (:class:`StepInfo`): the step's position-aligned logits ``[B, N, V]``, proposals ``x0 [B, N]``, their
  confidence ``conf [B, N]`` (``softmax(logits)[x0]`` of the un-tempered logits, §0.2), the masks ``eligible``
  (still masked, inside the row's active block, row not done), ``masked`` (still masked anywhere), the active block
  ``[lo, hi)`` per row, the step counters and per-row PRNG keys.
- ``args``: the policy's frozen argument dataclass (every one extends :class:`SamplerArgs`, the loop settings).
- ``state``: the policy's per-row carry (e.g. BACD's confidence sums), from the entry's ``init_state``.
- ``spec`` (:class:`LoopSpec`): static loop constants (generation length, block length, steps per block,
  terminators).
- ``heads``: learned modules a policy needs (Learn2PD's ``filter``).

``Decision.commit [B, N]`` may only select masked positions (the loop intersects with ``masked``); ``x0`` may be
rewritten (ETE's exploratory samples, EoT fills). Committed tokens are never re-masked. Every policy guarantees
progress: threshold-like rules always add the top-1 eligible position; scheduled rules (``llada``, ``eoser``,
``ass``, ``learn2pd``) commit the rest of the block at their last scheduled step, so every loop ends within its
cap. Terminators (``spec.stop_ids``: ``<eos>`` and the Rainbow pads) are EOS-class for every EOS-aware rule.

Loop hooks: each policy registers a :class:`jaxtok.specs.CommitPolicySpec` (``@register(name, Args, **spec)``),
which the loop reads by attribute: ``init_state(B, N, args)``, ``block_rule`` (adaptive block length, AdaBlock),
``heads`` (names of required learned modules), ``lookahead`` (the loop passes ``heads["lookahead"](pos [B, C],
tok [B, C]) -> logits [B, C, N, V]``: one batched forward of C copies of the current state, each with one more
token committed), ``needs_hidden`` (``info.hidden`` is filled), ``verifier`` (``heads["verify"](drafts [B, N],
start [B]) -> logits [B, K, V]``: the same model in AR mode — causal attention, i.e. block size 1 — predicting
generation index ``start + c`` with the drafts filled before it), ``window`` (Dystruct: the model sees only
generated positions ``< state["window"] [B]``, the rest are padding and never eligible), ``block_local`` (the rule
reads only the active block: the ``dual`` and ``block`` caches may serve it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp

from jaxtok.registry import COMMIT_POLICIES
from jaxtok.sampling import count_leading_true, first_true_index, gumbel_argmax, residual_distribution, topk_mask

_DEPRIORITISE = 2.0  # subtracted from a confidence in [0, 1] to rank it below every other, staying finite


# ----------------------------------------------------------------------------------------------------------------
# Step context and shared argument base
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerArgs:
    """Loop settings shared by every policy (fields of every policy's argument dataclass).

    ``block_len``: semi-autoregressive block length K (a block-causal model: its block size). ``steps``: nominal
    total denoising steps for scheduled policies (None = the generation length, one token per step); per block
    ``steps // num_blocks``. ``cache``: ``none`` (full forward every step), ``prefix`` / ``dual`` (Fast-dLLM's
    approximate caches, refreshed when a row starts a block) or ``block`` (exact block KV cache, block-causal
    models only). ``cfg_scale``: LLaDA's unsupervised classifier-free guidance w (0 = off; one batched
    2B forward). ``shift_logits``: the model's raw logit at i-1 predicts token i (an AR-adapted checkpoint whose
    config lacks Dream's ``shift_logits``). ``stop_early``: a row stops once a terminator is committed and every
    position before it is decoded (the rest is filled with ``pad_id``)."""

    block_len: int = 32
    steps: Optional[int] = None
    cache: Literal["none", "prefix", "dual", "block"] = "none"
    cfg_scale: float = 0.0
    shift_logits: bool = False
    stop_early: bool = True

    def __post_init__(self):
        if self.block_len < 1:
            raise ValueError(f"block_len={self.block_len}: must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be >= 1 (or null = generation length)")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Static constants of one sampler call (hashable)."""

    gen_len: int
    block_len: int
    steps: int  # nominal total steps
    steps_per_block: int
    stop_ids: tuple[int, ...]
    mask_id: int
    temperature: float = 0.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One denoising step of every row (shapes ``B`` rows, ``N`` generated positions, ``V`` vocabulary).

    ``logits [B,N,V]`` f32 position-aligned; ``x0 [B,N]`` proposals; ``conf [B,N]`` p(x0) un-tempered; ``eligible``,
    ``masked`` ``[B,N]`` bool; ``is_stop [B,N]`` x0 is a terminator; ``lo, hi [B]`` active block ``[lo, hi)`` in
    generation indices; ``block_step [B]`` steps already spent in the block; ``block_masks [B]`` masked positions of
    the block when it started; ``step []`` global step (0-based); ``keys [B]`` per-row PRNG keys of this step."""

    logits: jax.Array
    x0: jax.Array
    conf: jax.Array
    eligible: jax.Array
    masked: jax.Array
    is_stop: jax.Array
    lo: jax.Array
    hi: jax.Array
    block_step: jax.Array
    block_masks: jax.Array
    step: jax.Array
    keys: jax.Array
    hidden: Optional[jax.Array] = None  # [B, N, D] final-normed hidden states (spec needs_hidden)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decision:
    """``commit [B,N]`` positions to reveal now, ``x0 [B,N]`` the tokens they take, ``state`` the policy carry,
    ``nfe [B]`` extra forwards the policy ran (None: none)."""

    commit: jax.Array
    x0: jax.Array
    state: Any = None
    nfe: Optional[jax.Array] = None  # [B] extra forwards this step (Info-Gain's lookahead)


register = COMMIT_POLICIES.register  # @register(name, ArgsClass, **CommitPolicySpec fields)


# ----------------------------------------------------------------------------------------------------------------
# Shared primitives (§0.3, §0.5)
# ----------------------------------------------------------------------------------------------------------------


def num_transfer_tokens(n: jax.Array, steps: int, s: jax.Array) -> jax.Array:
    """LLaDA's schedule (§0.5): of ``n`` masks decoded in ``steps`` steps, step ``s`` (0-based) commits
    ``n // steps + (s < n % steps)`` (the remainder goes to the first steps). Traced ``n [B]``, ``s [B]``."""
    n = jnp.asarray(n, jnp.int32)
    return n // steps + (jnp.asarray(s, jnp.int32) < n % steps).astype(jnp.int32)


def top1(conf: jax.Array, eligible: jax.Array) -> jax.Array:
    """``[B, N]`` the most confident eligible position of each row (none in rows without eligible positions)."""
    return topk_mask(conf, 1, eligible)


def row_uniform(keys: jax.Array, n: int, salt: int) -> jax.Array:
    """``[B, n]`` uniforms in [0, 1) from per-row keys (batch-invariant: a row's draw ignores the other rows)."""
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, salt), (n,), jnp.float32))(keys)


def scheduled_k(info: StepInfo, spec: LoopSpec, k: jax.Array) -> jax.Array:
    """``k [B]`` unless this is the block's last scheduled step (or later): then every eligible position."""
    last = info.block_step >= spec.steps_per_block - 1
    return jnp.where(last, jnp.sum(info.eligible, axis=-1), k)


def eos_scaled(conf: jax.Array, is_stop: jax.Array, factor) -> jax.Array:
    """EOSER (§B19): the confidence of terminator proposals times ``factor`` (``[]`` or ``[B]``)."""
    f = jnp.asarray(factor, jnp.float32)
    f = f[:, None] if f.ndim == 1 else f
    return jnp.where(is_stop, conf * f, conf)


def threshold_commit(conf: jax.Array, eligible: jax.Array, tau) -> jax.Array:
    """Fast-dLLM threshold rule (§B10): ``{argmax conf} ∪ {i eligible : conf_i >= τ}`` (τ ``[]`` or ``[B]``)."""
    tau = jnp.asarray(tau, jnp.float32)
    tau = tau[:, None] if tau.ndim == 1 else tau
    return (eligible & (conf >= tau)) | top1(conf, eligible)


def factor_commit(conf: jax.Array, eligible: jax.Array, factor: float) -> jax.Array:
    """Fast-dLLM factor rule (§B10): sort eligible confidences ``c_(1) >= c_(2) >= ...``; keep the leading run with
    ``c_(n) >= 1 - f/(n+1)`` (the first always kept); the reference's quirk commits all ``N`` when the run fails only
    at the last index; at least one."""
    n_elig = jnp.sum(eligible, axis=-1)  # [B]
    scores = jnp.where(eligible, conf, -jnp.inf)
    srt = -jnp.sort(-scores, axis=-1)  # [B, N] descending, -inf after the eligible ones
    n = jnp.arange(1, conf.shape[-1] + 1, dtype=jnp.float32)
    thr = jnp.where(n == 1, -1.0, 1.0 - factor / (n + 1.0))
    run = count_leading_true((srt >= thr) & jnp.isfinite(srt))  # [B]
    k = jnp.where(run >= n_elig - 1, n_elig, jnp.maximum(run, 1))
    return topk_mask(conf, k, eligible)


# ----------------------------------------------------------------------------------------------------------------
# B9 LLaDA
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LLaDAArgs(SamplerArgs):
    """``remasking``: ``low_confidence`` (commit the most confident) or ``random`` (uniform scores).
    ``eos_conf_inf``: terminator proposals are ranked last (LLaDA's ``confidence_eos_eot_inf``, intended form)."""

    remasking: Literal["low_confidence", "random"] = "low_confidence"
    eos_conf_inf: bool = False


def _llada_scores(info: StepInfo, args, spec: LoopSpec) -> jax.Array:
    conf = info.conf
    if getattr(args, "remasking", "low_confidence") == "random":
        conf = row_uniform(info.keys, conf.shape[-1], 1)
    if getattr(args, "eos_conf_inf", False):
        conf = jnp.where(info.is_stop, conf - _DEPRIORITISE, conf)
    return conf


@register("llada", LLaDAArgs, block_local=True)
def llada(info: StepInfo, args: LLaDAArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """LLaDA (§B9): commit the top-``k_s`` eligible positions by confidence, ``k_s`` from
    :func:`num_transfer_tokens` over the block's masks and ``steps_per_block``."""
    k = scheduled_k(info, spec, num_transfer_tokens(info.block_masks, spec.steps_per_block, info.block_step))
    return Decision(topk_mask(_llada_scores(info, args, spec), k, info.eligible), info.x0, state)


# ----------------------------------------------------------------------------------------------------------------
# B10 Fast-dLLM
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ThresholdArgs(SamplerArgs):
    """``threshold`` τ in (0, 1] (Fast-dLLM default 0.9; 1.0 = one token per step)."""

    threshold: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold}: allowed (0, 1]")


@register("threshold", ThresholdArgs, block_local=True)
def threshold(info: StepInfo, args: ThresholdArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """Fast-dLLM parallel decoding, threshold rule (§B10)."""
    return Decision(threshold_commit(info.conf, info.eligible, args.threshold), info.x0, state)


def top2_margin(logits: jax.Array) -> jax.Array:
    """Top-probability margin ``p_(1) − p_(2)`` per position (Kim et al. 2025, "Train for the Worst, Plan for the
    Best", adaptive unmasking by margin): ``logits [B, N, V]`` → ``[B, N]`` in [0, 1], float32, un-tempered."""
    top2 = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), 2)[0]  # [B, N, 2]
    return top2[..., 0] - top2[..., 1]


@dataclasses.dataclass(frozen=True)
class MarginArgs(SamplerArgs):
    """``margin`` δ in (0, 1]: commit positions whose top-1 − top-2 probability gap reaches δ (1.0 = one token per
    step, the widest-margin position first)."""

    margin: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.margin <= 1.0:
            raise ValueError(f"margin={self.margin}: allowed (0, 1]")


@register("margin", MarginArgs, block_local=True)
def margin(info: StepInfo, args: MarginArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """Margin rule: Fast-dLLM's parallel threshold rule (§B10) on the top-2 probability margin instead of the
    top-1 confidence — ``{argmax margin} ∪ {i eligible : margin_i >= δ}`` — the margin ordering of Kim et al.
    (2025) made parallel. A position whose mass is split between two tokens waits even when its top-1 probability is
    higher than another position's."""
    return Decision(threshold_commit(top2_margin(info.logits), info.eligible, args.margin), info.x0, state)


@dataclasses.dataclass(frozen=True)
class FactorArgs(SamplerArgs):
    """``factor`` f > 0 (reference default 1)."""

    factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.factor <= 0:
            raise ValueError(f"factor={self.factor}: must be > 0")


@register("factor", FactorArgs, block_local=True)
def factor(info: StepInfo, args: FactorArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """Fast-dLLM parallel decoding, factor rule (§B10)."""
    return Decision(factor_commit(info.conf, info.eligible, args.factor), info.x0, state)


# ----------------------------------------------------------------------------------------------------------------
# B11 Prophet
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProphetArgs(SamplerArgs):
    """``base``: the rule used until the early commit (``llada`` with ``remasking``, or ``threshold`` with
    ``threshold``). ``gaps``: top1−top2 *logit* gap thresholds of the early/mid/late phase, switching at
    ``phase_bounds`` of progress ``(step + 1) / steps``. ``region``: where the gap is averaged: ``block`` (the
    active block's masked positions) or ``answer`` (``answer_length`` generation indices from ``answer_offset``)."""

    base: Literal["llada", "threshold"] = "llada"
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    threshold: float = 0.9
    gaps: tuple[float, float, float] = (7.5, 5.0, 2.5)
    phase_bounds: tuple[float, float] = (0.33, 0.67)
    region: Literal["block", "answer"] = "block"
    answer_offset: int = 0
    answer_length: int = 5


def logit_gap(logits: jax.Array) -> jax.Array:
    """``[B, N]`` top1 − top2 logit."""
    top2 = jax.lax.top_k(logits.astype(jnp.float32), 2)[0]
    return top2[..., 0] - top2[..., 1]


@register("prophet", ProphetArgs)
def prophet(info: StepInfo, args: ProphetArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """Prophet (§B11): if the mean top1−top2 logit gap over the region reaches the phase threshold, commit every
    remaining mask of the row with its proposal ("all-in"); otherwise the base rule."""
    gap = logit_gap(info.logits)  # [B, N]
    idx = jnp.arange(spec.gen_len)[None, :]
    if args.region == "block":
        region = info.eligible
    else:
        region = (idx >= args.answer_offset) & (idx < args.answer_offset + args.answer_length) & info.masked.any(
            -1, keepdims=True)
    cnt = jnp.sum(region, axis=-1)
    g = jnp.where(cnt > 0, jnp.sum(jnp.where(region, gap, 0.0), -1) / jnp.maximum(cnt, 1), -jnp.inf)  # [B]
    progress = (info.step + 1).astype(jnp.float32) / spec.steps
    lo_b, hi_b = args.phase_bounds
    thr = jnp.where(progress < lo_b, args.gaps[0], jnp.where(progress < hi_b, args.gaps[1], args.gaps[2]))
    all_in = g >= thr  # [B]
    if args.base == "llada":
        base = llada(info, args, state, spec).commit
    else:
        base = threshold_commit(info.conf, info.eligible, args.threshold)
    return Decision(jnp.where(all_in[:, None], info.masked, base), info.x0, state)


# ----------------------------------------------------------------------------------------------------------------
# B12 AdaBlock
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdaBlockArgs(SamplerArgs):
    """``threshold`` τ of the in-block Fast-dLLM rule; ``delta`` δ, the delimiter confidence that sets the block end;
    ``delimiter_ids`` (task tokenizer: 29 = ';' step separator, 31 = '>' answer mark); ``window`` look-ahead as a
    fraction of the generation length (reference 0.25). ``block_len`` is the default block length."""

    threshold: float = 0.9
    delta: float = 0.3
    delimiter_ids: tuple[int, ...] = (29, 31)
    window: float = 0.25


def adablock_end(info: StepInfo, args: AdaBlockArgs, start: jax.Array, spec: LoopSpec) -> jax.Array:
    """AdaBlock block length (§B12): in the window ``[start, start + W)``, the most confident position predicting a
    delimiter ends the block if its confidence is >= δ; otherwise the default length. Returns the end ``[B]``."""
    n = spec.gen_len
    idx = jnp.arange(n)[None, :]
    remaining = n - start  # [B]
    w = jnp.minimum(max(int(args.window * n), 1), remaining)
    delim = jnp.isin(info.x0, jnp.asarray(args.delimiter_ids, jnp.int32))
    cand = delim & info.masked & (idx >= start[:, None]) & (idx < (start + w)[:, None])
    score = jnp.where(cand, info.conf, -1.0)
    best = jnp.argmax(score, axis=-1)  # [B]
    ok = jnp.max(score, axis=-1) >= args.delta
    return jnp.where(ok, best + 1, start + jnp.minimum(spec.block_len, remaining)).astype(jnp.int32)


@register("adablock", AdaBlockArgs, block_rule=adablock_end, block_local=True)
def adablock(info: StepInfo, args: AdaBlockArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """AdaBlock-dLLM (§B12): Fast-dLLM threshold decoding inside blocks whose length :func:`adablock_end` chose."""
    return Decision(threshold_commit(info.conf, info.eligible, args.threshold), info.x0, state)


# ----------------------------------------------------------------------------------------------------------------
# B19 EOSER and ASS
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EOSERArgs(SamplerArgs):
    """Linear EOS factor from ``gamma_min`` (first step) to ``gamma_max`` (last of ``steps``); reference 0.4 → 1."""

    gamma_min: float = 0.4
    gamma_max: float = 1.0


@register("eoser", EOSERArgs, block_local=True)
def eoser(info: StepInfo, args: EOSERArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """EOSER (§B19): LLaDA's scheduled top-k with terminator confidences scaled by
    ``γ_min + (γ_max − γ_min)·clamp(step, 0, S−1)/(S−1)``."""
    t = jnp.clip(info.step, 0, spec.steps - 1).astype(jnp.float32) / max(spec.steps - 1, 1)
    conf = eos_scaled(info.conf, info.is_stop, args.gamma_min + (args.gamma_max - args.gamma_min) * t)
    k = scheduled_k(info, spec, num_transfer_tokens(info.block_masks, spec.steps_per_block, info.block_step))
    return Decision(topk_mask(conf, k, info.eligible), info.x0, state)


@dataclasses.dataclass(frozen=True)
class ASSArgs(SamplerArgs):
    """Ascending step size with EOSER (reference ``eoser_ass_generate``: γ 0.01 → 1). ``steps`` is ignored: a block
    of n masks takes ``max(1, floor(log2 n))`` steps."""

    gamma_min: float = 0.01
    gamma_max: float = 1.0


def ass_schedule(n: jax.Array, i: jax.Array):
    """ASS (§B19): of ``n`` masks, step ``i`` commits ``2^i``; the last of ``S = max(1, floor(log2 n))`` steps
    commits the remainder ``n − (2^(S−1) − 1)``. Returns ``(k [B], S [B])``."""
    n = jnp.asarray(n, jnp.int32)
    s = jnp.maximum(jnp.floor(jnp.log2(jnp.maximum(n, 1).astype(jnp.float32))).astype(jnp.int32), 1)
    i = jnp.asarray(i, jnp.int32)
    k = jnp.where(i >= s - 1, n - (2 ** (s - 1) - 1), 2 ** jnp.minimum(i, 30))
    return k, s


@register("ass", ASSArgs, block_local=True)
def ass(info: StepInfo, args: ASSArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """EOSER + ASS (§B19): commit ``2^i`` tokens at block step i (top by EOS-scaled confidence), with the EOS factor
    at progress ``(2^(i+1) − 1) / 2^S``."""
    k, s = ass_schedule(info.block_masks, info.block_step)
    t = jnp.minimum((2.0 ** (info.block_step + 1) - 1.0) / 2.0 ** s, 1.0)  # [B]
    conf = eos_scaled(info.conf, info.is_stop, args.gamma_min + (args.gamma_max - args.gamma_min) * t)
    k = jnp.where(info.block_step >= s - 1, jnp.sum(info.eligible, axis=-1), k)
    return Decision(topk_mask(conf, k, info.eligible), info.x0, state)


# ----------------------------------------------------------------------------------------------------------------
# B14 ETE
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ETEArgs(SamplerArgs):
    """[INFERRED rule, §B14] ``threshold`` τ of the exploit set; ``cross`` masked positions past the block end that
    may also be committed (cross-block); when fewer than ``min_commits`` pass τ, explore the ``explore``
    highest-entropy eligible positions with tokens sampled at temperature 1."""

    threshold: float = 0.9
    cross: int = 0
    min_commits: int = 1
    explore: int = 1


@register("ete", ETEArgs)
def ete(info: StepInfo, args: ETEArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """Explore-then-exploit (§B14, inferred): commit ``C = {conf >= τ}`` over the block plus ``cross`` positions
    after it; if ``|C| < min_commits`` also commit the ``explore`` highest-entropy block positions with sampled
    tokens; at least the top-1."""
    idx = jnp.arange(spec.gen_len)[None, :]
    window = info.eligible | (info.masked & (idx >= info.hi[:, None]) & (idx < (info.hi + args.cross)[:, None]))
    exploit = window & (info.conf >= args.threshold)
    stalled = jnp.sum(exploit, axis=-1) < args.min_commits  # [B]
    logp = jax.nn.log_softmax(info.logits.astype(jnp.float32), axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, N]
    explore = topk_mask(ent, args.explore, info.eligible) & stalled[:, None]
    sampled = jax.vmap(lambda k, lp: gumbel_argmax(jax.random.fold_in(k, 2), lp))(info.keys, logp)  # [B, N]
    x0 = jnp.where(explore, sampled, info.x0)
    return Decision(exploit | explore | top1(info.conf, info.eligible), x0, state)


# ----------------------------------------------------------------------------------------------------------------
# B18 BACD
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BACDArgs(SamplerArgs):
    """Threshold bounds ``lower`` L, ``upper`` U (reference 0.6, 0.9)."""

    upper: float = 0.9
    lower: float = 0.6


def _bacd_state(b: int, n: int, args: BACDArgs) -> dict:
    return {"sum": jnp.zeros((b,), jnp.float32), "count": jnp.zeros((b,), jnp.float32)}


@register("bacd", BACDArgs, init_state=_bacd_state, block_local=True)
def bacd(info: StepInfo, args: BACDArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """BACD (§B18): τ = clamp(max eligible confidence, L, U) at a block's first step, then clamp(mean confidence of
    the block's committed tokens, L, U); commit ``conf >= τ`` (at least the top-1). The history resets per block."""
    fresh = info.block_step == 0
    s = jnp.where(fresh, 0.0, state["sum"])
    c = jnp.where(fresh, 0.0, state["count"])
    best = jnp.max(jnp.where(info.eligible, info.conf, 0.0), axis=-1)
    tau = jnp.clip(jnp.where(c > 0, s / jnp.maximum(c, 1.0), best), args.lower, args.upper)
    commit = threshold_commit(info.conf, info.eligible, tau)
    new = {"sum": s + jnp.sum(jnp.where(commit, info.conf, 0.0), -1), "count": c + jnp.sum(commit, -1)}
    return Decision(commit, info.x0, new)


# ----------------------------------------------------------------------------------------------------------------
# B18 Dystruct [INFERRED from the abstract: the spec's minimal instantiation; experimental]
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DystructArgs(SamplerArgs):
    """Dystruct (§B18, INFERRED). ``threshold``: the in-block Fast-dLLM rule τ; ``init_window``: generated positions
    the model sees at the start (the loop's ``gen_len`` is the maximum); ``expand``: the cap on one window expansion;
    ``margin``: the inferred end must lie this many positions inside the window, else the window expands;
    ``p_expand``: expand when ``P(end >= window - margin) >= p_expand``; ``end_confidence``: a block closes at the
    MAP end when its posterior is at least this; ``delimiter_ids`` / ``delta``: the structural block boundary of
    AdaBlock (§B12); ``readout``: the length-readout baseline instead — the first forward sees every position, the
    window is set once to ``MAP end + 1 + margin`` (widened only if used up without an end). ``defer``: a step whose
    posterior widens the window commits nothing (the next forward decodes in the wider window); false: it commits
    from the narrow view it has (measured worse: docs/results/dystruct.md)."""

    threshold: float = 0.9
    init_window: int = 8
    expand: int = 8
    margin: int = 1
    p_expand: float = 0.5
    end_confidence: float = 0.5
    delimiter_ids: tuple[int, ...] = (29, 31)
    delta: float = 0.3
    readout: bool = False
    defer: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.init_window < 1 or self.expand < 1 or self.margin < 0:
            raise ValueError(f"init_window={self.init_window}, expand={self.expand} must be >= 1 and "
                             f"margin={self.margin} >= 0")
        for name in ("threshold", "p_expand", "end_confidence", "delta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: allowed [0, 1]")


def stop_probability(logits: jax.Array, stop_ids) -> jax.Array:
    """``[B, N]`` probability that each position holds a terminator: ``Σ_{t in stop_ids} softmax(logits)[t]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp[..., jnp.asarray(tuple(stop_ids), jnp.int32)]), axis=-1)


def end_posterior(hazard: jax.Array, open_: jax.Array):
    """Posterior of the response end (§B18, INFERRED): ``P(end = j) = h_j · Π_{i<j} (1 − h_i)`` with hazard
    ``h = hazard`` on ``open_`` positions (still masked and visible) and 0 elsewhere (decoded non-terminators);
    ``beyond = Π_j (1 − h_j)``, the mass past the visible window. Returns ``(post [B, N], beyond [B])``; ``post``
    sums with ``beyond`` to 1."""
    h = jnp.where(open_, jnp.clip(hazard, 0.0, 1.0), 0.0)
    log_keep = jnp.log(jnp.maximum(1.0 - h, 1e-30))
    surv = jnp.cumsum(log_keep, axis=-1)  # log Π_{i<=j} (1 - h_i)
    before = jnp.concatenate([jnp.zeros_like(surv[:, :1]), surv[:, :-1]], axis=-1)  # log Π_{i<j}
    return h * jnp.exp(before), jnp.exp(surv[:, -1])


def _dystruct_state(b: int, n: int, args: DystructArgs) -> dict:
    w = n if args.readout else min(args.init_window, n)
    return {"window": jnp.full((b,), w, jnp.int32), "visible_sum": jnp.zeros((b,), jnp.int32),
            "expansions": jnp.zeros((b,), jnp.int32), "probed": jnp.zeros((b,), bool),
            "steps_at": jnp.zeros((b, n + 1), jnp.int32)}  # [B, N+1] forwards run at each window size


def _visible_end(masked: jax.Array) -> jax.Array:
    """``[B]`` one past the last visible masked position (0 where none): the window end seen by the block rule."""
    n = masked.shape[-1]
    return jnp.where(jnp.any(masked, -1), n - jnp.argmax(masked[:, ::-1], axis=-1), 0).astype(jnp.int32)


def dystruct_end(info: StepInfo, args: DystructArgs, start: jax.Array, spec: LoopSpec) -> jax.Array:
    """Dystruct block boundary (§B18): the nearest of (a) ``start + block_len`` capped at the window, (b) one past
    the MAP end when ``P(end = j*) >= end_confidence`` (the block closes the response), (c) AdaBlock's most
    confident delimiter within (a) if its confidence is ``>= delta``. Returns the end ``[B]`` (> start)."""
    n = spec.gen_len
    idx = jnp.arange(n)[None, :]
    w = jnp.maximum(_visible_end(info.masked), start + 1)  # [B]
    end = jnp.minimum(start + spec.block_len, w)
    post, _ = end_posterior(stop_probability(info.logits, spec.stop_ids), info.masked & (idx >= start[:, None]))
    j = jnp.argmax(post, axis=-1)
    end = jnp.where(jnp.max(post, -1) >= args.end_confidence, jnp.minimum(end, j + 1), end)
    delim = jnp.isin(info.x0, jnp.asarray(args.delimiter_ids, jnp.int32))
    cand = delim & info.masked & (idx >= start[:, None]) & (idx < end[:, None])
    score = jnp.where(cand, info.conf, -1.0)
    end = jnp.where(jnp.max(score, -1) >= args.delta, jnp.minimum(end, jnp.argmax(score, -1) + 1), end)
    return jnp.maximum(end, start + 1).astype(jnp.int32)


def edge_mass(post: jax.Array, beyond: jax.Array, window: jax.Array, margin: int) -> jax.Array:
    """``P(end >= window − margin) = beyond + Σ_{j >= window − margin} post_j`` ``[B]``."""
    idx = jnp.arange(post.shape[-1])[None, :]
    return beyond + jnp.sum(jnp.where(idx >= (window - margin)[:, None], post, 0.0), axis=-1)


def dystruct_window(post: jax.Array, beyond: jax.Array, window: jax.Array, exhausted: jax.Array,
                    args: DystructArgs, n: int) -> jax.Array:
    """The window expansion step (§B18, INFERRED): ``P(end >= window − margin) = beyond + Σ_{j >= window − margin}
    post_j``; if it is ``>= p_expand`` (the response runs into the edge of what the model sees) or the window is used
    up without an end (``exhausted``), widen by ``expand`` positions (at most ``n``). ``[B]``."""
    grow = (edge_mass(post, beyond, window, args.margin) >= args.p_expand) | exhausted
    return jnp.where(grow, jnp.minimum(window + args.expand, n), window).astype(jnp.int32)


def window_waste(steps_at: jax.Array, lengths: jax.Array) -> jax.Array:
    """Generated positions the model saw beyond the response over a whole decode, ``Σ_t max(0, W_t − L)`` per row
    (``[B]``), from ``steps_at [B, N+1]`` (forwards run at each window size W) and the final ``lengths [B]``."""
    w = jnp.arange(steps_at.shape[-1])[None, :]
    return jnp.sum(steps_at * jnp.maximum(w - lengths[:, None], 0), axis=-1)


@register("dystruct", DystructArgs, init_state=_dystruct_state, block_rule=dystruct_end, window=True)
def dystruct(info: StepInfo, args: DystructArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """Dystruct (§B18, INFERRED, experimental): flexible-length decoding of a fixed-length diffusion LM. The model sees
    a window of ``state["window"]`` generated positions; every step the end posterior (:func:`end_posterior`, from
    the terminator probabilities of the visible masked positions) decides whether to widen the window
    (:func:`dystruct_window`); blocks end at the inferred end or a delimiter (:func:`dystruct_end`); inside a block
    the Fast-dLLM threshold rule commits. ``readout``: the first forward sees all positions and fixes the window at
    the MAP end (a length readout from the prompt)."""
    n = spec.gen_len
    commit = threshold_commit(info.conf, info.eligible, args.threshold)
    window = state["window"]
    post, beyond = end_posterior(stop_probability(info.logits, spec.stop_ids), info.masked)
    ends_now = jnp.any(commit & info.is_stop, axis=-1)
    exhausted = ~jnp.any(info.masked & ~commit, axis=-1) & ~ends_now  # no visible mask left and no end committed
    if args.readout:
        j = jnp.where(beyond > jnp.max(post, -1), n - 1, jnp.argmax(post, -1))  # MAP end, beyond -> the last slot
        first = ~state["probed"]
        new_w = jnp.where(first, jnp.clip(j + 1 + args.margin, 1, n), window)
        new_w = jnp.where(~first & exhausted, jnp.minimum(window + args.expand, n), new_w)
        # the probe's own commits must stay inside the new window: none beyond it
        commit = commit & (jnp.arange(n)[None, :] < new_w[:, None])
        commit = commit | (top1(info.conf, info.eligible) & ~jnp.any(commit, -1, keepdims=True))
        new_w = jnp.maximum(new_w, jnp.where(jnp.any(commit, -1), n - jnp.argmax(commit[:, ::-1], -1), 0))
    else:
        if args.defer:  # widen first, decode in the wider window from the next forward on
            widen = (edge_mass(post, beyond, window, args.margin) >= args.p_expand) & (window < n)
            commit = commit & ~widen[:, None]
            ends_now = jnp.any(commit & info.is_stop, axis=-1)
            exhausted = ~jnp.any(info.masked & ~commit, axis=-1) & ~ends_now
        new_w = dystruct_window(post, beyond, window, exhausted, args, n)
    new = {"window": new_w.astype(jnp.int32), "visible_sum": state["visible_sum"] + window,
           "expansions": state["expansions"] + (new_w > window).astype(jnp.int32),
           "probed": jnp.ones_like(state["probed"]),
           "steps_at": state["steps_at"] + (jnp.arange(n + 1)[None, :] == window[:, None]).astype(jnp.int32)}
    return Decision(commit, info.x0, new)


# ----------------------------------------------------------------------------------------------------------------
# B16 Learn2PD (+ End-of-Text Prediction)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Learn2PDArgs(SamplerArgs):
    """``threshold`` on the filter's sigmoid (reference 0.9); ``eot``: End-of-Text Prediction truncation. Needs
    ``heads={"filter": FilterHead(block_size=block_len)}`` (``jaxtok.models.heads``); ``head_path``: a trained filter
    (the run directory of ``jaxtok train configs/heads/learn2pd.yaml``) that ``jaxtok decode`` loads."""

    threshold: float = 0.9
    eot: bool = True
    head_path: Optional[str] = None


def block_features(values: jax.Array, lo: jax.Array, width: int):
    """``values [B, N]`` gathered at ``lo + 0..width-1`` -> ``([B, width], valid [B, width])`` (valid: inside N)."""
    n = values.shape[-1]
    cols = lo[:, None] + jnp.arange(width)[None, :]
    return jnp.take_along_axis(values, jnp.clip(cols, 0, n - 1), axis=-1), cols < n


def scatter_block(values: jax.Array, lo: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`block_features`: ``values [B, W]`` placed at generation indices ``lo..lo+W-1`` of
    ``[B, n]`` (other positions: the value at the clipped index; callers mask with the block)."""
    idx = jnp.arange(n)[None, :] - lo[:, None]
    return jnp.take_along_axis(values, jnp.clip(idx, 0, values.shape[-1] - 1), axis=-1)


@register("learn2pd", Learn2PDArgs, heads=("filter",))
def learn2pd(info: StepInfo, args: Learn2PDArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """Learn2PD (§B16): commit ``sigmoid(filter(block confidences)) > threshold`` on eligible positions plus LLaDA's
    scheduled top-k. The filter sees the whole block's confidence vector (decoded positions: 1). EoTP: if an
    accepted position proposes a terminator, fill everything after the first such one with it; else if a masked
    position proposes one, fill everything after the most confident such proposal."""
    n = spec.gen_len
    feats, fvalid = block_features(jnp.where(info.masked, info.conf, 1.0), info.lo, spec.block_len)
    keep = jax.nn.sigmoid(heads["filter"](feats, fvalid)) > args.threshold  # [B, K]
    accepted = scatter_block(keep, info.lo, n) & info.eligible
    k = scheduled_k(info, spec, num_transfer_tokens(info.block_masks, spec.steps_per_block, info.block_step))
    commit = accepted | topk_mask(info.conf, k, info.eligible)
    x0 = info.x0
    if args.eot:
        idx = jnp.arange(n)[None, :]
        acc_stop = commit & info.is_stop
        cand_stop = info.masked & info.is_stop
        first_acc = first_true_index(acc_stop)  # [B]
        best_cand = jnp.argmax(jnp.where(cand_stop, info.conf, -1.0), axis=-1)
        cut = jnp.where(jnp.any(acc_stop, -1), first_acc, jnp.where(jnp.any(cand_stop, -1), best_cand, n))
        fill = info.masked & (idx > cut[:, None])
        stop_tok = jnp.take_along_axis(info.x0, jnp.clip(cut, 0, n - 1)[:, None], axis=-1)  # [B, 1]
        x0 = jnp.where(fill, stop_tok, x0)
        commit = commit | fill
    return Decision(commit, x0, state)


# ----------------------------------------------------------------------------------------------------------------
# B17 TraceLock
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TraceLockArgs(SamplerArgs):
    """``threshold`` on the controller's dynamic-threshold probability (reference 0.99); ``max_accept`` cap on
    threshold commits per step (4); ``window`` positions from the first mask the controller sees (128). Needs
    ``heads={"controller": TraceController(in_features=hidden_size + 1)}``; features are the backbone's hidden state
    and the proposal's confidence at every generated position, state ids LOCKED (1) / GEN (2) / EOT (3);
    ``head_path``: a trained controller (the run directory of ``jaxtok train configs/heads/tracelock.yaml``) that
    ``jaxtok decode`` loads."""

    threshold: float = 0.99
    max_accept: int = 4
    window: int = 128
    head_path: Optional[str] = None


def tracelock_inputs(info: StepInfo, window: int):
    """Controller inputs over the generated positions: ``features [B, N, D+1]`` (hidden, confidence), ``state_ids``
    and ``valid`` (the window ``[first mask, first mask + window)``)."""
    n = info.conf.shape[-1]
    idx = jnp.arange(n)[None, :]
    first = first_true_index(info.masked)[:, None]
    valid = (idx >= first) & (idx < first + window)
    conf = jnp.where(info.masked, info.conf, 1.0)
    feats = jnp.concatenate([info.hidden.astype(jnp.float32), conf[..., None]], axis=-1)
    states = jnp.where(info.masked, 2, jnp.where(info.is_stop, 3, 1)).astype(jnp.int32)
    return feats, states, valid


@register("tracelock", TraceLockArgs, heads=("controller",), needs_hidden=True)
def tracelock(info: StepInfo, args: TraceLockArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """TraceLock (§B17): ``prob = sigmoid(logit − threshold_logit)`` of the controller over the window; commit the
    scheduled top-k by ``prob`` (LLaDA schedule) plus up to ``max_accept`` positions with ``prob >= threshold``
    (never a terminator: the reference suppresses controller-driven EOS/PAD commits), inside the active block; the
    top-1 if nothing is selected. Tokens are the proposals ``x0``."""
    feats, states, valid = tracelock_inputs(info, args.window)
    out = heads["controller"](feats, states, valid)
    prob = jax.nn.sigmoid(out.commit_logits)  # [B, N]
    pool = info.eligible & valid
    k = scheduled_k(info, spec, num_transfer_tokens(info.block_masks, spec.steps_per_block, info.block_step))
    sched = topk_mask(prob, k, pool)
    thresh = topk_mask(prob, args.max_accept, pool & (prob >= args.threshold) & ~info.is_stop)
    commit = sched | thresh
    fallback = ~jnp.any(commit, -1, keepdims=True) & topk_mask(prob, 1, pool)
    return Decision(commit | fallback | (top1(prob, info.eligible) & ~jnp.any(pool, -1, keepdims=True)), info.x0,
                    state)


# ----------------------------------------------------------------------------------------------------------------
# B13 S2D2
# ----------------------------------------------------------------------------------------------------------------


S2D2_SPAN_BINS, S2D2_PROGRESS_BINS, S2D2_ENTROPY_BINS = 4, 2, 2  # bandit context bins [INFERRED]
S2D2_CONTEXTS = S2D2_SPAN_BINS * S2D2_PROGRESS_BINS * S2D2_ENTROPY_BINS


@dataclasses.dataclass(frozen=True)
class S2D2Args(SamplerArgs):
    """S2D2 (§B13). ``kappa``: ratio tempering ``min(1, (q/p)^κ)`` (1 = lossless); ``threshold`` τ_c of the
    ``low_confidence_dynamic`` fallback (SDAR config 0.85) and of ``N_hi``. ``router`` (when to run the verifier):

    - ``mask_span_length``: verify iff the first masked span of the block has at least ``min_span`` positions
      (1 = always);
    - ``score_threshold``: verify iff ``score >= score_threshold`` (τ_score), ``score = E[K] − cost`` (``score_mode``
      ``static``) or ``E[K] − cost · N_hi`` (``dynamic``), ``E[K] = Σ_k Π_{i≤k} α_i`` over the span;
    - ``score_hysteresis``: on/off per row; on stays on unless ``score < tau_off``, off turns on iff
      ``score > tau_on`` (Fast-dLLM-v2 config: τ_on 1, τ_off −5, dynamic, c 1);
    - ``contextual_bandit_ucb``: arms {skip, verify} per context bin (span length, block progress, span entropy),
      reward = tokens committed / cost (``verify_cost`` if verify else 1), UCB ``mean + ucb_beta·sqrt(ln t / n)``.

    ``alpha`` (acceptance estimate per span position from the draft logits): ``soft_entropy_negexp``
    ``α = exp(−alpha_beta · H / log V)`` (β = 1) or ``hard_margin_threshold`` ``α = 1[top1 − top2 prob > margin]``
    (0.05)."""

    min_span: int = 1
    kappa: float = 1.0
    threshold: float = 0.85
    router: Literal["mask_span_length", "score_threshold", "score_hysteresis", "contextual_bandit_ucb"] = \
        "mask_span_length"
    alpha: Literal["soft_entropy_negexp", "hard_margin_threshold"] = "soft_entropy_negexp"
    alpha_beta: float = 1.0
    margin: float = 0.05
    score_mode: Literal["static", "dynamic"] = "static"
    cost: float = 1.0
    score_threshold: float = 0.0
    tau_on: float = 1.0
    tau_off: float = -5.0
    ucb_beta: float = 1.0
    verify_cost: float = 2.0


def _tempered_log_probs(logits: jax.Array, temperature: float) -> jax.Array:
    t = temperature if temperature > 0 else 1.0
    return jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)


def s2d2_alpha(logits: jax.Array, args: S2D2Args) -> jax.Array:
    """S2D2's per-position acceptance estimate α ``[..., ]`` from raw draft logits ``[..., V]`` (§B13 α estimators):
    ``soft_entropy_negexp`` ``exp(−β·H/log V)``, ``hard_margin_threshold`` ``1[p_top1 − p_top2 > margin]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if args.alpha == "hard_margin_threshold":
        top2 = jnp.exp(jax.lax.top_k(logp, 2)[0])
        return (top2[..., 0] - top2[..., 1] > args.margin).astype(jnp.float32)
    h = -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)
    return jnp.exp(-args.alpha_beta * h / jnp.log(float(logits.shape[-1])))


def s2d2_expected_accepts(alpha: jax.Array, in_span: jax.Array) -> jax.Array:
    """``E[K] = Σ_{k=1}^{|span|} Π_{i≤k} α_i`` (§B13 score): ``alpha``, ``in_span`` ``[B, K]`` (leading True) -> ``[B]``."""
    return jnp.sum(jnp.where(in_span, jnp.cumprod(jnp.where(in_span, alpha, 1.0), axis=-1), 0.0), axis=-1)


def s2d2_score(expected: jax.Array, n_hi: jax.Array, args: S2D2Args) -> jax.Array:
    """Router score ``[B]``: ``E[K] − c`` (``difference_static``) or ``E[K] − c·N_hi`` (``difference_dynamic``)."""
    if args.score_mode == "dynamic":
        return expected - args.cost * n_hi.astype(jnp.float32)
    return expected - args.cost


def s2d2_hysteresis(on: jax.Array, score: jax.Array, tau_on: float, tau_off: float) -> jax.Array:
    """``score_hysteresis`` (§B13): a row that verifies keeps verifying unless ``score < τ_off``; a row that does not
    starts iff ``score > τ_on``. Returns the new on/off ``[B]`` (= verify this step)."""
    return jnp.where(on, score >= tau_off, score > tau_on)


def s2d2_context(run: jax.Array, block_len: int, progress: jax.Array, entropy: jax.Array) -> jax.Array:
    """Bandit context bin ``[B]`` int32 [INFERRED bin edges; the spec names the features only]: span length
    ``run`` in ``S2D2_SPAN_BINS`` equal bins of ``1..block_len``, block progress (decoded share of the block's masks,
    ``[0, 1]``) and mean normalized span entropy (``[0, 1]``) in ``S2D2_PROGRESS_BINS`` / ``S2D2_ENTROPY_BINS``."""
    sb = jnp.clip((run - 1) * S2D2_SPAN_BINS // max(block_len, 1), 0, S2D2_SPAN_BINS - 1)
    pb = jnp.clip(jnp.floor(progress * S2D2_PROGRESS_BINS), 0, S2D2_PROGRESS_BINS - 1).astype(jnp.int32)
    eb = jnp.clip(jnp.floor(entropy * S2D2_ENTROPY_BINS), 0, S2D2_ENTROPY_BINS - 1).astype(jnp.int32)
    return ((sb * S2D2_PROGRESS_BINS + pb) * S2D2_ENTROPY_BINS + eb).astype(jnp.int32)


def s2d2_ucb_choose(counts: jax.Array, rewards: jax.Array, t: jax.Array, beta: float) -> jax.Array:
    """UCB over arms {0 = skip, 1 = verify} of one context per row: ``counts``, ``rewards`` ``[B, 2]`` (sums), ``t [B]``
    decisions so far. ``mean_a + β·sqrt(ln(t + 1) / n_a)``, an untried arm first (skip before verify) [INFERRED tie
    and exploration order]. Returns ``verify [B]`` bool."""
    mean = rewards / jnp.maximum(counts, 1.0)
    bonus = beta * jnp.sqrt(jnp.log(t[:, None] + 1.0) / jnp.maximum(counts, 1.0))
    ucb = jnp.where(counts > 0, mean + bonus, jnp.inf)
    return jnp.argmax(ucb, axis=-1) == 1


def _s2d2_state(b: int, n: int, args: S2D2Args) -> dict:
    """Per-row router carry: hysteresis ``on [B]``; bandit ``counts/rewards [B, contexts, 2]`` and ``t [B]``."""
    return {"on": jnp.zeros((b,), bool), "counts": jnp.zeros((b, S2D2_CONTEXTS, 2), jnp.float32),
            "rewards": jnp.zeros((b, S2D2_CONTEXTS, 2), jnp.float32), "t": jnp.zeros((b,), jnp.float32)}


@register("s2d2", S2D2Args, verifier=True, init_state=_s2d2_state)
def s2d2(info: StepInfo, args: S2D2Args, state, spec: LoopSpec, heads=None) -> Decision:
    """S2D2 (§B13): the block's drafts ``x0 ~ p`` (diffusion mode) on the first contiguous masked span are verified
    by the same model in AR mode (``q``, one batched forward of K = block_len sequence copies) when the ``router``
    says so (:class:`S2D2Args`): draft j is accepted with probability ``min(1, (q_j(d_j)/p_j(d_j))^κ)`` while all
    earlier ones were; at the first rejection the token is resampled from ``normalize(max(0, q − p))`` (A1). With
    κ = 1 and T > 0 every verified position is distributed as ``q``. If fewer than the scheduled ``k`` tokens were
    committed, the rest come from the ``low_confidence_dynamic`` rule (all eligible with confidence > τ_c if at
    least k of them, else the top-k). NFE: the verifier's K sequence copies count K forwards (``Decision.nfe``)."""
    n, kb = spec.gen_len, spec.block_len
    idx = jnp.arange(n)[None, :]
    start = first_true_index(info.eligible)  # [B]
    rel = idx - start[:, None]
    cols = jnp.clip(start[:, None] + jnp.arange(kb)[None, :], 0, n - 1)  # [B, K]
    run = count_leading_true(jnp.take_along_axis(info.eligible, cols, axis=1)
                             & (start[:, None] + jnp.arange(kb)[None, :] < n))  # [B] span length
    in_span = jnp.arange(kb)[None, :] < run[:, None]  # [B, K]

    # router (§B13 routing policies)
    new_state = state
    if args.router == "mask_span_length":
        verify = run >= args.min_span
    else:
        span_logits = jnp.take_along_axis(info.logits, cols[..., None], axis=1)  # [B, K, V]
        alpha = s2d2_alpha(span_logits, args)  # [B, K]
        n_hi = jnp.sum(info.eligible & (info.conf > args.threshold), axis=-1)
        score = s2d2_score(s2d2_expected_accepts(alpha, in_span), n_hi, args)  # [B]
        if args.router == "score_threshold":
            verify = score >= args.score_threshold
        elif args.router == "score_hysteresis":
            verify = s2d2_hysteresis(state["on"], score, args.tau_on, args.tau_off)
            new_state = dict(state, on=jnp.where(run > 0, verify, state["on"]))
        else:  # contextual_bandit_ucb
            ent = _entropy(span_logits) / jnp.log(float(info.logits.shape[-1]))  # [B, K] normalized
            mean_ent = jnp.sum(jnp.where(in_span, ent, 0.0), -1) / jnp.maximum(run, 1)
            progress = 1.0 - jnp.sum(info.eligible, -1) / jnp.maximum(info.block_masks, 1)
            ctx = s2d2_context(run, kb, progress, mean_ent)  # [B]
            pick = lambda a: jnp.take_along_axis(a, ctx[:, None, None], axis=1)[:, 0]  # noqa: E731  [B, 2]
            verify = s2d2_ucb_choose(pick(state["counts"]), pick(state["rewards"]), state["t"], args.ucb_beta)
    verify = verify & (run > 0)

    logp = _tempered_log_probs(info.logits, spec.temperature)  # draft distribution p (what x0 was drawn from)
    q_logits = jax.lax.cond(jnp.any(verify), lambda: heads["verify"](info.x0, start),
                            lambda: jnp.zeros((info.x0.shape[0], kb) + info.logits.shape[-1:], jnp.float32))
    logq = _tempered_log_probs(q_logits, spec.temperature)  # [B, K, V]
    d = jnp.take_along_axis(info.x0, cols, axis=1)  # [B, K] drafts on the span
    logp_k = jnp.take_along_axis(logp, cols[..., None], axis=1)  # [B, K, V]
    lp_d = jnp.take_along_axis(logp_k, d[..., None], -1)[..., 0]
    lq_d = jnp.take_along_axis(logq, d[..., None], -1)[..., 0]
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 4), (kb,)))(info.keys)
    accept = in_span & (jnp.log(jnp.maximum(u, 1e-30)) < args.kappa * (lq_d - lp_d))
    n_acc = count_leading_true(accept)  # [B]
    rejected = verify & (n_acc < run)
    at = jnp.clip(n_acc, 0, kb - 1)[:, None]
    p_rej = jnp.exp(jnp.take_along_axis(logp_k, at[..., None], axis=1)[:, 0])  # [B, V]
    q_rej = jnp.exp(jnp.take_along_axis(logq, at[..., None], axis=1)[:, 0])
    key = jax.vmap(lambda k: jax.random.fold_in(k, 5))(info.keys)
    fix = jax.vmap(gumbel_argmax)(key, jnp.log(residual_distribution(q_rej, p_rej)))  # [B]
    verified = verify[:, None] & info.eligible & (rel >= 0) & (rel < n_acc[:, None])
    fixed = rejected[:, None] & (rel == n_acc[:, None])
    x0 = jnp.where(fixed, fix[:, None], info.x0)
    commit = verified | fixed
    k = scheduled_k(info, spec, num_transfer_tokens(info.block_masks, spec.steps_per_block, info.block_step))
    short = jnp.maximum(k - jnp.sum(commit, -1), 0)  # [B]
    rest = info.eligible & ~commit
    hi_conf = rest & (info.conf > args.threshold)
    dyn = jnp.where((jnp.sum(hi_conf, -1) >= short)[:, None], hi_conf, topk_mask(info.conf, short, rest))
    commit = commit | (dyn & (short > 0)[:, None])
    commit = commit | (top1(info.conf, info.eligible) & ~jnp.any(commit, -1, keepdims=True))
    if args.router == "contextual_bandit_ucb":  # reward = tokens committed / cost of the chosen arm
        arm = verify.astype(jnp.int32)
        reward = jnp.sum(commit & info.eligible, -1) / jnp.where(verify, args.verify_cost, 1.0)
        hit = (jax.nn.one_hot(ctx, S2D2_CONTEXTS)[..., None] * jax.nn.one_hot(arm, 2)[:, None, :]) \
            * (run > 0)[:, None, None]  # [B, contexts, 2]
        new_state = dict(state, counts=state["counts"] + hit, rewards=state["rewards"] + hit * reward[:, None, None],
                         t=state["t"] + (run > 0))
    return Decision(commit, x0, new_state, nfe=verify.astype(jnp.int32) * kb)


# ----------------------------------------------------------------------------------------------------------------
# B15 Info-Gain
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InfoGainArgs(SamplerArgs):
    """``candidates`` N one-token actions per step; ``position_temperature`` of the Gumbel-perturbed position choice
    of candidates 1..N-1; ``threshold``: bypass (fill the block at once) when every eligible position's top
    probability reaches it; ``objective``: ``info_gain`` (J = −C − H_next) or ``lookum`` (J = −H_next).
    Reference defaults 8, 0.2, 0.8."""

    candidates: int = 8
    position_temperature: float = 0.2
    threshold: float = 0.8
    objective: Literal["info_gain", "lookum"] = "info_gain"

    def __post_init__(self):
        super().__post_init__()
        if self.candidates < 1 or self.position_temperature <= 0:
            raise ValueError(f"candidates={self.candidates} must be >= 1 and position_temperature="
                             f"{self.position_temperature} > 0")


def _entropy(logits: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)


def infogain_candidates(info: StepInfo, args: InfoGainArgs, spec: LoopSpec):
    """Info-Gain's candidate actions (§B15): ``(pos [B, C], tok [B, C])``. Candidate 0 is the most confident eligible
    position with the step's proposal ``x0``; candidate c >= 1 takes the argmax of ``conf / position_temperature +
    Gumbel`` and, at T > 0, a FRESH draw ``tok_c ~ softmax(logits[pos_c] / T)`` (the reference's per-candidate
    ``sample_tokens``), so candidates at one position propose distinct tokens; at T = 0 every candidate proposes
    the argmax (diversity from positions only, as the reference)."""
    n, c = spec.gen_len, args.candidates
    scores = jnp.where(info.eligible, info.conf, -jnp.inf)
    first = jnp.argmax(scores, -1)[:, None]  # [B, 1]
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 3), (c - 1, n),
                                              minval=1e-20, maxval=1.0))(info.keys)  # [B, C-1, N]
    noisy = info.conf[:, None] / args.position_temperature - jnp.log(-jnp.log(u))
    rest = jnp.argmax(jnp.where(info.eligible[:, None], noisy, -jnp.inf), -1)  # [B, C-1]
    pos = jnp.concatenate([first, rest], axis=1).astype(jnp.int32)  # [B, C]
    tok = jnp.take_along_axis(info.x0, pos, axis=1)  # [B, C]
    if spec.temperature > 0 and c > 1:
        lg = jnp.take_along_axis(info.logits, rest[..., None], axis=1).astype(jnp.float32)  # [B, C-1, V]
        fresh = jax.vmap(lambda k, l: gumbel_argmax(jax.random.fold_in(k, 6), l / spec.temperature))(info.keys, lg)
        tok = tok.at[:, 1:].set(fresh.astype(tok.dtype))
    return pos, tok


@register("infogain", InfoGainArgs, lookahead=True)
def infogain(info: StepInfo, args: InfoGainArgs, state, spec: LoopSpec, heads=None) -> Decision:
    """Info-Gain sampler (§B15): candidate actions from :func:`infogain_candidates` (candidate 0: the most confident
    eligible position with its proposal ``x0``; c >= 1: Gumbel-perturbed positions with fresh token draws at T > 0);
    one batched lookahead forward scores ``J = −H(current at the position) − mean H(next logits over the remaining
    masks)``; the best candidate's token is committed at its position. Bypass: rows whose eligible positions all
    have top probability >= ``threshold`` commit the whole block with ``x0``. Difference from the reference: the
    chosen candidate's lookahead logits are not reused, so a step costs two forwards (``Decision.nfe``)."""
    n = spec.gen_len
    maxp = jnp.exp(jnp.max(jax.nn.log_softmax(info.logits.astype(jnp.float32), -1), -1))  # [B, N]
    has = jnp.any(info.eligible, -1)
    bypass = has & jnp.all(jnp.where(info.eligible, maxp >= args.threshold, True), -1)  # [B]
    pos, tok = infogain_candidates(info, args, spec)  # [B, C]
    need = has & ~bypass
    nxt = jax.lax.cond(jnp.any(need), lambda: heads["lookahead"](pos, tok),
                       lambda: jnp.zeros(pos.shape + info.logits.shape[1:], jnp.float32))  # [B, C, N, V]
    onehot = jnp.arange(n)[None, None, :] == pos[..., None]  # [B, C, N]
    remaining = info.masked[:, None] & ~onehot
    h_next = jnp.sum(jnp.where(remaining, _entropy(nxt), 0.0), -1) / jnp.maximum(jnp.sum(remaining, -1), 1)
    cost = jnp.take_along_axis(_entropy(info.logits), pos, axis=1)  # [B, C]
    j = -h_next - (cost if args.objective == "info_gain" else 0.0)
    pick_c = jnp.argmax(j, -1)[:, None]  # [B, 1]
    best = jnp.take_along_axis(pos, pick_c, axis=1)  # [B, 1]
    best_tok = jnp.take_along_axis(tok, pick_c, axis=1)  # [B, 1]
    pick = (jnp.arange(n)[None, :] == best) & info.eligible
    commit = jnp.where(bypass[:, None], info.eligible, pick)
    x0 = jnp.where(pick & ~bypass[:, None], best_tok, info.x0)
    return Decision(commit, x0, state, nfe=need.astype(jnp.int32))


__all__ = [
    "SamplerArgs", "LoopSpec", "StepInfo", "Decision", "register", "num_transfer_tokens", "top1", "threshold_commit",
    "factor_commit", "logit_gap", "adablock_end", "ass_schedule", "eos_scaled", "row_uniform", "block_features",
    "scatter_block", "LLaDAArgs", "ThresholdArgs", "FactorArgs", "ProphetArgs", "AdaBlockArgs", "EOSERArgs",
    "ASSArgs", "ETEArgs", "BACDArgs", "Learn2PDArgs", "InfoGainArgs", "TraceLockArgs", "S2D2Args",
    "infogain_candidates", "s2d2_alpha", "s2d2_expected_accepts", "s2d2_score", "s2d2_hysteresis", "s2d2_context",
    "s2d2_ucb_choose", "DystructArgs", "stop_probability", "end_posterior", "dystruct_end", "dystruct_window",
    "window_waste", "edge_mass",
]
