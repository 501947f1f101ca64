"""RL policy-loss algebra: importance ratios, clipping, trust-region masks, advantages, aggregation, KL penalties.

Pure functions of arrays (spec ``train_methods.md`` §0, §6, §9). Shapes: ``B`` sequences, ``T`` padded response
length; every per-token tensor is already shifted (``logp[b, t]`` scores token ``y[b, t]``). ``mask[b, t]`` is the
loss mask (response tokens that carry the loss; padding and tool tokens are 0). All arithmetic is float32.

Averaged losses travel as ``(sum, count)`` pairs (:func:`aggregate`) so gradient accumulation and multi-device
reduction weigh tokens (or sequences) rather than micro-batches: sum the sums, sum the counts, divide once
(:func:`safe_divide`; an empty selection gives 0, never NaN).

Entry point: :func:`policy_loss` with ``loss_mode`` a name in :data:`LOSS_MODES` (``jaxtok.registry``: each loss
mode is one function of :class:`LossInputs` and its frozen args dataclass, registered by name) and a frozen
:class:`PolicyLossConfig` (the flat config keys, mapped onto the mode's args by :meth:`PolicyLossConfig.mode_args`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import ClassVar, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxtok.registry import LOSS_MODES, ConfigError

__all__ = [
    "LOSS_MODES", "AGG_MODES", "KL_ESTIMATORS", "CPPO_DIVERGENCES", "ADV_SCALES", "PolicyLossConfig",
    "safe_divide", "masked_mean", "log_ratio", "token_ratio", "valid_positions", "sequence_log_ratio",
    "gspo_sequence_log_ratio", "gspo_token_log_ratio", "cumulative_log_ratio", "clip_ratio", "ppo_clip_loss",
    "log_space_clip_loss", "position_weights", "binary_tv", "binary_kl", "topk_divergence", "cppo_divergence",
    "cppo_adaptive_delta_b", "cppo_mask", "discounted_reverse_cumsum", "future_kl", "appo_future_factor",
    "masked_zscore", "branching_score", "contiguous_group_ids", "group_advantages", "dr_grpo_advantages",
    "rloo_advantages", "batch_advantages", "ADV_ESTIMATORS", "outcome_advantages",
    "broadcast_advantages", "aggregate", "kl_penalty", "sampler_mismatch",
    "zero_variance_group_mask", "overlong_reward_penalty", "policy_loss", "LossInputs", "ModeLoss", "LossModeArgs",
    "ClipArgs", "PPOClipArgs", "GRPOArgs", "DrGRPOArgs", "DAPOArgs", "GSPOArgs", "CTPOArgs", "CPPOArgs", "APPOArgs",
    "SHARED_KEYS", "ppo_clip_mode", "gspo_mode", "gspo_token_mode", "ctpo_mode", "cppo_mode", "appo_mode",
    "reinforce_mode",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
CPPO_DIVERGENCES = ("binary_tv", "binary_kl", "topk_tv", "topk_kl")
ADV_SCALES = ("bessel", "population", "none")

LOG_RATIO_CLIP = 20.0  # verl clamps per-token log-ratios to [-20, 20] before exp (§6)
LOG_RATIO_MAX = 10.0  # GSPO / CTPO clamp the (stop-gradient-composed) log-ratio at <= 10 (§6.3, §6.4)

_F32 = jnp.float32
Scalar = Union[float, jax.Array]


def _f32(x):
    return jnp.asarray(x, _F32)


# values users bring from TRL / verl for these options, answered with jaxtok's equivalent (never silently mapped)
PEER_VALUES = {
    ("kl_estimator", "low_var_kl"): "verl's low_var_kl is k3 (clamped there; here k3 is unclamped)",
    ("kl_estimator", "kl"): "verl's kl is k1", ("kl_estimator", "abs"): "not available; k1, k2, k3 or k3+",
    ("kl_estimator", "mse"): "verl's mse is k2",
    ("loss_mode", "bnpo"): "TRL's bnpo is loss_mode grpo with aggregation: token-mean",
    ("loss_mode", "vanilla"): "verl's vanilla policy loss is loss_mode ppo",
    ("aggregation", "token_mean"): "token-mean (dashes)",
}


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        hint = PEER_VALUES.get((name, value))
        raise ConfigError(f"{name}={value!r} is not allowed" + (f" ({hint})" if hint else "")
                          + f"; allowed: {list(allowed)}")


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def safe_divide(total, count):
    """``total / count`` with 0 where ``count == 0`` (empty selections give 0, never NaN)."""
    total, count = _f32(total), _f32(count)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def masked_mean(x, mask, axis=None):
    """Mean of ``x`` over ``mask`` (0 where the mask is empty)."""
    m = _f32(mask)
    return safe_divide(jnp.sum(_f32(x) * m, axis=axis), jnp.sum(m, axis=axis))


def valid_positions(mask):
    """1-indexed position counted over valid tokens only: ``t_pos = Σ_{j≤t} m_j`` (CTPO §6.4). ``[B, T]`` float32.

    Tool / padding tokens (``mask = 0``) do not advance the position."""
    return jnp.cumsum(_f32(mask), axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# importance ratios (§6, §6.3, §6.4)


def log_ratio(logp, old_logp, mask=None):
    """Per-token log importance ratio ``Δ_t = clip(lp − lp_old, −20, 20)`` (verl, §6), 0 where ``mask = 0``."""
    d = jnp.clip(_f32(logp) - _f32(old_logp), -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    return d if mask is None else jnp.where(_f32(mask) > 0, d, 0.0)


def token_ratio(logp, old_logp, mask=None):
    """PPO token ratio ``ρ_t = exp(clip(lp − lp_old, −20, 20))`` (§6.1); 1 where ``mask = 0``."""
    return jnp.exp(log_ratio(logp, old_logp, mask))


def sequence_log_ratio(logp, old_logp, mask):
    """Length-normalised sequence log-ratio ``log s_i = (1/|y_i|) Σ_t m (lp − lp_old)`` (GSPO §6.3). ``[B]``.

    Differentiable through every token of the sequence; 0 for a sequence without valid tokens."""
    m = _f32(mask)
    return safe_divide(jnp.sum(log_ratio(logp, old_logp, m) * m, axis=-1), jnp.sum(m, axis=-1))


def gspo_sequence_log_ratio(logp, old_logp, mask):
    """Sequence-level GSPO log-ratio broadcast to tokens, ``min(log s_i, 10)`` (§6.3). ``[B, T]``.

    The gradient of ``s_i`` flows through all tokens of sequence ``i``: ``∇s_i = s_i (1/|y_i|) Σ_t ∇lp_t``."""
    seq = jnp.minimum(sequence_log_ratio(logp, old_logp, mask), LOG_RATIO_MAX)  # [B]
    return jnp.broadcast_to(seq[:, None], jnp.shape(logp))


def gspo_token_log_ratio(logp, old_logp, mask):
    """GSPO-token log-ratio ``log s_{i,t} = sg(log s_i) + lp_t − sg(lp_t)``, clamped ``≤ 10`` (§6.3). ``[B, T]``.

    Its value equals the sequence ratio; its gradient is ``s_i ∇lp_t`` (token-level credit)."""
    lp = _f32(logp)
    seq = jax.lax.stop_gradient(sequence_log_ratio(logp, old_logp, mask))  # [B]
    return jnp.minimum(seq[:, None] + lp - jax.lax.stop_gradient(lp), LOG_RATIO_MAX)


def cumulative_log_ratio(logp, old_logp, mask, mode: str = "cumprod"):
    """CTPO cumulative log-ratio with the stop-gradient decomposition (§6.4). ``[B, T]``, 0 where ``mask = 0``.

    ``c_t = Σ_{j≤t} m_j Δ_j`` (``cumprod``: log of the product of token ratios up to t) or ``c_t / Σ_{j≤t} m_j``
    (``geomean``); ``log r_t = sg(c_t) + lp_t − sg(lp_t)`` clamped ``≤ 10``. The value is the cumulative ratio,
    the gradient flows only through the current token (``∇r_t = r_t ∇lp_t``)."""
    _check_choice("mode", mode, ("cumprod", "geomean"))
    m = _f32(mask)
    lp = _f32(logp)
    c = jnp.cumsum(log_ratio(logp, old_logp, m) * m, axis=-1)  # [B, T]
    if mode == "geomean":
        c = c / jnp.maximum(valid_positions(m), 1.0)
    c = jnp.where(m > 0, c, 0.0)
    out = jnp.minimum(jax.lax.stop_gradient(c) + lp - jax.lax.stop_gradient(lp), LOG_RATIO_MAX)
    return jnp.where(m > 0, out, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# clipping (§6.1, §6.4)


def clip_ratio(ratio, eps_low: Scalar, eps_high: Scalar):
    """``clip(ρ, 1 − ε_low, 1 + ε_high)``; ``ε_low = ε_high`` is symmetric PPO, ``ε_high > ε_low`` clip-higher."""
    return jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)


def ppo_clip_loss(ratio, advantages, eps_low: Scalar = 0.2, eps_high: Scalar = 0.2, dual_clip_c=None):
    """PPO-clip per-token loss (§6.1): ``ℓ = max(−A ρ, −A clip(ρ, 1−ε_low, 1+ε_high))``.

    Dual-clip (Ye et al.; verl ``clip_ratio_c``): for ``A < 0``, ``ℓ ← min(ℓ, −A c)`` with ``c > 1``; ``None``
    disables it. Returns ``(loss, clipped, dual_clipped)``, all ``[B, T]``; ``clipped`` marks tokens where the
    clipped branch is taken (zero gradient), ``dual_clipped`` where the dual bound is."""
    ratio, adv = _f32(ratio), _f32(advantages)
    unclipped = -adv * ratio
    clipped_branch = -adv * clip_ratio(ratio, eps_low, eps_high)
    loss = jnp.maximum(unclipped, clipped_branch)
    clipped = clipped_branch > unclipped
    if dual_clip_c is None:
        return loss, clipped, jnp.zeros_like(clipped)
    if not isinstance(dual_clip_c, jax.Array) and dual_clip_c <= 1.0:
        raise ConfigError(f"dual_clip_c={dual_clip_c!r} must be > 1 (or None to disable dual-clip)")
    bound = -adv * dual_clip_c
    dual = (adv < 0) & (bound < loss)
    return jnp.where(adv < 0, jnp.minimum(loss, bound), loss), clipped, dual


def log_space_clip_loss(log_ratio_, advantages, positions, c_low: Scalar = 0.025, c_high: Scalar = 0.05,
                        c_dual=0.05, p: Scalar = 0.5):
    """CTPO position-adaptive log-space clipping (§6.4).

    ``s_t = max(t_pos, 1)^p``; ``r̃_t = exp(clip(log r_t, −c_low s_t, c_high s_t))``; ``ℓ = max(−A r, −A r̃)``;
    dual-clip for ``A < 0``: ``ℓ ← min(ℓ, −A exp(c_dual s_t))`` (``c_dual=None`` disables). With ``p = 0``,
    ``c_low = −log(1−ε)``, ``c_high = log(1+ε)`` and ``c_dual = log c`` this is PPO-clip. Returns
    ``(loss, clipped, dual_clipped)``."""
    lr, adv = _f32(log_ratio_), _f32(advantages)
    scale = jnp.maximum(_f32(positions), 1.0) ** p
    r = jnp.exp(lr)
    unclipped = -adv * r
    clipped_branch = -adv * jnp.exp(jnp.clip(lr, -c_low * scale, c_high * scale))
    loss = jnp.maximum(unclipped, clipped_branch)
    clipped = clipped_branch > unclipped
    if c_dual is None:
        return loss, clipped, jnp.zeros_like(clipped)
    bound = -adv * jnp.exp(c_dual * scale)
    dual = (adv < 0) & (bound < loss)
    return jnp.where(adv < 0, jnp.minimum(loss, bound), loss), clipped, dual


# ----------------------------------------------------------------------------------------------------------------
# CPPO trust-region mask (§6.5)


def position_weights(valid, w_min: Scalar = 0.8):
    """CPPO position weights ``w_t = 1 − (1 − w_min)/(T − 1) · (t − 1)`` per response (§6.5). ``[B, T]``.

    ``t`` counts valid response tokens (1-indexed), ``T`` is this response's length; 0 at invalid slots,
    1 for a length-1 response."""
    v = _f32(valid)
    t = valid_positions(v)
    length = jnp.sum(v, axis=-1, keepdims=True)
    w = 1.0 - (1.0 - w_min) * (t - 1.0) / jnp.maximum(length - 1.0, 1.0)
    return jnp.where(v > 0, jnp.clip(w, w_min, 1.0), 0.0)


def binary_tv(logp, old_logp):
    """Binary total variation ``D_t = |μ(a_t) − π(a_t)|`` over the partition {a_t, other} (CPPO §6.5)."""
    return jnp.abs(jnp.exp(_f32(old_logp)) - jnp.exp(_f32(logp)))


def _bernoulli_kl(mu, pi):
    mu = jnp.clip(mu, 0.0, 1.0)
    pi = jnp.clip(pi, 1e-12, 1.0 - 1e-7)
    return jax.scipy.special.xlogy(mu, mu) - jax.scipy.special.xlogy(mu, pi) + \
        jax.scipy.special.xlogy(1.0 - mu, 1.0 - mu) - jax.scipy.special.xlogy(1.0 - mu, 1.0 - pi)


def binary_kl(logp, old_logp):
    """Binary KL ``KL(Bern(μ(a_t)) ‖ Bern(π(a_t)))`` over {a_t, other} (CPPO §6.5, KL ablation)."""
    return _bernoulli_kl(jnp.exp(_f32(old_logp)), jnp.exp(_f32(logp)))


def topk_divergence(kind: str, old_topk_logp, new_topk_logp, old_logp, logp, token_in_topk):
    """Top-K reduced divergence between rollout ``μ`` and current ``π`` (DPPO/CPPO §6.5).

    Partition = μ's top-K tokens ∪ {sampled a_t} ∪ {other}. ``kind='tv'``:
    ``½ Σ_{v∈S} |μ(v) − π(v)| + ½ |μ_other − π_other|`` (a lower bound on the exact TV); ``kind='kl'``:
    ``KL(μ‖π)`` on the same partition. ``old_topk_logp``/``new_topk_logp`` ``[B, T, K]`` are μ's top-K log-probs
    and π's log-probs at the same ids; ``old_logp``/``logp`` ``[B, T]`` score the sampled token;
    ``token_in_topk [B, T]`` bool avoids counting a_t twice."""
    _check_choice("kind", kind, ("tv", "kl"))
    mu_k, pi_k = jnp.exp(_f32(old_topk_logp)), jnp.exp(_f32(new_topk_logp))  # [B, T, K]
    extra = jnp.where(jnp.asarray(token_in_topk), 0.0, 1.0)
    mu_a, pi_a = extra * jnp.exp(_f32(old_logp)), extra * jnp.exp(_f32(logp))  # [B, T]
    mu_o = jnp.clip(1.0 - jnp.sum(mu_k, -1) - mu_a, 0.0, 1.0)
    pi_o = jnp.clip(1.0 - jnp.sum(pi_k, -1) - pi_a, 0.0, 1.0)
    mu = jnp.concatenate([mu_k, mu_a[..., None], mu_o[..., None]], -1)  # [B, T, K+2]
    pi = jnp.concatenate([pi_k, pi_a[..., None], pi_o[..., None]], -1)
    if kind == "tv":
        return 0.5 * jnp.sum(jnp.abs(mu - pi), -1)
    xlogy = jax.scipy.special.xlogy
    return jnp.sum(xlogy(mu, mu) - xlogy(mu, jnp.maximum(pi, 1e-12)), -1)


def cppo_divergence(kind: str, logp, old_logp, old_topk_logp=None, new_topk_logp=None, token_in_topk=None):
    """CPPO token divergence ``D_t`` by name (§6.5): ``binary_tv`` | ``binary_kl`` | ``topk_tv`` | ``topk_kl``.

    The binary kinds need only the sampled token's log-probs; the top-K kinds need μ's stored top-K log-probs,
    π at the same ids and whether a_t is among them. ``[B, T]`` float32."""
    _check_choice("cppo divergence", kind, CPPO_DIVERGENCES)
    if kind == "binary_tv":
        return binary_tv(logp, old_logp)
    if kind == "binary_kl":
        return binary_kl(logp, old_logp)
    if old_topk_logp is None or new_topk_logp is None or token_in_topk is None:
        raise ConfigError(f"cppo divergence {kind!r} needs old_topk_logp, new_topk_logp and token_in_topk")
    return topk_divergence(kind[5:], old_topk_logp, new_topk_logp, old_logp, logp, token_in_topk)


def cppo_adaptive_delta_b(divergence, valid, delta_b_min: Scalar = 0.02):
    """Per-sequence prefix budget for base models: ``δ_b = clamp(P90(D_{1:T}), δ_b^min, 2 δ_b^min)`` (§6.5). ``[B]``.

    A sequence without valid tokens gets ``δ_b^min``."""
    d = jnp.where(jnp.asarray(valid, bool), _f32(divergence), jnp.nan)
    q = jnp.nanquantile(d, 0.9, axis=-1)
    q = jnp.where(jnp.isnan(q), delta_b_min, q)
    return jnp.clip(q, delta_b_min, 2.0 * delta_b_min)


def cppo_mask(ratio, advantages, divergence, valid, delta: Scalar = 0.15, w_min: Scalar = 0.8,
              delta_b: Union[Scalar, jax.Array] = 0.015, soft: bool = False):
    """CPPO position-weighted, prefix-budgeted trust-region mask (§6.5, Algorithm 1, batched). Stop-gradient.

    ``Z_t = w_t D_t``; ``S_{t−1} = Σ_{j<t} Z_j``, ``W_{t−1} = Σ_{j<t} w_j`` (over all valid response tokens,
    whatever the loss mask); threshold ``c_t = min(δ, δ + δ_b W_{t−1} − S_{t−1})``;
    ``M_t = 1[A(ρ − 1) ≤ 0 ∨ Z_t ≤ c_t]``. Soft variant: ``x_t = max(Z_t/δ, S_t/(δ + δ_b W_{t−1}))``,
    ``M_t = 1`` if ``A(ρ−1) ≤ 0`` else ``min(1, 1/x_t)``. ``delta_b`` is a scalar or per-sequence ``[B]``
    (:func:`cppo_adaptive_delta_b`); ``w_min = 1, δ_b → ∞`` gives DPPO's ``1[A(ρ−1) ≤ 0 ∨ D_t ≤ δ]``.

    Returns ``(mask [B, T] float32, token_reject [B, T] bool, budget_reject [B, T] bool)``: rejected because
    ``Z_t > δ`` vs. rejected only by the prefix budget (hard variant; both computed for diagnostics)."""
    v = _f32(valid)
    ratio, adv = jax.lax.stop_gradient(_f32(ratio)), _f32(advantages)
    d = jax.lax.stop_gradient(_f32(divergence)) * v
    w = position_weights(v, w_min)  # [B, T]
    z = w * d
    s = jnp.cumsum(z, axis=-1)  # S_t
    w_cum = jnp.cumsum(w, axis=-1)  # W_t
    s_prev, w_prev = s - z, w_cum - w  # S_{t-1}, W_{t-1}
    db = _f32(delta_b)
    db = db[:, None] if db.ndim == 1 else db
    budget = delta + db * w_prev  # δ + δ_b W_{t-1}
    c = jnp.minimum(delta, budget - s_prev)
    toward_one = adv * (ratio - 1.0) <= 0
    in_region = z <= c
    token_reject = ~toward_one & (z > delta) & (v > 0)
    budget_reject = ~toward_one & ~in_region & (z <= delta) & (v > 0)
    if soft:
        x = jnp.maximum(z / delta, s / budget)
        m = jnp.where(toward_one, 1.0, 1.0 / jnp.maximum(x, 1.0))
    else:
        m = (toward_one | in_region).astype(_F32)
    return jax.lax.stop_gradient(m * v), token_reject, budget_reject


# ----------------------------------------------------------------------------------------------------------------
# APPO (§9)


def discounted_reverse_cumsum(x, gamma: Scalar):
    """``y_t = Σ_{k≥t} γ^{k−t} x_k`` along the last axis (a reverse ``lax.scan``; O(T) memory)."""
    x = _f32(x)

    def step(acc, xt):
        acc = xt + gamma * acc
        return acc, acc

    _, ys = jax.lax.scan(step, jnp.zeros(x.shape[:-1], _F32), jnp.moveaxis(x, -1, 0), reverse=True)
    return jnp.moveaxis(ys, 0, -1)


def future_kl(logp, old_logp, mask, gamma_f: Scalar = 2.0 ** (-1.0 / 64.0), c: Scalar = 3.0):
    """APPO future KL (§9, ``compute_policy_loss_future_kl``): ``Σ_{k≥t} γ_f^{k−t} m_k P_k Δ_k``.

    ``Δ_k = lp − lp_old``, participation ``P_k = 1[Δ_k ≤ log c]``. ``γ_f → 0`` gives ``m_t P_t Δ_t``."""
    d = log_ratio(logp, old_logp, mask)
    part = (d <= math.log(c)).astype(_F32)
    return discounted_reverse_cumsum(_f32(mask) * part * d, gamma_f)


def appo_future_factor(future_kl_, ratio, advantages, f_max: Scalar = 1.2, neg_ratio: Scalar = 6.0,
                       neg_floor: Scalar = 0.8):
    """APPO future factor ``f_t = sg(clip(exp(FutureKL_t), 1, f_max))`` (``clip_high_only``, §9).

    Where ``A < 0 ∧ ρ > neg_ratio``: ``f_t ← clip(f_t, neg_floor, 1)``. The shaped advantage is
    ``Ã_t = A_t (1 + b f_t)``."""
    f = jnp.clip(jnp.exp(jnp.minimum(_f32(future_kl_), LOG_RATIO_CLIP)), 1.0, f_max)
    f = jnp.where((_f32(advantages) < 0) & (_f32(ratio) > neg_ratio), jnp.clip(f, neg_floor, 1.0), f)
    return jax.lax.stop_gradient(f)


def masked_zscore(x, mask, axis: int = -1):
    """Z-score over ``mask`` along ``axis`` with the population std; 0 where the std is 0 or outside the mask."""
    m = _f32(mask)
    mean = masked_mean(x, m, axis=axis)
    mean = jnp.expand_dims(mean, axis)
    var = jnp.expand_dims(masked_mean((_f32(x) - mean) ** 2, m, axis=axis), axis)
    std = jnp.sqrt(var)
    z = jnp.where(std > 0, (_f32(x) - mean) / jnp.where(std > 0, std, 1.0), 0.0)
    return z * m


def branching_score(entropy, logp, rollout_logp, mask, gamma: Scalar = 1.0, eps: Scalar = 0.2):
    """APPO branching score ``BS_t = Z(H_t) · Z(Ω_t)`` within each rollout (§9).

    ``Ω_t = clip(exp(clip(Σ_{k≥t} γ^{k−t} m_k Δ_k, −20, 20)), 1−ε, 1+ε)``, ``Δ = lp_current − lp_rollout``;
    ``Z`` = per-rollout z-score (population std) over valid tokens. Returns ``(score [B, T], candidate [B, T])``
    with candidates ``Z(H) > 0 ∧ Z(Ω) > 0 ∧ BS > 0`` on valid tokens."""
    m = _f32(mask)
    fut = discounted_reverse_cumsum(log_ratio(logp, rollout_logp, m) * m, gamma)
    omega = jnp.clip(jnp.exp(jnp.clip(fut, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)), 1.0 - eps, 1.0 + eps)
    zh, zo = masked_zscore(entropy, m), masked_zscore(omega, m)
    score = zh * zo
    return score, (zh > 0) & (zo > 0) & (score > 0) & (m > 0)


# ----------------------------------------------------------------------------------------------------------------
# advantages (§6.2)


def contiguous_group_ids(num_rows: int, group_size: int):
    """Group ids for rows laid out as ``[prompt0 × n, prompt1 × n, ...]``: ``arange(num_rows) // group_size``."""
    if group_size < 1 or num_rows % group_size:
        raise ConfigError(f"group_size={group_size!r} must be ≥ 1 and divide num_rows={num_rows}")
    return jnp.arange(num_rows, dtype=jnp.int32) // group_size


