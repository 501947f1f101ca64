"""Token-selection rules for selective distillation: TIP, TRACE spans, SHRED, TAD (``train_methods.md`` §2–5).

Every rule is a pure function with static shapes: inputs are per-token statistics ``[B, T]`` and a ``valid``
(response / loss) mask ``[B, T]``; the output is a float32 weight ``[B, T]`` (0/1 for mask rules), always 0 where
``valid`` is False. Fractions ``rho`` and counts may be traced: "keep K of N" is a rank mask
(:func:`jaxtok.sampling.topk_mask`), never ``lax.top_k`` with a dynamic K (§0 rule 2).

Counting convention (TIP repo, §2): ``N`` = valid tokens in the call (flattened over sequences, or per row with
``per_row``); ``K = max(1, floor(ρ·N))`` capped at ``N``; ``K = 0`` when ``N = 0``.

Granularity: a rule selects among the tokens of one call. ``granularity="micro_batch"`` (the TIP repo) means the
objective calls it once per micro-batch; ``"batch"`` means the caller passes the whole batch (K and the min-max /
quantile statistics then do not depend on micro-batch composition, §2 pitfalls). Loss normalisation over the
selection is :func:`selected_loss`, returning the ``(sum, count)`` pair of the train step.

Registered in :data:`jaxtok.registry.SELECTIONS` with a uniform signature
``rule(stats: Mapping[str, Array], valid, key, args) -> weights [B, T]``; ``args.needs()`` lists the ``stats``
keys the rule reads (see :data:`jaxtok.stats.STAT_NAMES`). ``near_distant`` (TAD) is the exception: it reads the
token states ``x_t``/``x_target`` and returns a :class:`NearDistant` pair of masks.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxtok.registry import SELECTIONS, ConfigError
from jaxtok.sampling import topk_mask

__all__ = [
    "keep_count", "masked_quantile", "masked_min_max", "top_fraction", "gumbel_top_fraction", "select_all",
    "select_random", "entropy_sample", "entropy_topk", "soft_or_score", "soft_or", "q3_score", "q3", "quadrants",
    "quadrant_shares", "select_quadrants", "cap_spans", "lowest_prob", "NearDistant", "near_distant",
    "selected_loss", "SelectArgs", "AllArgs", "RandomArgs", "EntropySampleArgs", "EntropyTopkArgs", "SoftOrArgs",
    "Q3Args", "QuadrantArgs", "SpansArgs", "LowestProbArgs", "NearDistantArgs",
]

_F32 = jnp.float32
_EPS32 = float(jnp.finfo(jnp.float32).eps)


# ----------------------------------------------------------------------------------------------------------------
# Static-shape helpers


def keep_count(rho, n_valid, at_least_one: bool = True) -> jax.Array:
    """``K = max(1, floor(ρ·N))`` capped at ``N`` (0 when ``N = 0``); ``ρ`` and ``N`` may be traced. int32.

    A relative ``4·eps`` nudge makes ``floor(0.3·10) = 3`` despite float32 rounding."""
    n = jnp.asarray(n_valid, _F32)
    k = jnp.floor(jnp.asarray(rho, _F32) * n * (1.0 + 4 * _EPS32))
    if at_least_one:
        k = jnp.maximum(k, 1.0)
    return jnp.clip(k, 0.0, n).astype(jnp.int32)


def masked_quantile(x: jax.Array, valid: jax.Array, q, axis: Optional[int] = None) -> jax.Array:
    """Quantile ``q ∈ [0, 1]`` of ``x`` over ``valid`` entries (linear interpolation, numpy's default), over all
    entries (``axis=None``) or along ``axis`` (reduced). 0 where nothing is valid. ``q`` may be traced."""
    if axis is None:
        x, valid, axis = x.reshape(-1), valid.reshape(-1), 0
    x = jnp.moveaxis(x.astype(_F32), axis, -1)
    valid = jnp.moveaxis(valid.astype(bool), axis, -1)
    srt = jnp.sort(jnp.where(valid, x, jnp.inf), axis=-1)  # valid values first
    n = jnp.sum(valid, axis=-1)
    pos = jnp.asarray(q, _F32) * jnp.maximum(n - 1, 0).astype(_F32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    take = lambda i: jnp.take_along_axis(srt, i[..., None], axis=-1)[..., 0]  # noqa: E731
    x_lo, x_hi = take(lo), take(hi)
    out = x_lo + (pos - lo) * (x_hi - x_lo)
    return jnp.where(n > 0, jnp.where(hi > lo, out, x_lo), 0.0)


def masked_min_max(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Min-max normalise ``x`` to ``[0, 1]`` over the valid entries; 0 where the range is 0 or nothing is valid."""
    x = x.astype(_F32)
    lo = jnp.min(jnp.where(valid, x, jnp.inf))
    hi = jnp.max(jnp.where(valid, x, -jnp.inf))
    rng = hi - lo
    ok = jnp.isfinite(rng) & (rng > 0)
    return jnp.where(valid & ok, (x - lo) / jnp.where(ok, rng, 1.0), 0.0)


def _flat_or_rows(fn, scores, valid, per_row):
    """Apply ``fn(scores [N], valid [N]) -> [N]`` over all tokens (``per_row=False``) or each row of ``[B, T]``."""
    if per_row:
        return jax.vmap(fn)(scores, valid)
    return fn(scores.reshape(-1), valid.reshape(-1)).reshape(scores.shape)


def top_fraction(scores: jax.Array, valid: jax.Array, rho, per_row: bool = False, at_least_one: bool = True):
    """Deterministic top-``K`` of ``scores`` among valid tokens, ``K = keep_count(ρ, N)`` (ties by index).
    ``[B, T]`` bool."""
    def one(s, v):
        return topk_mask(s, keep_count(rho, jnp.sum(v), at_least_one), v)

    return _flat_or_rows(one, scores.astype(_F32), valid.astype(bool), per_row)


def gumbel_top_fraction(key: jax.Array, log_weights: jax.Array, valid: jax.Array, rho, per_row: bool = False):
    """``K = keep_count(ρ, N)`` tokens drawn without replacement with probability ∝ ``exp(log_weights)``:
    Gumbel-top-k (the top K of ``log w + Gumbel`` is a Plackett–Luce draw, i.e. sequential sampling without
    replacement, §2 rule 1). ``[B, T]`` bool."""
    g = jax.random.gumbel(key, log_weights.shape, _F32)
    return top_fraction(log_weights.astype(_F32) + g, valid, rho, per_row)


def selected_loss(per_token_loss: jax.Array, weights: jax.Array, valid: jax.Array,
                  normalize_by: str = "selected") -> tuple[jax.Array, jax.Array]:
    """``(Σ w·L, count)`` over valid tokens: ``count = Σ w`` (``selected``, the TIP repo: mean over the K kept
    tokens) or ``Σ valid`` (``all``: the unselected tokens count as zero loss), §2 pitfalls. Empty → ``(0, 0)``;
    divide with ``where(count > 0, ...)`` (the train step does) so an empty selection gives 0, never NaN."""
    if normalize_by not in ("selected", "all"):
        raise ConfigError(f"normalize_by={normalize_by!r} is not allowed; allowed: ['selected', 'all']")
    w = jnp.where(valid, weights.astype(_F32), 0.0)
    total = jnp.sum(jnp.where(valid, w * per_token_loss.astype(_F32), 0.0))
    count = jnp.sum(w) if normalize_by == "selected" else jnp.sum(valid.astype(_F32))
    return total, count


# ----------------------------------------------------------------------------------------------------------------
# TIP rules (§2)


def select_all(valid: jax.Array) -> jax.Array:
    """Plain OPD: every valid token, weight 1 (§1)."""
    return valid.astype(_F32)


def select_random(key: jax.Array, valid: jax.Array, rho, per_row: bool = False) -> jax.Array:
    """A uniformly random subset of exactly ``K = keep_count(ρ, N)`` valid tokens (the TIP random baseline)."""
    return gumbel_top_fraction(key, jnp.zeros(valid.shape, _F32), valid, rho, per_row).astype(_F32)


def entropy_sample(key: jax.Array, entropy_norm: jax.Array, valid: jax.Array, rho, alpha=2.0, gamma=0.0,
                   divergence: Optional[jax.Array] = None, per_row: bool = False) -> jax.Array:
    """TIP ``entropy_sample`` (§2 rule 1): draw ``K = max(1, floor(ρN))`` valid tokens without replacement with
    probability ∝ ``w = max(ĥ, 1e-8)^α · max(δ̂, 1e-8)^γ`` (Gumbel-top-k). ``α = γ = 0`` is uniform sampling.
    ``ρ``, ``α``, ``γ`` may be traced; ``divergence`` (δ̂, e.g. JSD_0.5/ln 2) is required when ``γ`` may be ≠ 0."""
    if divergence is None and not (isinstance(gamma, (int, float)) and gamma == 0):
        raise ConfigError(f"entropy_sample: gamma={gamma!r} needs a divergence array (got None); use gamma=0")
    log_w = jnp.asarray(alpha, _F32) * jnp.log(jnp.maximum(entropy_norm.astype(_F32), 1e-8))
    if divergence is not None:
        log_w = log_w + jnp.asarray(gamma, _F32) * jnp.log(jnp.maximum(divergence.astype(_F32), 1e-8))
    return gumbel_top_fraction(key, log_w, valid, rho, per_row).astype(_F32)


def entropy_topk(entropy_norm: jax.Array, valid: jax.Array, rho, per_row: bool = False) -> jax.Array:
    """Deterministic top-ρ tokens by student entropy (§2 rule 2, ablation of ``entropy_sample``)."""
    return top_fraction(entropy_norm, valid, rho, per_row).astype(_F32)


def soft_or_score(entropy: jax.Array, divergence: jax.Array, valid: jax.Array, clip_quantile=0.98) -> jax.Array:
    """TIP Soft-OR score (§2 rule 3, paper Eq. 7): clip entropy at its ``clip_quantile`` over valid tokens, min-max
    normalise entropy and divergence over valid tokens, ``s = ĥ + δ̂ − ĥ·δ̂ = 1 − (1−ĥ)(1−δ̂) ∈ [0, 1]``."""
    h = jnp.minimum(entropy.astype(_F32), masked_quantile(entropy, valid, clip_quantile))
    h_hat, d_hat = masked_min_max(h, valid), masked_min_max(divergence, valid)
    return jnp.where(valid, 1.0 - (1.0 - h_hat) * (1.0 - d_hat), 0.0)


def soft_or(entropy: jax.Array, divergence: jax.Array, valid: jax.Array, rho, clip_quantile=0.98,
            per_row: bool = False) -> jax.Array:
    """TIP ``soft_or``: deterministic top-ρ by :func:`soft_or_score` (statistics over the whole call)."""
    return top_fraction(soft_or_score(entropy, divergence, valid, clip_quantile), valid, rho, per_row).astype(_F32)


def q3_score(entropy_norm: jax.Array, forward_kl: jax.Array) -> jax.Array:
    """TIP Q3 (overconfident-and-wrong) score (§2 rule 4): ``w = δ^fwd · (1 − ĥ)``."""
    return forward_kl.astype(_F32) * (1.0 - entropy_norm.astype(_F32))


def q3(entropy_norm: jax.Array, forward_kl: jax.Array, valid: jax.Array, rho, per_row: bool = False) -> jax.Array:
    """TIP ``q3`` detector: deterministic top-ρ (ρ ≲ 0.1) by :func:`q3_score`; train with reverse KL on them."""
    return top_fraction(q3_score(entropy_norm, forward_kl), valid, rho, per_row).astype(_F32)


def quadrants(entropy: jax.Array, divergence: jax.Array, valid: jax.Array, tau_h_quantile=0.5,
              tau_delta_quantile=0.5) -> jax.Array:
    """TIP two-axis taxonomy (§2): thresholds are quantiles over the valid tokens; "high" means strictly above.
    Q1 high-entropy/high-divergence, Q2 high/low, Q3 low-entropy/high-divergence (overconfident and wrong),
    Q4 low/low. ``[B, T]`` int32 in {1, 2, 3, 4}, 0 on invalid tokens."""
    hi_h = entropy > masked_quantile(entropy, valid, tau_h_quantile)
    hi_d = divergence > masked_quantile(divergence, valid, tau_delta_quantile)
    q = jnp.where(hi_h, jnp.where(hi_d, 1, 2), jnp.where(hi_d, 3, 4))
    return jnp.where(valid, q, 0).astype(jnp.int32)


def quadrant_shares(quadrant: jax.Array) -> jax.Array:
    """Token counts of Q1..Q4 ``[4]`` float32 from :func:`quadrants` (divide by their sum for shares)."""
    return jnp.stack([jnp.sum(quadrant == i) for i in (1, 2, 3, 4)]).astype(_F32)


def select_quadrants(entropy, divergence, valid, which=(3,), tau_h_quantile=0.5, tau_delta_quantile=0.5):
    """Tokens in the quadrants ``which`` (e.g. ``(3,)`` for Q3-only training). ``[B, T]`` float32."""
    q = quadrants(entropy, divergence, valid, tau_h_quantile, tau_delta_quantile)
    return jnp.isin(q, jnp.asarray(which, jnp.int32)).astype(_F32)


# ----------------------------------------------------------------------------------------------------------------
# TRACE spans (§3), SHRED (§4), TAD (§5)


def cap_spans(spans: jax.Array, valid: jax.Array, coverage_cap=0.25) -> jax.Array:
    """TRACE span mask with a coverage cap (§3): per row, keep the earliest span tokens while their count is at
    most ``floor(cap · #valid)``. ``coverage_cap = 1`` keeps every span token. ``[B, T]`` float32."""
    s = spans.astype(bool) & valid.astype(bool)
    cap = keep_count(coverage_cap, jnp.sum(valid, axis=-1), at_least_one=False)  # [B]
    return (s & (jnp.cumsum(s, axis=-1) <= cap[:, None])).astype(_F32)


def lowest_prob(logp: jax.Array, valid: jax.Array, fraction, per_row: bool = True) -> jax.Array:
    """SHRED forget set (§4 stage 1): the ``round(P · |T|)`` valid tokens with the lowest ``logp`` (the frozen
    model's log-probability of the token; ``valid`` already excludes the ``skip_tokens`` context), per instance by
    default. ``P = 0`` selects nothing. ``[B, T]`` float32."""
    def one(s, v):
        n = jnp.sum(v).astype(_F32)
        k = jnp.clip(jnp.floor(jnp.asarray(fraction, _F32) * n + 0.5), 0.0, n).astype(jnp.int32)
        return topk_mask(s, k, v)

    return _flat_or_rows(one, -logp.astype(_F32), valid.astype(bool), per_row).astype(_F32)


class NearDistant(NamedTuple):
    """TAD partition (§5): ``near`` (hard CE on ``x_target``) and ``distant`` (soft KL), ``[B, T]`` bool."""

    near: jax.Array
    distant: jax.Array


def near_distant(x_t: jax.Array, x_target: jax.Array, valid: jax.Array, mask_id: int) -> NearDistant:
    """TAD (§5): among valid positions masked in ``x_t``, *near* ones are revealed in ``x_target`` (the state δ
    steps later) and *distant* ones are still masked; already-unmasked positions get no loss."""
    masked = valid.astype(bool) & (x_t == mask_id)
    revealed = x_target != mask_id
    return NearDistant(masked & revealed, masked & ~revealed)


# ----------------------------------------------------------------------------------------------------------------
# Registered rules: frozen argument dataclasses and the uniform adapter


def _check_fraction(name, value, low_open=True):
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name}={value!r}: allowed {'(0, 1]' if low_open else '[0, 1]'}")


