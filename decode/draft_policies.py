"""Draft-length policies for speculative decoding (decode_methods.md §A1.3, §A2, §A3).

A policy decides how many tokens the drafter proposes in a round. It changes speed, never the output
distribution: verification (§A1) is lossless for any per-row draft length. Each policy is a small frozen
dataclass registered in :data:`jaxtok.registry.DRAFT_POLICIES` (``decode.policy``) with the dataclass of its
arguments (``decode.policy_args``). Policies are pytrees: thresholds are static fields, learned heads are arrays.

The speculative loop calls, per round and per row (all arrays ``[B]``, no host round trips):

- ``round_gamma(state, gamma_max, batch)`` -> the row's draft cap γ_b for this round (chosen before drafting;
  the loop calls ``gamma_for_round(state, gamma_max, batch, live)``, which adds the live-row mask for ``faser``);
- ``round_init(batch)`` -> a per-round carry; then after each drafted token ``d_j`` (j = 0, 1, ...):
  ``after(carry, j, logits_j, hidden_j, token_prob_j)`` -> (continue drafting after ``d_j``, carry), where
  ``logits_j [B, V]`` are the drafter's raw logits that produced ``d_j``, ``hidden_j [B, D]`` its last hidden state
  at the input position of that forward (only drafters with hidden states provide it; ``needs_hidden`` policies
  require it) and ``token_prob_j [B]`` = ``q_j(d_j)``, the probability of the sampled draft under the draft
  distribution ``q_j = S(logits_j)`` (computed only for ``needs_token_prob`` policies, else None);
- ``update(state, gamma, drafted, accepted, stats, live)`` -> the state for the next round.

Registered: ``fixed`` (γ = ``decode.draft_len``), ``heuristic`` (+2 after a fully accepted round, −1 otherwise),
``confidence`` (stop after a draft token whose own probability ``q(d_j)`` is below a threshold, as HF), ``specdecpp`` (SpecDec++
acceptance head, stop when P(any rejection) > h) and ``speckv`` (SpecKV: an MLP over the previous round's draft
entropy/confidence picks γ ∈ {2, 4, 6, 8}) and ``batch_gamma`` (one γ per batch size from a measured cost model,
γ = 0 meaning plain AR, best run as ``generate`` at the call site; vLLM's dynamic speculative decoding) and ``faser``
(per row: γ_b maximizing modelled tokens per unit cost from the row's own acceptance EMA and the live-row count).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtok.models.heads import MLPHead, load_head, specdecpp_head, speckv_head
from jaxtok.registry import DRAFT_POLICIES, ConfigError

from .spec_cost import alpha_from_accepted, expected_tokens_per_round  # noqa: F401  (re-exported)

_LOG2 = float(jnp.log(2.0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftStats:
    """Per-draft statistics of one round, from the drafter's raw (untempered, §0.2) distributions.

    ``entropy_bits [B, γ]`` Shannon entropy in bits, ``confidence [B, γ]`` top-1 probability, ``valid [B, γ]``.
    """

    entropy_bits: jax.Array
    confidence: jax.Array
    valid: jax.Array


def draft_stats(logits: jax.Array, valid: jax.Array) -> DraftStats:
    """:class:`DraftStats` of raw draft logits ``[B, γ, V]`` (float32)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(lp)
    ent = -jnp.sum(jnp.where(p > 0, p * lp, 0.0), axis=-1) / _LOG2
    return DraftStats(entropy_bits=ent, confidence=jnp.max(p, axis=-1), valid=valid.astype(bool))


def top1_prob(logits: jax.Array) -> jax.Array:
    """Top-1 probability of raw logits ``[..., V]`` -> ``[...]`` (confidence, §0.2), float32."""
    return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


class DraftPolicy:
    """Base: draft up to γmax tokens every round and keep no state (the ``fixed`` policy)."""

    needs_hidden = False
    needs_token_prob = False  # whether ``after`` reads ``token_prob`` (the drafter then computes q_j(d_j))

    def init(self, batch: int, gamma_max: int) -> Any:
        return ()

    def round_gamma(self, state, gamma_max: int, batch: int) -> jax.Array:
        return jnp.full((batch,), gamma_max, jnp.int32)

    def constant_gamma(self, gamma_max: int, batch: int) -> Optional[int]:
        """The draft length every row asks for in every round when the policy fixes it before decoding (the loop
        then verifies that one static width instead of switching among several); None: it varies by row or round."""
        return None

    def gamma_for_round(self, state, gamma_max: int, batch: int, live: jax.Array) -> jax.Array:
        """What the loop calls: :meth:`round_gamma`, for policies that also read the rows still generating
        (``live [B]``, the load of a continuous batch: ``faser``) this one is overridden."""
        return self.round_gamma(state, gamma_max, batch)

    def round_init(self, batch: int) -> Any:
        return ()

    def after(self, carry, j: int | jax.Array, logits: jax.Array, hidden: Optional[jax.Array],
              token_prob: Optional[jax.Array] = None):
        return jnp.ones(logits.shape[:1], bool), carry

    def update(self, state, gamma, drafted, accepted, stats: DraftStats, live):
        return state

    def check(self, gamma_max: int) -> None:
        """Raise if the policy cannot run with ``decode.draft_len = gamma_max``."""