def _group_moments(rewards, group_ids, num_groups: int, valid):
    r = _f32(rewards)
    w = jnp.ones_like(r) if valid is None else _f32(valid)
    seg = lambda x: jax.ops.segment_sum(x, group_ids, num_segments=num_groups)  # noqa: E731
    n = seg(w)  # [G]
    mean = safe_divide(seg(r * w), n)
    ss = seg(((r - mean[group_ids]) ** 2) * w)
    return r, w, n, mean, ss


def group_advantages(rewards, group_ids, num_groups: int, *, scale: str = "bessel", eps: Scalar = 1e-6,
                     valid=None):
    """GRPO group-normalised advantage ``A_i = (r_i − mean_g) / (std_g + ε)`` (§6.2). ``[N]``.

    ``scale``: ``bessel`` (verl ``torch.std``), ``population`` (APPO, ReasonMaxxer) or ``none`` (Dr.GRPO,
    ``A_i = r_i − mean_g``). Groups of size 1 use mean 0, std 1 (verl), so ``A = r``. Zero-variance groups (all
    valid rewards equal, tested exactly by max == min so a mean off by a rounding error does not leave a
    ``±tiny/tiny`` ratio) give ``A = 0`` for every ``ε ≥ 0`` (no NaN at ``ε = 0``). Rows with ``valid = False``
    get 0 and do not enter the statistics."""
    _check_choice("scale", scale, ADV_SCALES)
    r, w, n, mean, ss = _group_moments(rewards, group_ids, num_groups, valid)
    single = n <= 1
    mean = jnp.where(single, 0.0, mean)
    centred = r - mean[group_ids]
    if scale == "none":
        return centred * w
    std = jnp.sqrt(safe_divide(ss, n - 1.0 if scale == "bessel" else n))
    std = jnp.where(single, 1.0, std)
    seg_max = jax.ops.segment_max(jnp.where(w > 0, r, -jnp.inf), group_ids, num_segments=num_groups)  # [G]
    seg_min = jax.ops.segment_min(jnp.where(w > 0, r, jnp.inf), group_ids, num_segments=num_groups)
    flat = (seg_max <= seg_min) & ~single  # [G] zero-variance groups of >= 2 valid rows
    denom = std[group_ids] + eps  # [N]
    ok = ~flat[group_ids] & (denom > 0)
    return jnp.where(ok, centred / jnp.where(ok, denom, 1.0), 0.0) * w