@dataclasses.dataclass(frozen=True)
class SelectArgs:
    """Options shared by every rule. ``granularity``: ``micro_batch`` (the rule runs on each micro-batch, as the
    TIP repo) or ``batch`` (the objective passes the whole batch). ``normalize_by``: ``selected`` (mean over the
    kept tokens) or ``all`` (mean over every valid token), see :func:`selected_loss`. ``per_row``: rank within
    each sequence instead of over all tokens of the call."""

    granularity: Literal["micro_batch", "batch"] = "micro_batch"
    normalize_by: Literal["selected", "all"] = "selected"
    per_row: bool = False

    def needs(self) -> tuple[str, ...]:
        return ()

    def __post_init__(self):
        if self.granularity not in ("micro_batch", "batch"):
            raise ValueError(f"granularity={self.granularity!r}: allowed ['micro_batch', 'batch']")
        if self.normalize_by not in ("selected", "all"):
            raise ValueError(f"normalize_by={self.normalize_by!r}: allowed ['selected', 'all']")


@dataclasses.dataclass(frozen=True)
class AllArgs(SelectArgs):
    """``all``: plain OPD."""


@dataclasses.dataclass(frozen=True)
class RandomArgs(SelectArgs):
    """``random``: a uniform fraction ``rho`` of the valid tokens."""

    rho: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("rho", self.rho)