# ----------------------------------------------------------------------------------------------------------------
# fixed, heuristic, confidence (§A1.3)
# ----------------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fixed(DraftPolicy):
    """Fixed γ = ``decode.draft_len`` every round (Leviathan et al. 2023)."""

    def constant_gamma(self, gamma_max, batch):
        return gamma_max


@dataclasses.dataclass(frozen=True)
class HeuristicArgs:
    """HF's ``"heuristic"`` schedule: γ starts at ``initial``; +``increase`` after a round whose drafts were all
    accepted, −``decrease`` otherwise; kept in ``[minimum, decode.draft_len]``."""

    initial: int = 4
    increase: int = 2
    decrease: int = 1
    minimum: int = 1

    def __post_init__(self):
        for name in ("initial", "minimum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: allowed integers >= 1")
        for name in ("increase", "decrease"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: allowed integers >= 0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Heuristic(DraftPolicy):
    """+2/−1 heuristic (HF assisted generation, §A1.3), per row. State: γ ``[B]`` int32."""

    args: HeuristicArgs = dataclasses.field(default_factory=HeuristicArgs, metadata=dict(static=True))

    def init(self, batch, gamma_max):
        return jnp.full((batch,), min(self.args.initial, gamma_max), jnp.int32)

    def round_gamma(self, state, gamma_max, batch):
        return state

    def update(self, state, gamma, drafted, accepted, stats, live):
        return heuristic_update(state, accepted, self.args, stats.valid.shape[1], live)


def heuristic_update(gamma: jax.Array, accepted: jax.Array, args: HeuristicArgs, gamma_max: int,
                     live=None) -> jax.Array:
    """γ' = γ + increase if ``accepted == γ`` else γ − decrease, clipped to ``[minimum, gamma_max]`` (rows with
    ``live`` False keep γ). ``[B]`` int32."""
    new = jnp.where(accepted >= gamma, gamma + args.increase, gamma - args.decrease)
    new = jnp.clip(new, min(args.minimum, gamma_max), gamma_max).astype(jnp.int32)
    return new if live is None else jnp.where(live, new, gamma)


@dataclasses.dataclass(frozen=True)
class ConfidenceArgs:
    """HF's ``assistant_confidence_threshold``: stop drafting after a token whose probability under the draft
    distribution, ``q(d_j)``, is below ``threshold`` (that token is still proposed). ``min_len`` tokens are always
    drafted."""

    threshold: float = 0.4
    min_len: int = 1

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r}: allowed values in [0, 1]")
        if self.min_len < 1:
            raise ValueError(f"min_len={self.min_len!r}: allowed integers >= 1")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Confidence(DraftPolicy):
    """Confidence stop (§A1.3, HF ``ConfidenceCriteria``): continue after ``d_j`` iff ``q_j(d_j) >= threshold`` or
    ``j + 1 < min_len``, with ``q_j = S(logits_j)`` the draft distribution ``d_j`` was sampled from (HF reads the
    processed scores at the sampled token; greedy rows: the untempered softmax at the argmax = the top-1
    probability). Stopping on the sampled token keeps verification lossless: whether ``d_{j+1}`` is drafted depends
    only on ``d_{<=j}``."""

    args: ConfidenceArgs = dataclasses.field(default_factory=ConfidenceArgs, metadata=dict(static=True))
    needs_token_prob = True

    def after(self, carry, j, logits, hidden, token_prob=None):
        if token_prob is None:
            raise ValueError("policy 'confidence' needs token_prob = q_j(d_j), the probability of the sampled draft "
                             "token under the draft distribution")
        return confidence_continue(token_prob, j, self.args), carry


def confidence_continue(conf: jax.Array, j, args: ConfidenceArgs) -> jax.Array:
    """``[B]`` bool: keep drafting after draft index ``j`` (0-based) whose sampled token has probability ``conf``
    under the draft distribution."""
    return (conf >= args.threshold) | (j + 1 < args.min_len)