def dr_grpo_advantages(rewards, group_ids, num_groups: int, valid=None):
    """Dr.GRPO advantage ``A_i = r_i − mean_g`` (no std division, §6.2)."""
    return group_advantages(rewards, group_ids, num_groups, scale="none", valid=valid)


def rloo_advantages(rewards, group_ids, num_groups: int, valid=None):
    """RLOO leave-one-out advantage ``A_i = r_i − (1/(n−1)) Σ_{j≠i} r_j = n/(n−1) (r_i − mean_g)``. ``[N]``.

    Groups of size 1 have no baseline (``A = r``, as verl)."""
    r, w, n, mean, _ = _group_moments(rewards, group_ids, num_groups, valid)
    n_i = n[group_ids]
    loo = safe_divide(n_i * mean[group_ids] - r, n_i - 1.0)
    return jnp.where(n_i > 1, r - loo, r) * w


def batch_advantages(advantages, mask, *, scale: str = "population", eps: Scalar = 1e-6):
    """Batch-normalised advantages (REINFORCE++-style whitening): ``(A − mean)/(std + ε)`` over ``mask``.

    Any shape (e.g. ``[B, T]`` token advantages or ``[N]`` rewards). ``scale`` as in :func:`group_advantages`;
    0 outside the mask, and 0 everywhere when the masked values are all equal (for every ``ε ≥ 0``)."""
    _check_choice("scale", scale, ADV_SCALES)
    m = _f32(mask)
    a = _f32(advantages)
    mean = masked_mean(a, m)
    if scale == "none":
        return (a - mean) * m
    n = jnp.sum(m)
    ss = jnp.sum(((a - mean) ** 2) * m)
    std = jnp.sqrt(safe_divide(ss, n - 1.0 if scale == "bessel" else n))
    flat = jnp.max(jnp.where(m > 0, a, -jnp.inf)) <= jnp.min(jnp.where(m > 0, a, jnp.inf))
    ok = ~flat & (std + eps > 0)
    return jnp.where(ok, (a - mean) / jnp.where(ok, std + eps, 1.0), 0.0) * m