@dataclasses.dataclass(frozen=True)
class EntropySampleArgs(SelectArgs):
    """``entropy_sample`` (TIP repo defaults ρ=0.5, α=2, γ=0); ``divergence_key`` names δ̂ (repo: ``jsd_norm``)."""

    rho: float = 0.5
    alpha: float = 2.0
    gamma: float = 0.0
    divergence_key: str = "jsd_norm"

    def needs(self):
        return ("entropy_norm", self.divergence_key) if self.gamma != 0.0 else ("entropy_norm",)

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("rho", self.rho)
        if self.alpha < 0 or self.gamma < 0:
            raise ValueError(f"alpha={self.alpha!r}, gamma={self.gamma!r}: both must be >= 0")


@dataclasses.dataclass(frozen=True)
class EntropyTopkArgs(SelectArgs):
    """``entropy_topk``: deterministic top-ρ by student entropy."""

    rho: float = 0.5

    def needs(self):
        return ("entropy_norm",)

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("rho", self.rho)


@dataclasses.dataclass(frozen=True)
class SoftOrArgs(SelectArgs):
    """``soft_or``: top-ρ by Soft-OR; δ is the paper's axis, reverse KL, by default."""

    rho: float = 0.5
    clip_quantile: float = 0.98
    divergence_key: str = "reverse_kl"

    def needs(self):
        return ("entropy_norm", self.divergence_key)

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("rho", self.rho)
        _check_fraction("clip_quantile", self.clip_quantile)