# ----------------------------------------------------------------------------------------------------------------
# SpecDec++ (§A2)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpecDecPPArgs:
    """SpecDec++ (Huang et al. 2024): stop when P(at least one rejection) > ``threshold``; ``min_len``/``max_len``
    bound the draft (reference defaults 0.3 and (2, 20); the loop also caps at ``decode.draft_len``).
    ``head_path``: a head trained by ``jaxtok train configs/heads/specdecpp.yaml`` (its run directory; None: an
    untrained head from ``seed``); ``depth``: residual blocks of a new head."""

    threshold: float = 0.3
    min_len: int = 2
    max_len: int = 20
    head_path: Optional[str] = None
    depth: int = 3
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r}: allowed values in [0, 1]")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"min_len={self.min_len!r}, max_len={self.max_len!r}: allowed 1 <= min_len <= max_len")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecDecPP(DraftPolicy):
    """SpecDec++ stop rule (§A2 inference, schedule ``ada``). After drafting ``d_j`` (s = j+1) from a forward whose
    input was ``d_{j-1}``: ``a = softmax(head(hidden_j))[1]`` = P(accept ``d_{j-1}``) (``a = 1`` at j = 0);
    ``cum *= a``; stop iff ``1 - cum > threshold`` (never when s < min_len, always when s >= max_len). The head's
    verdict on a token lags one step (pitfall in §A2). Carry: ``cum [B]``."""

    head_graphdef: Any = dataclasses.field(metadata=dict(static=True))
    head_state: Any
    args: SpecDecPPArgs = dataclasses.field(default_factory=SpecDecPPArgs, metadata=dict(static=True))
    needs_hidden = True

    def round_init(self, batch):
        return jnp.ones((batch,), jnp.float32)

    def accept_prob(self, hidden: jax.Array) -> jax.Array:
        """P(accept) ``[...]`` from drafter hidden states ``[..., D]``."""
        head = nnx.merge(self.head_graphdef, self.head_state)
        return jax.nn.softmax(head(hidden), axis=-1)[..., 1]

    def after(self, carry, j, logits, hidden, token_prob=None):
        if hidden is None:
            raise ValueError("policy 'specdecpp' needs the drafter's hidden states: use an autoregressive model "
                             "drafter (decode.draft_init_from), not n-gram or DEER")
        a = jnp.where(j == 0, 1.0, self.accept_prob(hidden))
        return specdecpp_continue(carry, a, j, self.args)


def specdecpp_continue(cum_accept: jax.Array, accept_prob: jax.Array, j, args: SpecDecPPArgs):
    """One SpecDec++ step: ``(continue [B], cum')`` with ``cum' = cum * accept_prob`` and stop iff
    ``1 - cum' > threshold``, overridden by the bounds on s = j + 1."""
    cum = cum_accept * accept_prob
    s = j + 1
    stop = (1.0 - cum) > args.threshold
    stop = jnp.where(s < args.min_len, False, stop)
    stop = jnp.where(s >= args.max_len, True, stop)
    return ~stop, cum


# ----------------------------------------------------------------------------------------------------------------
# SpecKV (§A3)
# ----------------------------------------------------------------------------------------------------------------

SPECKV_FEATURES = ("mean_draft_entropy", "mean_draft_confidence", "max_draft_entropy", "min_draft_confidence",
                   "comp_enc", "gamma")