ADV_ESTIMATORS = ("grpo", "grpo_population", "dr_grpo", "rloo", "batch")


def outcome_advantages(estimator: str, rewards, group_ids, num_groups: int, *, valid=None, eps: Scalar = 1e-6):
    """Sequence advantages ``[N]`` from outcome rewards by name (§6.2): ``grpo`` (Bessel std, verl),
    ``grpo_population`` (population std: APPO, ReasonMaxxer), ``dr_grpo`` (no std), ``rloo`` (leave-one-out),
    ``batch`` (whitened over the whole batch, groups ignored)."""
    _check_choice("advantage estimator", estimator, ADV_ESTIMATORS)
    if estimator == "grpo":
        return group_advantages(rewards, group_ids, num_groups, scale="bessel", eps=eps, valid=valid)
    if estimator == "grpo_population":
        return group_advantages(rewards, group_ids, num_groups, scale="population", eps=eps, valid=valid)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(rewards, group_ids, num_groups, valid=valid)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_ids, num_groups, valid=valid)
    v = jnp.ones(jnp.shape(rewards), bool) if valid is None else valid
    return batch_advantages(rewards, v, scale="bessel", eps=eps)


def broadcast_advantages(advantages, mask):
    """Outcome advantage ``[B]`` broadcast to tokens: ``A[b, t] = A_b m[b, t]``. ``[B, T]``."""
    return _f32(advantages)[:, None] * _f32(mask)


# ----------------------------------------------------------------------------------------------------------------
# aggregation (§0)