@dataclasses.dataclass(frozen=True)
class Q3Args(SelectArgs):
    """``q3``: top-ρ by ``FKL · (1 − ĥ)`` (ρ ≲ 0.1 in math)."""

    rho: float = 0.1
    divergence_key: str = "forward_kl"

    def needs(self):
        return ("entropy_norm", self.divergence_key)

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("rho", self.rho)


@dataclasses.dataclass(frozen=True)
class QuadrantArgs(SelectArgs):
    """``quadrant``: tokens in quadrants ``which`` (default Q3 only), thresholds at per-call quantiles."""

    which: tuple[int, ...] = (3,)
    tau_h_quantile: float = 0.5
    tau_delta_quantile: float = 0.5
    divergence_key: str = "reverse_kl"

    def needs(self):
        return ("entropy_norm", self.divergence_key)

    def __post_init__(self):
        super().__post_init__()
        if not self.which or any(q not in (1, 2, 3, 4) for q in self.which):
            raise ValueError(f"which={self.which!r}: a non-empty subset of [1, 2, 3, 4]")
        _check_fraction("tau_h_quantile", self.tau_h_quantile, low_open=False)
        _check_fraction("tau_delta_quantile", self.tau_delta_quantile, low_open=False)


@dataclasses.dataclass(frozen=True)
class SpansArgs(SelectArgs):
    """``spans`` (TRACE): annotated span tokens (``stats["spans"]``), at most ``coverage_cap`` of each row."""

    coverage_cap: float = 0.25

    def needs(self):
        return ("spans",)

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("coverage_cap", self.coverage_cap, low_open=False)