@dataclasses.dataclass(frozen=True)
class SpecKVArgs:
    """SpecKV (arXiv:2605.02888): candidates γ, the first round's γ, the target-compression code (0 = fp16,
    1 = int8, 2 = nf4), the head (None: untrained from ``seed``) and its hidden width."""

    candidates: Tuple[int, ...] = (2, 4, 6, 8)
    initial: int = 4
    comp_enc: int = 0
    head_path: Optional[str] = None
    hidden: int = 16
    seed: int = 0

    def __post_init__(self):
        if not self.candidates or any(c < 1 for c in self.candidates):
            raise ValueError(f"candidates={self.candidates!r}: allowed a non-empty list of integers >= 1")
        if self.initial < 1:
            raise ValueError(f"initial={self.initial!r}: allowed integers >= 1")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecKV(DraftPolicy):
    """SpecKV γ choice (§A3): before a round, score each candidate γ with the predicted acceptance rate
    ``a(γ) = clip(mlp([features, comp_enc, γ]), 0, 1)`` and pick ``argmax_γ a(γ)·γ + 1``. Features are the
    previous round's draft statistics (mean/max entropy in bits, mean/min top-1 probability over its valid
    drafts); the first round uses ``initial``. State: ``{"gamma": [B], "features": [B, 4], "seen": [B]}``."""

    head_graphdef: Any = dataclasses.field(metadata=dict(static=True))
    head_state: Any
    args: SpecKVArgs = dataclasses.field(default_factory=SpecKVArgs, metadata=dict(static=True))

    def check(self, gamma_max):
        if max(self.args.candidates) > gamma_max or self.args.initial > gamma_max:
            raise ConfigError(f"decode.policy_args.candidates={list(self.args.candidates)} (initial "
                              f"{self.args.initial}) exceed decode.draft_len={gamma_max}; raise draft_len")

    def init(self, batch, gamma_max):
        return {"features": jnp.zeros((batch, 4), jnp.float32), "seen": jnp.zeros((batch,), bool)}

    def predict(self, features: jax.Array) -> jax.Array:
        """Predicted acceptance rate ``[B, C]`` of each candidate γ from round features ``[B, 4]``."""
        head = nnx.merge(self.head_graphdef, self.head_state)
        return speckv_predict(head, features, self.args.candidates, self.args.comp_enc)

    def round_gamma(self, state, gamma_max, batch):
        chosen = speckv_choose(self.predict(state["features"]), self.args.candidates)
        return jnp.where(state["seen"], chosen, self.args.initial).astype(jnp.int32)

    def update(self, state, gamma, drafted, accepted, stats, live):
        feats = speckv_features(stats)
        has = live & jnp.any(stats.valid, axis=-1)
        return {"features": jnp.where(has[:, None], feats, state["features"]), "seen": state["seen"] | has}


def speckv_features(stats: DraftStats) -> jax.Array:
    """``[B, 4]``: mean entropy (bits), mean top-1 probability, max entropy, min top-1 probability over valid
    drafts (0 for a row without any)."""
    v = stats.valid
    n = jnp.maximum(jnp.sum(v, axis=-1), 1)
    mean_h = jnp.sum(jnp.where(v, stats.entropy_bits, 0.0), axis=-1) / n
    mean_c = jnp.sum(jnp.where(v, stats.confidence, 0.0), axis=-1) / n
    max_h = jnp.max(jnp.where(v, stats.entropy_bits, 0.0), axis=-1)
    min_c = jnp.where(jnp.any(v, axis=-1), jnp.min(jnp.where(v, stats.confidence, 1.0), axis=-1), 0.0)
    return jnp.stack([mean_h, mean_c, max_h, min_c], axis=-1).astype(jnp.float32)


def speckv_inputs(features: jax.Array, candidates, comp_enc: int) -> jax.Array:
    """The 6 SpecKV inputs per candidate: ``[B, 4]`` -> ``[B, C, 6]`` (order of :data:`SPECKV_FEATURES`)."""
    b, c = features.shape[0], len(candidates)
    f = jnp.broadcast_to(features[:, None, :], (b, c, 4))
    comp = jnp.full((b, c, 1), float(comp_enc), jnp.float32)
    gam = jnp.broadcast_to(jnp.asarray(candidates, jnp.float32)[None, :, None], (b, c, 1))
    return jnp.concatenate([f, comp, gam], axis=-1)


def speckv_predict(head, features, candidates, comp_enc) -> jax.Array:
    """``clip(head(inputs), 0, 1)`` -> ``[B, C]`` predicted acceptance rates."""
    return jnp.clip(head(speckv_inputs(features, candidates, comp_enc))[..., 0], 0.0, 1.0)


def speckv_choose(pred_rate: jax.Array, candidates) -> jax.Array:
    """``argmax_γ pred(γ)·γ + 1`` (linear expected-tokens proxy, §A3) -> chosen γ ``[B]`` int32 (ties: the
    smaller γ, i.e. the earlier candidate)."""
    cand = jnp.asarray(candidates, jnp.float32)
    idx = jnp.argmax(pred_rate * cand + 1.0, axis=-1)
    return jnp.asarray(candidates, jnp.int32)[idx]


# ----------------------------------------------------------------------------------------------------------------
# Batch-size-aware γ (vLLM dynamic speculative decoding, DSpark)
# ----------------------------------------------------------------------------------------------------------------


def interp_log_batch(batch: int, batch_sizes, values) -> float:
    """Piecewise-linear interpolation of ``values`` (one per calibrated batch size, increasing) in log2(batch);
    clamped to the end values outside the calibrated range. One value: constant."""
    bs = [float(b) for b in batch_sizes]
    vs = [float(v) for v in values]
    if len(vs) == 1:
        return vs[0]
    x = math.log2(max(batch, 1))
    xs = [math.log2(b) for b in bs]
    if x <= xs[0]:
        return vs[0]
    if x >= xs[-1]:
        return vs[-1]
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            return vs[i] + t * (vs[i + 1] - vs[i])
    return vs[-1]