def aggregate(loss, mask, mode: str = "token-mean", norm_length: Optional[float] = None):
    """Aggregate a per-token loss ``L [B, T]`` into a ``(sum, count)`` pair; the loss is ``sum / count`` (§0).

    * ``token-mean``: ``(Σ m L, Σ m)``.
    * ``seq-mean-token-mean``: ``(Σ_b Σ_t m L / Σ_t m, B')``.
    * ``seq-mean-token-sum``: ``(Σ_b Σ_t m L, B')``.
    * ``seq-mean-token-sum-norm`` (Dr.GRPO): ``(Σ_b Σ_t m L / L_max, B')`` with the constant
      ``L_max = norm_length``: the generation budget (``rollout.max_new_tokens``; the policy-gradient objective
      passes it per sequence, ``[B]``). Default the padded length ``T`` — the response width when ``loss`` holds
      response columns only (verl), but not for prompt + response rows, where it would grow with the prompt.

    ``B'`` = sequences with at least one valid token. The 1/B' choice follows the Dr.GRPO paper (batch-size
    independent); verl's ``seq-mean-token-sum-norm`` omits the 1/B, i.e. returns ``sum`` alone. Because counts
    are sequences (or tokens), summing ``(sum, count)`` over micro-batches or devices and dividing once gives
    exactly the full-batch value."""
    _check_choice("aggregation", mode, AGG_MODES)
    m = _f32(mask)
    lm = jnp.where(m > 0, _f32(loss) * m, 0.0)  # avoid 0 * inf at masked slots
    if mode == "token-mean":
        return jnp.sum(lm), jnp.sum(m)
    tokens = jnp.sum(m, axis=-1)  # [B]
    rows = jnp.sum((tokens > 0).astype(_F32))
    per_seq = jnp.sum(lm, axis=-1)  # [B]
    if mode == "seq-mean-token-mean":
        return jnp.sum(safe_divide(per_seq, tokens)), rows
    if mode == "seq-mean-token-sum":
        return jnp.sum(per_seq), rows
    length = float(jnp.shape(loss)[-1]) if norm_length is None else norm_length
    if not isinstance(length, jax.Array) and jnp.ndim(length) == 0:  # a host constant: checked here
        if float(length) <= 0:
            raise ConfigError(f"norm_length={norm_length!r} must be > 0")
        return jnp.sum(per_seq) / float(length), rows
    return jnp.sum(safe_divide(per_seq, length)), rows  # L_max as an array: scalar or per sequence [B]


# ----------------------------------------------------------------------------------------------------------------
# KL penalties (§6.2)