@dataclasses.dataclass(frozen=True)
class LowestProbArgs(SelectArgs):
    """``lowest_prob`` (SHRED): the ``fraction`` P of lowest-probability tokens per instance (figure: 50 %);
    ``logp_key`` names the frozen model's token log-probs."""

    fraction: float = 0.5
    per_row: bool = True
    logp_key: str = "logp"

    def needs(self):
        return (self.logp_key,)

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("fraction", self.fraction, low_open=False)


@dataclasses.dataclass(frozen=True)
class NearDistantArgs(SelectArgs):
    """``near_distant`` (TAD): reads ``stats["x_t"]``, ``stats["x_target"]``; ``mask_id`` of the diffusion LM."""

    mask_id: int = 0

    def needs(self):
        return ("x_t", "x_target")


def _get(stats: Mapping[str, jax.Array], key: str, rule: str) -> jax.Array:
    if key not in stats:
        raise ConfigError(f"selection {rule!r} needs stats[{key!r}]; got keys {sorted(stats)}")
    return stats[key]


@SELECTIONS.register("all", AllArgs)
def _all(stats, valid, key, args: AllArgs = AllArgs()):
    return select_all(valid)


@SELECTIONS.register("random", RandomArgs)
def _random(stats, valid, key, args: RandomArgs = RandomArgs()):
    return select_random(key, valid, args.rho, args.per_row)