@dataclasses.dataclass(frozen=True)
class BatchGammaArgs:
    """A cost model per calibrated batch size (all lists as long as ``batch_sizes``, increasing; a one-element list
    applies to every batch size): ``acceptance`` α_B (i.i.d. per-token acceptance, e.g. from
    :func:`alpha_from_accepted`), ``draft_cost`` c_B = one drafter step / one target AR step, ``verify_cost`` k_B =
    the extra cost of each verified position (a verification of γ + 1 tokens costs 1 + k_B·γ target steps),
    ``round_overhead`` o_B = per-round work besides the forwards (acceptance, cache rollback, the drafter's re-fed
    window), in target steps (> −1: negative when a round's loop costs less than an AR step's, e.g. when the AR
    step's own per-step work is counted in the unit). ``candidates``: the draft lengths to choose from; 0 = plain AR."""

    batch_sizes: Tuple[int, ...] = (1,)
    acceptance: Tuple[float, ...] = (0.8,)
    draft_cost: Tuple[float, ...] = (0.1,)
    verify_cost: Tuple[float, ...] = (0.0,)
    round_overhead: Tuple[float, ...] = (0.0,)
    candidates: Tuple[int, ...] = (0, 2, 4, 6, 8)

    def __post_init__(self):
        n = len(self.batch_sizes)
        if n < 1 or any(int(b) < 1 for b in self.batch_sizes) or list(self.batch_sizes) != sorted(
                set(self.batch_sizes)):
            raise ValueError(f"batch_sizes={list(self.batch_sizes)!r}: allowed increasing integers >= 1")
        for name in ("acceptance", "draft_cost", "verify_cost", "round_overhead"):
            v = getattr(self, name)
            if len(v) not in (1, n):
                raise ValueError(f"{name}={list(v)!r}: allowed one value or one per batch size ({n})")
            low = -1.0 if name == "round_overhead" else 0.0  # a round may cost less than an AR step plus forwards
            if any(x < low or (low < 0 and x <= low) for x in v):
                raise ValueError(f"{name}={list(v)!r}: allowed values " + ("> -1" if low < 0 else ">= 0"))
        if any(a > 1 for a in self.acceptance):
            raise ValueError(f"acceptance={list(self.acceptance)!r}: allowed values in [0, 1]")
        if not self.candidates or any(int(c) < 0 for c in self.candidates):
            raise ValueError(f"candidates={list(self.candidates)!r}: allowed a non-empty list of integers >= 0")


def batch_gamma_speedup(gamma: int, alpha: float, c: float, k: float, overhead: float) -> float:
    """Modelled speedup over AR of fixed-γ speculative decoding at one batch size:
    ``E_tokens(α, γ) / (1 + k·γ + c·γ + o)`` (time per round in target AR steps: one verification of γ + 1 tokens,
    γ drafter steps, the round's overhead); exactly 1 for γ = 0 (plain AR)."""
    if gamma <= 0:
        return 1.0
    return expected_tokens_per_round(alpha, gamma) / (1.0 + k * gamma + c * gamma + overhead)


def batch_gamma_choice(args: BatchGammaArgs, batch: int) -> tuple[int, dict]:
    """``(γ*, {γ: modelled speedup})``: the candidate with the largest :func:`batch_gamma_speedup` at ``batch``
    (cost-model parameters interpolated in log batch size); ties go to the smaller γ, so γ = 0 (AR) wins unless
    speculation is modelled strictly faster."""
    n = len(args.batch_sizes)

    def at(v):
        return interp_log_batch(batch, args.batch_sizes if len(v) == n else args.batch_sizes[:1], v)

    a, c, k, o = at(args.acceptance), at(args.draft_cost), at(args.verify_cost), at(args.round_overhead)
    scores = {int(g): batch_gamma_speedup(int(g), a, c, k, o) for g in sorted(set(args.candidates))}
    best = max(scores, key=lambda g: (scores[g], -g))
    return best, scores


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchGamma(DraftPolicy):
    """Batch-size-aware draft length (vLLM's dynamic speculative decoding; DSpark): γ is a function of the batch
    size alone, chosen before decoding by :func:`batch_gamma_choice`, the same for every row and round.

    γ* = 0 means "do not speculate". Inside the loop a round whose rows all draft 0 tokens verifies one position
    (an AR step; the drafter still re-feeds 2 tokens to keep its cache exact), measured 0.69–0.77× of ``generate``
    (docs/results/spec_membound.md), so the caller should ask :meth:`gamma_for` first and run plain AR
    (``generate``) when it is 0, else ``speculative_generate`` with ``draft_len = γ*``; inside the loop
    ``round_gamma`` caps rows at ``min(γ*, draft_len)``."""

    args: BatchGammaArgs = dataclasses.field(default_factory=BatchGammaArgs, metadata=dict(static=True))

    def gamma_for(self, batch: int) -> int:
        """γ* at ``batch`` rows (0 = run AR instead)."""
        return batch_gamma_choice(self.args, batch)[0]

    def round_gamma(self, state, gamma_max, batch):
        return jnp.full((batch,), min(self.gamma_for(batch), gamma_max), jnp.int32)

    def constant_gamma(self, gamma_max, batch):
        return min(self.gamma_for(batch), gamma_max)