def kl_penalty(logp, ref_logp, estimator: str = "k3"):
    """Per-token KL penalty to the reference (verl ``kl_penalty``, §6.2). ``[B, T]``.

    ``k1 = lp − lp_ref``; ``k2 = ½ (lp − lp_ref)²``; ``k3`` ("low_var_kl"): ``d = clip(lp_ref − lp, −20, 20)``,
    ``clip(e^d − d − 1, −10, 10)`` (≥ 0, unbiased for ``KL(π_θ‖π_ref)`` under samples from π_θ);
    ``k3+``: straight-through, the value of k3 with the gradient of k2."""
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    lp, ref = _f32(logp), _f32(ref_logp)
    if estimator == "k1":
        return lp - ref
    k2 = 0.5 * (lp - ref) ** 2
    if estimator == "k2":
        return k2
    d = jnp.clip(ref - lp, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    k3 = jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
    if estimator == "k3":
        return k3
    return k2 + jax.lax.stop_gradient(k3 - k2)


def sampler_mismatch(logp, sampler_logp, mask) -> dict:
    """Rollout-engine / trainer mismatch on the sampled tokens (the numerical gap APPO's ``Δ`` and CTPO's rollout
    correction see, §6.4, §9): ``abs_logp_diff = mean |lp − lp_μ|`` and ``kl = mean k3`` with ``d = lp − lp_μ``,
    ``k3 = e^d − d − 1`` (≥ 0, unbiased for ``KL(μ‖π)`` under tokens sampled from the sampler μ). ``logp`` is the
    trainer's log-prob of each token, ``sampler_logp`` the sampler's, both ``[B, T]``; means over ``mask``
    (0 for an empty mask). Sampler filters (top-k/top-p) make the two distributions differ by design."""
    m = _f32(mask)
    d = jnp.where(m > 0, jnp.clip(_f32(logp) - _f32(sampler_logp), -LOG_RATIO_CLIP, LOG_RATIO_CLIP), 0.0)
    return {"abs_logp_diff": masked_mean(jnp.abs(d), m), "kl": masked_mean(jnp.expm1(d) - d, m)}


# ----------------------------------------------------------------------------------------------------------------
# DAPO helpers (§6.2)


def zero_variance_group_mask(rewards, group_ids, num_groups: int, valid=None, atol: Scalar = 0.0):
    """DAPO dynamic sampling: ``True`` for rows whose group has non-identical rewards (keep), ``False`` for rows
    of groups whose rewards are all equal (max − min ≤ atol) and for invalid rows. ``[N]`` bool."""
    r = _f32(rewards)
    v = jnp.ones(r.shape, bool) if valid is None else jnp.asarray(valid, bool)
    hi = jax.ops.segment_max(jnp.where(v, r, -jnp.inf), group_ids, num_segments=num_groups)
    lo = jax.ops.segment_min(jnp.where(v, r, jnp.inf), group_ids, num_segments=num_groups)
    return v & ((hi - lo)[group_ids] > atol)


def overlong_reward_penalty(lengths, max_length: int, buffer_length: int, penalty_factor: Scalar = 1.0):
    """DAPO soft overlong punishment added to the reward (§6.2). ``[N]`` float32, in ``[−factor, 0]``.

    With ``L_max = max_length`` and ``L_cache = buffer_length``: 0 for ``|y| ≤ L_max − L_cache``;
    ``(L_max − L_cache − |y|)/L_cache`` in the buffer zone; ``−1`` beyond ``L_max``; times ``penalty_factor``."""
    if buffer_length <= 0 or buffer_length > max_length:
        raise ConfigError(f"buffer_length={buffer_length!r} must be in (0, max_length={max_length}]")
    excess = _f32(lengths) - (max_length - buffer_length)
    return -penalty_factor * jnp.clip(excess / buffer_length, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# the loss modes (§6, §9): one function per mode family, registered in LOSS_MODES with its frozen args dataclass


class LossInputs(NamedTuple):
    """What a loss mode reads (float32, ``[B, T]``; :func:`policy_loss` builds it once): ``logp``, ``old_logp``,
    ``advantages`` broadcast to tokens, the loss ``mask``; CPPO's optional precomputed ``divergence``, ``valid``
    (response tokens for positions / prefix sums; None: ``mask``) and ``delta_b`` (scalar or ``[B]``)."""

    logp: jax.Array
    old_logp: jax.Array
    advantages: jax.Array
    mask: jax.Array
    divergence: Optional[jax.Array] = None
    valid: Optional[jax.Array] = None
    delta_b: Optional[Union[Scalar, jax.Array]] = None


class ModeLoss(NamedTuple):
    """A loss mode's result: the per-token ``loss [B, T]``, ``clipped``/``dual`` token flags (diagnostics), the
    ``ratio`` it used, the ``mask`` to aggregate over (the input's, or narrowed) and mode-specific diagnostics."""

    loss: jax.Array
    clipped: jax.Array
    dual: jax.Array
    ratio: jax.Array
    mask: jax.Array
    extra: dict


@dataclasses.dataclass(frozen=True)
class LossModeArgs:
    """Options every loss mode has: its default ``aggregation`` of the per-token loss (:func:`aggregate`, §0).

    A mode's own options are fields of a subclass; their flat config keys are ``key_prefix + field``
    (``ctpo_c_low`` is :class:`CTPOArgs`'s ``c_low``), except :data:`SHARED_KEYS`, which keep their name
    (:meth:`PolicyLossConfig.mode_args`). Messages name the flat keys."""

    key_prefix: ClassVar[str] = ""
    aggregation: str = "token-mean"

    def __post_init__(self):
        _check_choice("aggregation", self.aggregation, AGG_MODES)


@dataclasses.dataclass(frozen=True)
class ClipArgs(LossModeArgs):
    """Ratio clip ``clip(ρ, 1 − ε_low, 1 + ε_high)`` (§6.1)."""

    eps_low: float = 0.2
    eps_high: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.eps_low < 1.0:
            raise ConfigError(f"eps_low={self.eps_low!r} must be in [0, 1)")
        if self.eps_high < 0.0:
            raise ConfigError(f"eps_high={self.eps_high!r} must be ≥ 0")


@dataclasses.dataclass(frozen=True)
class PPOClipArgs(ClipArgs):
    """PPO-clip with dual-clip ``c = 3`` (verl ``clip_ratio_c``; None disables it), token-mean (§6.1)."""

    dual_clip_c: Optional[float] = 3.0

    def __post_init__(self):
        super().__post_init__()
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ConfigError(f"dual_clip_c={self.dual_clip_c!r} must be > 1 (or None to disable)")


@dataclasses.dataclass(frozen=True)
class GRPOArgs(PPOClipArgs):
    """GRPO: PPO-clip, each sequence's token mean averaged over sequences (§6.1, §6.2)."""

    aggregation: str = "seq-mean-token-mean"


@dataclasses.dataclass(frozen=True)
class DrGRPOArgs(PPOClipArgs):
    """Dr.GRPO: PPO-clip, per-sequence token sums over the constant ``L_max`` (§6.2)."""

    aggregation: str = "seq-mean-token-sum-norm"


@dataclasses.dataclass(frozen=True)
class DAPOArgs(PPOClipArgs):
    """DAPO: PPO-clip with clip-higher ``ε_high = 0.28``, token-mean (§6.2)."""

    eps_high: float = 0.28


@dataclasses.dataclass(frozen=True)
class GSPOArgs(ClipArgs):
    """GSPO: ``ε_low/ε_high = 3e-4/4e-4`` (paper ranges), sequence mean, never dual-clipped (§6.3)."""

    eps_low: float = 3e-4
    eps_high: float = 4e-4
    aggregation: str = "seq-mean-token-mean"


@dataclasses.dataclass(frozen=True)
class CTPOArgs(PPOClipArgs):
    """CTPO (§6.4): cumulative ``ratio`` (``cumprod`` | ``geomean``) and the log-space clip ``c_low``/``c_high``
    with dual ``c_dual`` (None disables) scaled by ``t_pos^p`` (``p`` None: 0.5 for cumprod, −0.5 for geomean);
    ``log_space=False``: plain clip (``eps_low``/``eps_high``, ``dual_clip_c``) on the cumulative ratio."""

    key_prefix: ClassVar[str] = "ctpo_"
    ratio: str = "cumprod"
    log_space: bool = True
    c_low: float = 0.025
    c_high: float = 0.05
    c_dual: Optional[float] = 0.05
    p: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        _check_choice("ctpo_ratio", self.ratio, ("cumprod", "geomean"))

    @property
    def exponent(self) -> float:
        """``p``, or its default for the ratio: 0.5 for ``cumprod``, −0.5 for ``geomean``."""
        return self.p if self.p is not None else (0.5 if self.ratio == "cumprod" else -0.5)


@dataclasses.dataclass(frozen=True)
class CPPOArgs(LossModeArgs):
    """CPPO (§6.5): token threshold ``delta``, position-weight floor ``w_min``, prefix budget ``delta_b`` (a
    per-sequence ``[B]`` array may be passed to ``policy_loss(delta_b=...)``), ``soft`` mask, and the
    ``divergence`` used when ``policy_loss`` gets no precomputed one (binary kinds only)."""

    key_prefix: ClassVar[str] = "cppo_"
    delta: float = 0.15
    w_min: float = 0.8
    delta_b: float = 0.015
    soft: bool = False
    divergence: str = "binary_tv"

    def __post_init__(self):
        super().__post_init__()
        _check_choice("cppo_divergence", self.divergence, CPPO_DIVERGENCES)
        if not 0.0 < self.w_min <= 1.0:
            raise ConfigError(f"cppo_w_min={self.w_min!r} must be in (0, 1]")
        if self.delta <= 0:
            raise ConfigError(f"cppo_delta={self.delta!r} must be > 0")


@dataclasses.dataclass(frozen=True)
class APPOArgs(PPOClipArgs):
    """APPO future-KL loss (§9): PPO dual-clip with clip-higher ``ε_high = 0.28``; ``gamma_f = 2^(−1/64)`` (decay
    rate 64), participation ``c``, weight ``b``, factor cap ``f_max``, the ``A < 0 ∧ ρ > neg_ratio`` floor
    ``neg_floor``; ``drop_multi_dual_clip`` drops sequences with more than one dual-clipped token."""

    key_prefix: ClassVar[str] = "appo_"
    eps_high: float = 0.28
    gamma_f: float = 2.0 ** (-1.0 / 64.0)
    participation_c: float = 3.0
    b: float = 1.0
    f_max: float = 1.2
    neg_ratio: float = 6.0
    neg_floor: float = 0.8
    drop_multi_dual_clip: bool = True


SHARED_KEYS = tuple(f.name for f in dataclasses.fields(PPOClipArgs))  # flat keys that keep their name in every mode


@LOSS_MODES.register("ppo", PPOClipArgs)
@LOSS_MODES.register("grpo", GRPOArgs)
@LOSS_MODES.register("dr_grpo", DrGRPOArgs)
@LOSS_MODES.register("dapo", DAPOArgs)
def ppo_clip_mode(x: LossInputs, args: PPOClipArgs) -> ModeLoss:
    """PPO-clip on the token ratio (§6.1): ``ℓ = max(−A ρ, −A clip(ρ, 1−ε_low, 1+ε_high))``, dual-clip if A < 0.

    ``ρ_t = exp(clip(lp − lp_old, −20, 20))``. ``ppo``, ``grpo``, ``dr_grpo`` and ``dapo`` differ only by their
    args' defaults (ε_high, aggregation: each a small subclass of :class:`PPOClipArgs`); the advantage estimator
    is chosen by the caller."""
    ratio = token_ratio(x.logp, x.old_logp, x.mask)
    loss, clipped, dual = ppo_clip_loss(ratio, x.advantages, args.eps_low, args.eps_high, args.dual_clip_c)
    return ModeLoss(loss, clipped, dual, ratio, x.mask, {})


@LOSS_MODES.register("gspo", GSPOArgs)
def gspo_mode(x: LossInputs, args: GSPOArgs) -> ModeLoss:
    """GSPO: sequence ratio ``s_i`` (gradient through all tokens), clipped, no dual clip (§6.3)."""
    ratio = jnp.exp(gspo_sequence_log_ratio(x.logp, x.old_logp, x.mask))
    loss, clipped, dual = ppo_clip_loss(ratio, x.advantages, args.eps_low, args.eps_high, None)
    return ModeLoss(loss, clipped, dual, ratio, x.mask, {})


@LOSS_MODES.register("gspo_token", GSPOArgs)
def gspo_token_mode(x: LossInputs, args: GSPOArgs) -> ModeLoss:
    """GSPO-token: ``s_{i,t} = sg(s_i)·π_t/sg(π_t)``, clipped, no dual clip (§6.3)."""
    ratio = jnp.exp(gspo_token_log_ratio(x.logp, x.old_logp, x.mask))
    loss, clipped, dual = ppo_clip_loss(ratio, x.advantages, args.eps_low, args.eps_high, None)
    return ModeLoss(loss, clipped, dual, ratio, x.mask, {})


@LOSS_MODES.register("ctpo", CTPOArgs)
def ctpo_mode(x: LossInputs, args: CTPOArgs) -> ModeLoss:
    """CTPO: cumulative ratio, current-token gradient, log-space clip ``±c·t_pos^p``, dual ``exp(c_c t_pos^p)`` (§6.4).

    The ratio is ``cumprod`` or ``geomean`` (:func:`cumulative_log_ratio`), the clip :func:`log_space_clip_loss`;
    ``log_space=False`` uses plain PPO clipping on the cumulative ratio."""
    m = x.mask
    lr = cumulative_log_ratio(x.logp, x.old_logp, m, args.ratio)
    ratio = jnp.where(m > 0, jnp.exp(lr), 0.0)
    if args.log_space:
        loss, clipped, dual = log_space_clip_loss(lr, x.advantages, valid_positions(m), args.c_low, args.c_high,
                                                  args.c_dual, args.exponent)
    else:
        loss, clipped, dual = ppo_clip_loss(ratio, x.advantages, args.eps_low, args.eps_high, args.dual_clip_c)
    return ModeLoss(loss, clipped, dual, ratio, m, {})


@LOSS_MODES.register("cppo", CPPOArgs)
def cppo_mode(x: LossInputs, args: CPPOArgs) -> ModeLoss:
    """CPPO: ``ℓ = −M ρ A`` with the trust-region mask ``M`` (:func:`cppo_mask`) replacing clipping (§6.5).

    ``x.divergence`` is D_t (:func:`cppo_divergence`); when None, ``args.divergence`` (binary kinds) is computed
    from ``logp``/``old_logp``. ``x.valid`` marks response tokens for positions / prefix sums (default ``mask``);
    ``x.delta_b`` overrides ``args.delta_b`` (scalar or ``[B]``)."""
    m = x.mask
    ratio = token_ratio(x.logp, x.old_logp, m)
    divergence = x.divergence
    if divergence is None:
        if not args.divergence.startswith("binary"):
            raise ConfigError(f"cppo_divergence={args.divergence!r} needs a precomputed divergence "
                              "argument (top-K log-probs); only binary_tv/binary_kl are computed here")
        divergence = cppo_divergence(args.divergence, x.logp, x.old_logp)
    v = m if x.valid is None else _f32(x.valid)
    keep, token_reject, budget_reject = cppo_mask(
        ratio, x.advantages, divergence, v, args.delta, args.w_min,
        args.delta_b if x.delta_b is None else x.delta_b, args.soft)
    loss = -keep * ratio * x.advantages
    clipped = (token_reject | budget_reject) if not args.soft else keep < 1.0
    extra = {"cppo_token_reject_frac": masked_mean(token_reject, m),
             "cppo_budget_reject_frac": masked_mean(budget_reject, m),
             "cppo_mask_mean": masked_mean(keep, m),
             "divergence_mean": masked_mean(jax.lax.stop_gradient(divergence), m)}
    return ModeLoss(loss, clipped, jnp.zeros_like(clipped), ratio, m, extra)


@LOSS_MODES.register("appo", APPOArgs)
def appo_mode(x: LossInputs, args: APPOArgs) -> ModeLoss:
    """APPO: ``Ã = A(1 + b f)`` with the future-KL factor ``f`` (§9), PPO dual-clip on ``Ã``.

    With ``drop_multi_dual_clip``, sequences with more than one dual-clipped token leave the mask."""
    m = x.mask
    ratio = token_ratio(x.logp, x.old_logp, m)
    fkl = future_kl(x.logp, x.old_logp, m, args.gamma_f, args.participation_c)
    f = appo_future_factor(fkl, ratio, x.advantages, args.f_max, args.neg_ratio, args.neg_floor)
    adv = x.advantages * (1.0 + args.b * f)
    loss, clipped, dual = ppo_clip_loss(ratio, adv, args.eps_low, args.eps_high, args.dual_clip_c)
    extra = {}
    if args.drop_multi_dual_clip:
        n_dual = jnp.sum(_f32(dual) * m, axis=-1, keepdims=True)
        extra["appo_dropped_seqs"] = jnp.sum((n_dual[:, 0] > 1).astype(_F32))
        m = jnp.where(n_dual > 1, 0.0, m)
    extra["appo_future_factor_mean"] = masked_mean(f, m)
    return ModeLoss(loss, clipped, dual, ratio, m, extra)


@LOSS_MODES.register("reinforce", LossModeArgs)
def reinforce_mode(x: LossInputs, args: LossModeArgs) -> ModeLoss:
    """REINFORCE with a baseline (Williams 1992), importance-weighted and unclipped: ``ℓ = −ρ A``.

    ``∇ℓ = −ρ A ∇lp``: on-policy (``ρ = 1``) the REINFORCE estimator ``−A ∇log π``, the baseline (and any scaling)
    inside ``A`` (the caller's advantage estimator); CPPO with the mask ``M ≡ 1`` (δ, δ_b → ∞)."""
    ratio = token_ratio(x.logp, x.old_logp, x.mask)
    never = jnp.zeros(ratio.shape, bool)
    return ModeLoss(-ratio * x.advantages, never, never, ratio, x.mask, {})


# ----------------------------------------------------------------------------------------------------------------
# the loss


@functools.lru_cache(maxsize=None)
def _nullable_fields(cls: type) -> frozenset:
    """Fields of ``cls`` whose type accepts None (there None means something, e.g. dual clip off)."""
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in dataclasses.fields(cls) if type(None) in typing.get_args(hints[f.name]))


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Options of :func:`policy_loss`: the flat keys users write (``objective.args``). Shared: ``norm_length``,
    the KL term, diagnostics. The rest are the loss modes' options (:meth:`mode_args` maps them onto the
    registered mode's args, the only place that does): ``eps_low``, ``eps_high``, ``dual_clip_c``,
    ``aggregation`` (:data:`SHARED_KEYS`; ``None`` ε's and aggregation take the mode's default) and each mode's
    prefixed keys, ``ctpo_*`` (:class:`CTPOArgs`), ``cppo_*`` (:class:`CPPOArgs`), ``appo_*`` (:class:`APPOArgs`),
    whose defaults are those classes'. Keys of other modes are checked but unused.

    Defaults (spec §6, §9; the args classes): ε_low/ε_high 0.2/0.2 (ppo, grpo, dr_grpo), 0.2/0.28 (dapo, appo
    clip-higher), 3e-4/4e-4 (gspo, gspo_token; paper ranges); aggregation ``token-mean`` (ppo, dapo, ctpo, cppo,
    appo), ``seq-mean-token-mean`` (grpo, gspo), ``seq-mean-token-sum-norm`` (dr_grpo). Dual-clip c = 3 for the
    token modes (ppo/grpo/dr_grpo/dapo/appo and non-log-space ctpo); GSPO and CPPO never dual-clip. KL is off
    (``kl_coef = 0``); DeepSeekMath GRPO uses 0.04, verl recipes and APPO 0.001 with ``k3``."""

    eps_low: Optional[float] = None
    eps_high: Optional[float] = None
    dual_clip_c: Optional[float] = PPOClipArgs.dual_clip_c  # None disables dual-clip
    aggregation: Optional[str] = None
    norm_length: Optional[float] = None  # L_max for seq-mean-token-sum-norm; None -> policy_loss's, else padded T
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    # CTPO (§6.4): CTPOArgs
    ctpo_ratio: str = CTPOArgs.ratio  # cumprod | geomean
    ctpo_log_space: bool = CTPOArgs.log_space  # False: plain clip (eps_low/eps_high, dual_clip_c)
    ctpo_c_low: float = CTPOArgs.c_low
    ctpo_c_high: float = CTPOArgs.c_high
    ctpo_c_dual: Optional[float] = CTPOArgs.c_dual  # None disables the log-space dual clip
    ctpo_p: Optional[float] = CTPOArgs.p  # None -> 0.5 for cumprod, -0.5 for geomean
    # CPPO (§6.5): CPPOArgs
    cppo_delta: float = CPPOArgs.delta
    cppo_w_min: float = CPPOArgs.w_min
    cppo_delta_b: float = CPPOArgs.delta_b  # a per-sequence [B] array may be passed to policy_loss(delta_b=...)
    cppo_soft: bool = CPPOArgs.soft
    cppo_divergence: str = CPPOArgs.divergence  # used when policy_loss gets no precomputed divergence (binary)
    # APPO future-KL loss (§9): APPOArgs
    appo_gamma_f: float = APPOArgs.gamma_f  # 2^(-1/decay_rate), decay_rate 64
    appo_participation_c: float = APPOArgs.participation_c
    appo_b: float = APPOArgs.b
    appo_f_max: float = APPOArgs.f_max
    appo_neg_ratio: float = APPOArgs.neg_ratio
    appo_neg_floor: float = APPOArgs.neg_floor
    appo_drop_multi_dual_clip: bool = APPOArgs.drop_multi_dual_clip  # drop sequences with > 1 dual-clipped token
    # diagnostics
    num_position_buckets: int = 8

    def __post_init__(self):
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef={self.kl_coef!r} must be ≥ 0")
        if self.num_position_buckets < 1:
            raise ConfigError(f"num_position_buckets={self.num_position_buckets!r} must be ≥ 1")
        for mode in LOSS_MODES.names():  # every mode's keys are checked, whichever mode runs
            self.mode_args(mode)

    def mode_args(self, loss_mode: str) -> LossModeArgs:
        """``loss_mode``'s registered args built from the flat keys: field ``f`` of its args class reads key ``f``
        (:data:`SHARED_KEYS`) or ``key_prefix + f`` (``ctpo_c_low`` → ``CTPOArgs.c_low``). A ``None`` there takes
        the mode's default unless the field accepts None (``dual_clip_c: null`` disables the dual clip)."""
        _check_choice("loss_mode", loss_mode, LOSS_MODES.names())
        cls = LOSS_MODES.entry(loss_mode).config_cls
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(self, f.name if f.name in SHARED_KEYS else cls.key_prefix + f.name)
            if value is not None or f.name in _nullable_fields(cls):
                values[f.name] = value
        return cls(**values)

    def resolve(self, loss_mode: str) -> "PolicyLossConfig":
        """Fill the ``None`` fields with ``loss_mode``'s defaults (a mode without ε's gets PPO-clip's)."""
        args = self.mode_args(loss_mode)
        clip = args if isinstance(args, ClipArgs) else self.mode_args("ppo")
        return dataclasses.replace(self, eps_low=clip.eps_low, eps_high=clip.eps_high, aggregation=args.aggregation,
                                   ctpo_p=self.mode_args("ctpo").exponent)


def _position_buckets(mask, num_buckets: int):
    """Bucket index of each token by its valid-token position over the padded length ``T``. ``[B, T]`` int32."""
    length = jnp.shape(mask)[-1]
    t = valid_positions(mask) - 1.0
    return jnp.clip(jnp.floor(t * num_buckets / length), 0, num_buckets - 1).astype(jnp.int32)


def _diagnostics(ratio, clipped, dual, m, logp, old_logp, entropy, num_buckets):
    n = jnp.sum(m)
    valid = m > 0
    bucket = _position_buckets(m, num_buckets)
    onehot = jax.nn.one_hot(bucket, num_buckets, dtype=_F32) * m[..., None]  # [B, T, nb]
    clip_by_bucket = jnp.sum(onehot * _f32(clipped)[..., None], axis=(0, 1))
    tokens_by_bucket = jnp.sum(onehot, axis=(0, 1))
    r = jax.lax.stop_gradient(_f32(ratio))
    diag = {
        "num_tokens": n,
        "clip_frac": masked_mean(clipped, m),
        "dual_clip_frac": masked_mean(dual, m),
        "clip_count_by_bucket": clip_by_bucket,
        "token_count_by_bucket": tokens_by_bucket,
        "clip_frac_by_bucket": safe_divide(clip_by_bucket, tokens_by_bucket),
        "ratio_mean": masked_mean(r, m),
        "ratio_min": jnp.where(n > 0, jnp.min(jnp.where(valid, r, jnp.inf)), 0.0),
        "ratio_max": jnp.where(n > 0, jnp.max(jnp.where(valid, r, -jnp.inf)), 0.0),
        "approx_kl": masked_mean(jax.lax.stop_gradient(_f32(old_logp) - _f32(logp)), m),
    }
    if entropy is not None:
        diag["entropy"] = masked_mean(jax.lax.stop_gradient(_f32(entropy)), m)
    return diag



def policy_loss(loss_mode: str, logp, old_logp, advantages, mask, cfg: Optional[PolicyLossConfig] = None,
                ref_logp=None, *, entropy=None, divergence=None, valid=None, delta_b=None, norm_length=None):
    """Policy-gradient loss for ``loss_mode``, a name in :data:`LOSS_MODES` (spec §6, §9). Returns ``(loss_sum,
    count, diagnostics)``; the loss is ``loss_sum / count`` (:func:`safe_divide`).

    The registered mode function (``ppo``/``grpo``/``dr_grpo``/``dapo``: :func:`ppo_clip_mode`; ``gspo``,
    ``gspo_token``, ``ctpo``, ``cppo``, ``appo``: ``<mode>_mode``) computes the per-token loss from
    :class:`LossInputs` and its args (:meth:`PolicyLossConfig.mode_args`); then the shared aggregation, diagnostics
    and KL term. ``divergence``, ``valid`` and ``delta_b`` are CPPO's (:func:`cppo_mode`).

    ``advantages`` is ``[B, T]`` or ``[B]`` (broadcast). ``norm_length`` (scalar or ``[B]``) overrides
    ``cfg.norm_length``, Dr.GRPO's ``L_max`` (:func:`aggregate`). With ``cfg.kl_coef > 0`` the loss adds
    ``kl_coef · agg(kl_penalty(logp, ref_logp))`` with the same aggregation (hence the same count).
    Diagnostics: clip fraction overall and per valid-position bucket (with the counts, for accumulation),
    ratio mean/min/max, ``approx_kl = mean(lp_old − lp)``, entropy when given, and mode-specific entries."""
    cfg = cfg or PolicyLossConfig()
    args = cfg.mode_args(loss_mode)
    m = _f32(mask)
    if m.ndim != 2:
        raise ConfigError(f"mask must be [B, T]; got shape {m.shape}")
    adv = _f32(advantages)
    if adv.ndim == 1:
        adv = adv[:, None]
    x = LossInputs(_f32(logp), _f32(old_logp), jnp.broadcast_to(adv, m.shape), m, divergence, valid, delta_b)
    out = LOSS_MODES.get(loss_mode)(x, args)

    norm_length = cfg.norm_length if norm_length is None else norm_length
    loss_sum, count = aggregate(out.loss, out.mask, args.aggregation, norm_length)
    diag = _diagnostics(out.ratio, out.clipped, out.dual, out.mask, x.logp, x.old_logp, entropy,
                        cfg.num_position_buckets)
    diag["pg_loss"] = safe_divide(loss_sum, count)
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ConfigError(f"kl_coef={cfg.kl_coef} needs ref_logp (reference log-probs), got None")
        kl_sum, _ = aggregate(kl_penalty(x.logp, ref_logp, cfg.kl_estimator), out.mask, args.aggregation,
                              norm_length)
        loss_sum = loss_sum + cfg.kl_coef * kl_sum
        diag["kl_loss"] = safe_divide(kl_sum, count)
    diag.update(out.extra)
    return loss_sum, count, diag