@SELECTIONS.register("entropy_sample", EntropySampleArgs)
def _entropy_sample(stats, valid, key, args: EntropySampleArgs = EntropySampleArgs()):
    div = _get(stats, args.divergence_key, "entropy_sample") if args.gamma != 0.0 else None
    return entropy_sample(key, _get(stats, "entropy_norm", "entropy_sample"), valid, args.rho, args.alpha,
                          args.gamma, div, args.per_row)


@SELECTIONS.register("entropy_topk", EntropyTopkArgs)
def _entropy_topk(stats, valid, key, args: EntropyTopkArgs = EntropyTopkArgs()):
    return entropy_topk(_get(stats, "entropy_norm", "entropy_topk"), valid, args.rho, args.per_row)


@SELECTIONS.register("soft_or", SoftOrArgs)
def _soft_or(stats, valid, key, args: SoftOrArgs = SoftOrArgs()):
    return soft_or(_get(stats, "entropy_norm", "soft_or"), _get(stats, args.divergence_key, "soft_or"), valid,
                   args.rho, args.clip_quantile, args.per_row)


@SELECTIONS.register("q3", Q3Args)
def _q3(stats, valid, key, args: Q3Args = Q3Args()):
    return q3(_get(stats, "entropy_norm", "q3"), _get(stats, args.divergence_key, "q3"), valid, args.rho,
              args.per_row)


@SELECTIONS.register("quadrant", QuadrantArgs)
def _quadrant(stats, valid, key, args: QuadrantArgs = QuadrantArgs()):
    return select_quadrants(_get(stats, "entropy_norm", "quadrant"), _get(stats, args.divergence_key, "quadrant"),
                            valid, args.which, args.tau_h_quantile, args.tau_delta_quantile)


@SELECTIONS.register("spans", SpansArgs)
def _spans(stats, valid, key, args: SpansArgs = SpansArgs()):
    return cap_spans(_get(stats, "spans", "spans"), valid, args.coverage_cap)


@SELECTIONS.register("lowest_prob", LowestProbArgs)
def _lowest_prob(stats, valid, key, args: LowestProbArgs = LowestProbArgs()):
    return lowest_prob(_get(stats, args.logp_key, "lowest_prob"), valid, args.fraction, args.per_row)


@SELECTIONS.register("near_distant", NearDistantArgs)
def _near_distant(stats, valid, key, args: NearDistantArgs = NearDistantArgs()):
    return near_distant(_get(stats, "x_t", "near_distant"), _get(stats, "x_target", "near_distant"), valid,
                        args.mask_id)