# ----------------------------------------------------------------------------------------------------------------
# FASER per-request draft length (§A7)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FaserArgs:
    """FASER per-request γ (§A7; the rule below is INFERRED, the paper gives no formula in the spec). Cost model as
    :class:`BatchGammaArgs` (``draft_cost`` c_L, ``verify_cost`` k_L, ``round_overhead`` o_L per calibrated batch
    size ``batch_sizes``, in target AR steps; interpolated in log2 of the live-row count L); acceptance from the
    row's own history: ``decay`` λ of the per-row counts, ``prior_acceptance`` α0 with weight ``prior_weight`` w0
    (pseudo-trials); ``candidates``: the γ to choose from (empty: 0 .. ``decode.draft_len``)."""

    batch_sizes: Tuple[int, ...] = (1,)
    draft_cost: Tuple[float, ...] = (0.1,)
    verify_cost: Tuple[float, ...] = (0.0,)
    round_overhead: Tuple[float, ...] = (0.0,)
    decay: float = 0.8
    prior_acceptance: float = 0.8
    prior_weight: float = 2.0
    candidates: Tuple[int, ...] = ()

    def __post_init__(self):
        BatchGammaArgs(batch_sizes=self.batch_sizes, draft_cost=self.draft_cost, verify_cost=self.verify_cost,
                       round_overhead=self.round_overhead)  # the same checks as batch_gamma's cost model
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay={self.decay!r}: allowed values in [0, 1]")
        if not 0.0 <= self.prior_acceptance <= 1.0:
            raise ValueError(f"prior_acceptance={self.prior_acceptance!r}: allowed values in [0, 1]")
        if not self.prior_weight > 0.0:
            raise ValueError(f"prior_weight={self.prior_weight!r}: allowed values > 0")
        if any(int(c) < 0 for c in self.candidates):
            raise ValueError(f"candidates={list(self.candidates)!r}: allowed integers >= 0")


def expected_tokens_jnp(alpha: jax.Array, gamma_max: int) -> jax.Array:
    """σ(α, γ) = Σ_{i=0}^{γ} α^i = (1 − α^{γ+1}) / (1 − α) (:func:`expected_tokens_per_round`) for every
    γ = 0..``gamma_max`` at once: ``alpha [B]`` -> ``[B, γmax + 1]`` float32 (exact at α = 1: γ + 1)."""
    powers = jnp.asarray(alpha, jnp.float32)[:, None] ** jnp.arange(gamma_max + 1, dtype=jnp.float32)[None, :]
    return jnp.cumsum(powers, axis=-1)


def _interp_log2(load: jax.Array, batch_sizes, values) -> jax.Array:
    """:func:`interp_log_batch` in jnp on a traced row count ``load []`` (clamped to the end values)."""
    vs = [float(v) for v in values]
    if len(vs) == 1:
        return jnp.float32(vs[0])
    xs = jnp.log2(jnp.asarray([float(b) for b in batch_sizes], jnp.float32))
    return jnp.interp(jnp.log2(jnp.maximum(load, 1).astype(jnp.float32)), xs, jnp.asarray(vs, jnp.float32))


def faser_cost_coeffs(args: FaserArgs, load: jax.Array) -> tuple:
    """``(c_L, k_L, o_L)`` at ``load`` live rows (one-element lists apply to every load)."""
    n = len(args.batch_sizes)

    def at(v):
        return _interp_log2(load, args.batch_sizes if len(v) == n else args.batch_sizes[:1], v)

    return at(args.draft_cost), at(args.verify_cost), at(args.round_overhead)


def faser_gamma(alpha: jax.Array, load: jax.Array, args: FaserArgs, gamma_max: int) -> jax.Array:
    """FASER per-row draft length (INFERRED rule): ``γ_b = argmax_{γ ∈ candidates, γ <= γmax} σ(α_b, γ) /
    cost_L(γ)`` with ``cost_L(0) = 1`` (an AR step) and ``cost_L(γ) = 1 + (k_L + c_L)·γ + o_L`` for γ > 0 (one
    verification of γ + 1 positions, γ drafter steps, the round's overhead: :func:`batch_gamma_speedup`'s
    denominator at L = the live-row count). Ties go to the smaller γ. Limits: α_b = 1 gives γmax whenever
    ``k_L + c_L < 1 + o_L`` ((γ + 1)/(1 + o + mγ) is then increasing); α_b = 0 gives 0 (σ = 1 for every γ and
    cost > 1 for γ > 0 when ``o_L + k_L + c_L > 0``). ``alpha [B]``, ``load []`` -> ``[B]`` int32."""
    c, k, o = faser_cost_coeffs(args, load)
    cands = sorted({int(x) for x in args.candidates if int(x) <= gamma_max}) or list(range(gamma_max + 1))
    g = jnp.asarray(cands, jnp.int32)
    sigma = expected_tokens_jnp(alpha, gamma_max)[:, g]  # [B, C]
    gf = g.astype(jnp.float32)[None, :]
    cost = jnp.where(gf > 0, 1.0 + (k + c) * gf + o, 1.0)  # [1, C]
    return g[jnp.argmax(sigma / cost, axis=-1)].astype(jnp.int32)


def faser_alpha(state: dict, args: FaserArgs) -> jax.Array:
    """The row's acceptance estimate ``α_b = (S_b + w0·α0) / (N_b + w0)`` from its decayed counts of accepted
    drafts S_b and acceptance trials N_b (:meth:`Faser.update`). ``[B]`` float32."""
    w0 = args.prior_weight
    return (state["succ"] + w0 * args.prior_acceptance) / (state["trials"] + w0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Faser(DraftPolicy):
    """FASER per-request draft length (arXiv:2604.20503, §A7 item 1) inside a continuous batch: each round, row b
    drafts up to :func:`faser_gamma` (α_b, L) tokens, α_b its own acceptance estimate (:func:`faser_alpha`), L the
    number of rows still generating (the load; in the serving engine the occupied slots).

    Per-row update after a round in which row b was live (INFERRED): a round that proposed k_b drafts and accepted
    a_b observes a_b successes in ``a_b + [a_b < k_b]`` Bernoulli trials (the accepted prefix, then the first
    rejection if any: a geometric observation); ``S_b ← λ·S_b + a_b``, ``N_b ← λ·N_b + a_b + [a_b < k_b]``. A row
    that drafted nothing (γ_b = 0) observes nothing and its counts decay, so α_b returns towards the prior α0 and
    the row drafts again (exploration). State ``{"succ": [B], "trials": [B]}`` float32, zero at admission."""

    args: FaserArgs = dataclasses.field(default_factory=FaserArgs, metadata=dict(static=True))

    def init(self, batch, gamma_max):
        return {"succ": jnp.zeros((batch,), jnp.float32), "trials": jnp.zeros((batch,), jnp.float32)}

    def round_gamma(self, state, gamma_max, batch):
        return self.gamma_for_round(state, gamma_max, batch, jnp.ones((batch,), bool))

    def gamma_for_round(self, state, gamma_max, batch, live):
        return faser_gamma(faser_alpha(state, self.args), jnp.sum(live), self.args, gamma_max)

    def update(self, state, gamma, drafted, accepted, stats, live):
        succ, trials = faser_observe(state["succ"], state["trials"], drafted, accepted, self.args.decay)
        return {"succ": jnp.where(live, succ, state["succ"]), "trials": jnp.where(live, trials, state["trials"])}


def faser_observe(succ, trials, drafted, accepted, decay: float):
    """One round's decayed update of a row's acceptance counts (:class:`Faser`): ``(λ·S + a, λ·N + a + [a < k])``
    with ``a = accepted``, ``k = drafted`` (nothing observed when k = 0). ``[B]`` float32 each."""
    a = accepted.astype(jnp.float32)
    obs = jnp.where(drafted > 0, a + (accepted < drafted).astype(jnp.float32), 0.0)
    return decay * succ + jnp.where(drafted > 0, a, 0.0), decay * trials + obs


# ----------------------------------------------------------------------------------------------------------------
# Registry and construction
# ----------------------------------------------------------------------------------------------------------------


@DRAFT_POLICIES.register("fixed", None)
def make_fixed(args=None, **_) -> Fixed:
    return Fixed()


@DRAFT_POLICIES.register("heuristic", HeuristicArgs)
def make_heuristic(args: HeuristicArgs, **_) -> Heuristic:
    return Heuristic(args=args)


@DRAFT_POLICIES.register("confidence", ConfidenceArgs)
def make_confidence(args: ConfidenceArgs, **_) -> Confidence:
    return Confidence(args=args)


@DRAFT_POLICIES.register("specdecpp", SpecDecPPArgs)
def make_specdecpp(args: SpecDecPPArgs, *, hidden_size: Optional[int] = None, head: Optional[MLPHead] = None,
                   **_) -> SpecDecPP:
    """``hidden_size``: the drafter's hidden width (for a new head); ``head``: a trained head (else ``head_path``,
    else untrained)."""
    if head is None and args.head_path:
        head = load_head(args.head_path, kinds=("specdecpp",))
    if head is None:
        if hidden_size is None:
            raise ConfigError("policy 'specdecpp' needs a model drafter (its hidden size) or a trained head")
        head = specdecpp_head(hidden_size, args.depth, args.seed)
    graphdef, state = nnx.split(head)
    return SpecDecPP(head_graphdef=graphdef, head_state=state, args=args)


@DRAFT_POLICIES.register("speckv", SpecKVArgs)
def make_speckv(args: SpecKVArgs, *, head: Optional[MLPHead] = None, **_) -> SpecKV:
    if head is None and args.head_path:
        head = load_head(args.head_path, kinds=("speckv",))
    if head is None:
        head = speckv_head(args.hidden, args.seed)
    graphdef, state = nnx.split(head)
    return SpecKV(head_graphdef=graphdef, head_state=state, args=args)


@DRAFT_POLICIES.register("batch_gamma", BatchGammaArgs)
def make_batch_gamma(args: BatchGammaArgs, **_) -> BatchGamma:
    return BatchGamma(args=args)


@DRAFT_POLICIES.register("faser", FaserArgs)
def make_faser(args: FaserArgs, **_) -> Faser:
    return Faser(args=args)


def build_policy(name: Optional[str] = "fixed", args: Any = None, **context) -> DraftPolicy:
    """A policy by registered name; ``args`` is its argument dataclass or a mapping (checked, ConfigError on
    unknown keys); ``context``: ``hidden_size`` (drafter width), ``head`` (a trained MLPHead)."""
    name = name or "fixed"
    entry = DRAFT_POLICIES.entry(name, "decode.policy")
    if args is None or isinstance(args, Mapping):
        args = DRAFT_POLICIES.parse_args(name, args, "decode.policy_args")
    return entry.fn(args, **context)


# ----------------------------------------------------------------------------------------------------------------
# Arguments of the drafter TAPS and the method EAD (``decode.drafter=taps``, ``decode.method=ead``; jaxtok.decode.run)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TAPSArgs:
    """TAPS (§A5), ``decode.drafter_args``: route each round among ``decode.draft_init_from`` (if set), the run
    directories in ``drafters`` and, with ``ngram``, a prompt-lookup drafter of order ``max_ngram``; the draft
    length follows ``decode.policy`` as with one drafter."""

    drafters: Tuple[str, ...] = ()
    ngram: bool = True
    max_ngram: int = 3


@dataclasses.dataclass(frozen=True)
class EADArgs:
    """Entropy Adaptive Decoding (arXiv:2502.06833): rolling ``window`` w of per-token entropies (bits, from the
    producing model's untempered logits); switch to the large model when the window mean exceeds ``threshold``
    τ and back when it does not, but only after ``min_dwell`` tokens from the current model; ``start`` model;
    ``chunk``: tokens per catch-up forward when a model re-joins after the other one produced tokens."""

    window: int = 5
    threshold: float = 1.0
    min_dwell: int = 5
    start: str = "small"
    chunk: int = 8

    def __post_init__(self):
        for name in ("window", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: allowed integers >= 1")
        if self.min_dwell < 0:
            raise ValueError(f"min_dwell={self.min_dwell!r}: allowed integers >= 0")
        if self.start not in ("small", "large"):
            raise ValueError(f"start={self.start!r}: allowed 'small', 'large'")


def ead_switch(mode_large: jax.Array, dwell: jax.Array, mean_entropy: jax.Array, args: EADArgs):
    """EAD's rule (§A4) after a token: ``want = mean_entropy > τ``; switch iff ``want != mode`` and
    ``dwell >= min_dwell`` (dwell = tokens from the current model since the last switch, this one included).
    Returns ``(mode_large [B], dwell [B])`` with dwell reset to 0 on a switch."""
    want = mean_entropy > args.threshold
    switch = (want != mode_large) & (dwell >= args.min_dwell)
    return jnp.where(switch, want, mode_large), jnp.where(switch, 0, dwell)
