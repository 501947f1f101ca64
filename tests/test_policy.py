"""Tests for jaxtok/policy.py: hand-computed cases and the limiting cases of spec §6 and §9."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtok import policy as P
from jaxtok.registry import ConfigError

ALL_MODES = P.LOSS_MODES.names()


@functools.partial(jax.jit, static_argnames=("mode", "cfg"))
def _pl(mode, logp, old, adv, mask, cfg=None, ref_logp=None, entropy=None):
    """Jitted policy_loss (one compile per mode/config/shape keeps this file fast on a shared CPU)."""
    return P.policy_loss(mode, logp, old, adv, mask, cfg, ref_logp, entropy=entropy)


@functools.partial(jax.jit, static_argnames=("mode", "cfg"))
def _pl_grad(mode, logp, old, adv, mask, cfg=None):
    """d loss_sum / d logp."""
    return jax.grad(lambda lp: P.policy_loss(mode, lp, old, adv, mask, cfg)[0])(logp)


_cppo_mask = jax.jit(P.cppo_mask, static_argnames=("soft",))


def _arr(x):
    return jnp.asarray(x, jnp.float32)


def _toy(B=3, T=5, seed=0, ragged=True):
    """Random (logp, old_logp, advantages [B], mask) with rows of length T, T−2, 1 (numpy: no per-op compiles)."""
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.1, 3.0, (B, T))
    logp = old + 0.3 * rng.standard_normal((B, T))
    adv = rng.standard_normal(B)
    lengths = np.array(([T, max(T - 2, 1), 1] + [T] * max(B - 3, 0))[:B])
    mask = np.arange(T)[None, :] < lengths[:, None] if ragged else np.ones((B, T), bool)
    return _arr(logp), _arr(old), _arr(adv), jnp.asarray(mask)


# ---------------------------------------------------------------------------------------------------- PPO clip


def test_ppo_clip_hand_values():
    ratio = _arr([[0.5, 1.0, 1.5, 5.0], [0.5, 1.0, 1.5, 5.0]])
    adv = _arr([[1.0] * 4, [-1.0] * 4])
    loss, clipped, dual = P.ppo_clip_loss(ratio, adv, 0.2, 0.2, dual_clip_c=3.0)
    # A>0: max(-ρ, -clip(ρ)); A<0: max(ρ, clip(ρ)) then min(·, 3)
    np.testing.assert_allclose(loss, [[-0.5, -1.0, -1.2, -1.2], [0.8, 1.0, 1.5, 3.0]], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[False, False, True, True], [True, False, False, False]])
    np.testing.assert_array_equal(dual, [[False] * 4, [False, False, False, True]])


def test_asymmetric_clip_higher_hand_value_and_symmetric_limit():
    ratio, adv = _arr([1.25, 0.75]), _arr([1.0, -1.0])
    sym, _, _ = P.ppo_clip_loss(ratio, adv, 0.2, 0.2)
    asym, _, _ = P.ppo_clip_loss(ratio, adv, 0.2, 0.28)
    np.testing.assert_allclose(sym, [-1.2, 0.8], rtol=1e-6)
    np.testing.assert_allclose(asym, [-1.25, 0.8], rtol=1e-6)  # ε_high only widens the upper bound
    # ε_low = ε_high through policy_loss: dapo with eps_high=0.2 equals ppo
    logp, old, a, mask = _toy()
    same = P.PolicyLossConfig(eps_low=0.2, eps_high=0.2)
    lp_dapo = _pl("dapo", logp, old, a, mask, same)[:2]
    lp_ppo = _pl("ppo", logp, old, a, mask)[:2]
    np.testing.assert_allclose(lp_dapo, lp_ppo, rtol=1e-6)


def test_dual_clip_only_for_negative_advantages():
    ratio = _arr([0.3, 1.0, 4.0, 10.0])
    for sign in (1.0, -1.0):
        adv = sign * jnp.ones(4)
        with_dual, _, dual = P.ppo_clip_loss(ratio, adv, 0.2, 0.2, 3.0)
        without, _, _ = P.ppo_clip_loss(ratio, adv, 0.2, 0.2, None)
        if sign > 0:
            np.testing.assert_array_equal(with_dual, without)
            assert not dual.any()
        else:
            np.testing.assert_allclose(with_dual, [0.8, 1.0, 3.0, 3.0], rtol=1e-6)
            np.testing.assert_array_equal(dual, [False, False, True, True])
    with pytest.raises(ConfigError, match="dual_clip_c"):
        P.ppo_clip_loss(ratio, ratio, 0.2, 0.2, 0.5)


def test_ppo_mode_gradient_zero_where_clipped():
    logp = _arr([[math.log(1.5), 0.0, math.log(0.5)]])
    old = jnp.zeros((1, 3))
    mask = jnp.ones((1, 3), bool)
    g = _pl_grad("ppo", logp, old, _arr([1.0]), mask)
    # token 0 clipped above (A>0), token 1 unclipped (∂(−ρ)/∂lp = −1), token 2 below the bound: −ρ = −0.5
    np.testing.assert_allclose(g, [[0.0, -1.0, -0.5]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- ratios


def test_length_one_sequences_all_ratios_agree():
    logp, old, _, _ = _toy(B=4, T=1, ragged=False)
    mask = jnp.ones((4, 1), bool)
    tok = P.token_ratio(logp, old, mask)
    for fn in (P.gspo_sequence_log_ratio, P.gspo_token_log_ratio):
        np.testing.assert_allclose(jnp.exp(fn(logp, old, mask)), tok, rtol=1e-6)
    for mode in ("cumprod", "geomean"):
        np.testing.assert_allclose(jnp.exp(P.cumulative_log_ratio(logp, old, mask, mode)), tok, rtol=1e-6)


def test_cumulative_ratio_values_at_T_and_relations():
    logp, old, _, mask = _toy(B=3, T=5)
    m = mask.astype(jnp.float32)
    d = (logp - old) * m
    cum = P.cumulative_log_ratio(logp, old, mask, "cumprod")
    geo = P.cumulative_log_ratio(logp, old, mask, "geomean")
    np.testing.assert_allclose(cum, jnp.cumsum(d, -1) * m, rtol=1e-5, atol=1e-6)
    # geomean = cumprod / t_pos on valid tokens
    np.testing.assert_allclose(geo * P.valid_positions(mask), cum, rtol=1e-5, atol=1e-6)
    last = jnp.sum(m, -1).astype(int) - 1
    rows = jnp.arange(3)
    np.testing.assert_allclose(cum[rows, last], jnp.sum(d, -1), rtol=1e-5)  # full-sequence ratio
    np.testing.assert_allclose(geo[rows, last], P.sequence_log_ratio(logp, old, mask), rtol=1e-5)  # GSPO s_i


def test_tool_tokens_do_not_advance_positions_or_ratios():
    mask = jnp.array([[1, 0, 1, 1]], bool)
    np.testing.assert_allclose(P.valid_positions(mask), [[1, 1, 2, 3]])
    logp = _arr([[0.1, 5.0, 0.2, 0.3]])
    old = jnp.zeros((1, 4))
    cum = P.cumulative_log_ratio(logp, old, mask, "cumprod")
    np.testing.assert_allclose(cum, [[0.1, 0.0, 0.3, 0.6]], rtol=1e-5)
    geo = P.cumulative_log_ratio(logp, old, mask, "geomean")
    np.testing.assert_allclose(geo, [[0.1, 0.0, 0.15, 0.2]], rtol=1e-5)


@pytest.mark.parametrize("mode", ["cumprod", "geomean"])
def test_cumulative_ratio_gradient_only_to_current_token(mode):
    logp, old, _, _ = _toy(B=1, T=4, ragged=False)
    mask = jnp.ones((1, 4), bool)
    jac = jax.jit(jax.jacobian(lambda lp: jnp.exp(P.cumulative_log_ratio(lp, old, mask, mode))[0]))(logp)[:, 0, :]
    ratio = jnp.exp(P.cumulative_log_ratio(logp, old, mask, mode))[0]
    np.testing.assert_allclose(jac, jnp.diag(ratio), rtol=1e-6, atol=0)  # ∇r_t = r_t ∇lp_t, exactly 0 off-diagonal
    # and through the CTPO clipped loss: ∂ℓ_t/∂lp_j = 0 for j ≠ t
    cfg = P.PolicyLossConfig(ctpo_ratio=mode).resolve("ctpo")

    def token_losses(lp):
        lr = P.cumulative_log_ratio(lp, old, mask, mode)
        loss, _, _ = P.log_space_clip_loss(lr, jnp.full(lp.shape, 0.7), P.valid_positions(mask), cfg.ctpo_c_low,
                                           cfg.ctpo_c_high, cfg.ctpo_c_dual, cfg.ctpo_p)
        return loss[0]

    jl = np.asarray(jax.jit(jax.jacobian(token_losses))(logp)[:, 0, :])  # [T, T]
    assert np.all(jl[~np.eye(4, dtype=bool)] == 0.0)


def test_ctpo_p0_matching_bounds_equals_ppo_clip():
    eps, c = 0.2, 3.0
    la = P.PolicyLossConfig(ctpo_p=0.0, ctpo_c_low=-math.log(1 - eps), ctpo_c_high=math.log(1 + eps),
                            ctpo_c_dual=math.log(c), aggregation="token-mean")
    ppo = P.PolicyLossConfig(eps_low=eps, eps_high=eps, dual_clip_c=c)
    logp, old, adv, _ = _toy(B=6, T=1, ragged=False)
    logp = old + jnp.array([[-0.9], [-0.1], [0.1], [0.5], [1.5], [2.0]])  # in and out of the window
    adv = jnp.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    mask = jnp.ones((6, 1), bool)
    np.testing.assert_allclose(_pl("ctpo", logp, old, adv, mask, la)[0], _pl("ppo", logp, old, adv, mask, ppo)[0],
                               rtol=1e-5)
    np.testing.assert_allclose(_pl_grad("ctpo", logp, old, adv, mask, la), _pl_grad("ppo", logp, old, adv, mask, ppo),
                               rtol=1e-5, atol=1e-7)
    # the clip function alone, any length: p=0 log-space clip on token log-ratios == PPO-clip
    logp, old, a, mask = _toy(B=2, T=6, ragged=False)
    lr = P.log_ratio(3 * logp, 3 * old)
    ls, _, _ = P.log_space_clip_loss(lr, a[:, None] * jnp.ones((1, 6)), P.valid_positions(mask),
                                     -math.log(1 - eps), math.log(1 + eps), math.log(c), 0.0)
    pp, _, _ = P.ppo_clip_loss(jnp.exp(lr), a[:, None] * jnp.ones((1, 6)), eps, eps, c)
    np.testing.assert_allclose(ls, pp, rtol=1e-5)


def test_ctpo_window_scales_with_position():
    # window at t=1 ≈ [0.975, 1.05], at t=100 ≈ [0.78, 1.65] (spec §6.4 defaults, p = 0.5)
    pos = _arr([1.0, 100.0])
    upper, _, _ = P.log_space_clip_loss(_arr([5.0, 5.0]), jnp.ones(2), pos, 0.025, 0.05, None, 0.5)  # −r̃ (A>0)
    lower, _, _ = P.log_space_clip_loss(_arr([-5.0, -5.0]), -jnp.ones(2), pos, 0.025, 0.05, None, 0.5)  # r̃ (A<0)
    np.testing.assert_allclose(-upper, [math.exp(0.05), math.exp(0.5)], rtol=1e-6)
    np.testing.assert_allclose(lower, [math.exp(-0.025), math.exp(-0.25)], rtol=1e-6)
    assert math.exp(-0.25) == pytest.approx(0.78, abs=0.005) and math.exp(0.5) == pytest.approx(1.65, abs=0.005)
    # dual clip threshold exp(c_c s_t) for A<0
    dual, _, hit = P.log_space_clip_loss(_arr([5.0, 5.0]), -jnp.ones(2), pos, 0.025, 0.05, 0.05, 0.5)
    np.testing.assert_allclose(dual, [math.exp(0.05), math.exp(0.5)], rtol=1e-6)
    assert bool(hit.all())


def test_ctpo_non_log_space_uses_plain_clip_on_cumulative_ratio():
    logp, old, adv, mask = _toy()
    cfg = P.PolicyLossConfig(ctpo_log_space=False)
    got = _pl("ctpo", logp, old, adv, mask, cfg)[:2]
    ratio = jnp.exp(P.cumulative_log_ratio(logp, old, mask, "cumprod"))
    loss, _, _ = P.ppo_clip_loss(ratio, P.broadcast_advantages(adv, mask), 0.2, 0.2, 3.0)
    np.testing.assert_allclose(got, P.aggregate(loss, mask, "token-mean"), rtol=1e-6)


def test_gspo_token_equals_gspo_when_advantage_constant_per_sequence():
    logp, old, adv, mask = _toy(B=3, T=5)
    logp = old + 0.0003 * (logp - old) / 0.3  # inside and around the tiny GSPO window
    np.testing.assert_allclose(_pl("gspo", logp, old, adv, mask)[0], _pl("gspo_token", logp, old, adv, mask)[0],
                               rtol=1e-6)
    np.testing.assert_allclose(_pl_grad("gspo", logp, old, adv, mask), _pl_grad("gspo_token", logp, old, adv, mask),
                               rtol=1e-5, atol=1e-7)
    # token-form gradient: s_i ∇lp_t, not spread over the sequence
    jac = jax.jit(jax.jacobian(lambda lp: jnp.exp(P.gspo_token_log_ratio(lp, old, mask))[0]))(logp)[:, 0, :]
    s0 = jnp.exp(P.sequence_log_ratio(logp, old, mask))[0]
    np.testing.assert_allclose(jac, s0 * jnp.eye(5), rtol=1e-6)


def test_gspo_length_one_equals_token_ratio_loss():
    logp, old, adv, _ = _toy(B=4, T=1, ragged=False)
    logp = old + jnp.array([[-1e-3], [1e-4], [2e-4], [1e-3]])
    mask = jnp.ones((4, 1), bool)
    cfg = P.PolicyLossConfig(dual_clip_c=None, eps_low=3e-4, eps_high=4e-4, aggregation="seq-mean-token-mean")
    for mode in ("gspo", "gspo_token"):
        np.testing.assert_allclose(_pl(mode, logp, old, adv, mask)[0],
                                   _pl("grpo", logp, old, adv, mask, cfg)[0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_case():
    r = _arr([1, 0, 0, 1, 1, 1, 1, 1, 3])
    g = jnp.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    bessel = P.group_advantages(r, g, 3)
    pop = P.group_advantages(r, g, 3, scale="population")
    s = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(bessel, [s, -s, -s, s, 0, 0, 0, 0, 3.0], rtol=1e-5)
    p = 0.5 / (0.5 + 1e-6)
    np.testing.assert_allclose(pop, [p, -p, -p, p, 0, 0, 0, 0, 3.0], rtol=1e-5)
    assert np.isfinite(np.asarray(bessel)).all()


def test_dr_grpo_is_grpo_without_std():
    r = _arr([1, 0, 0, 1, 2, 0])
    g = P.contiguous_group_ids(6, 3)
    dr = P.dr_grpo_advantages(r, g, 2)
    np.testing.assert_allclose(dr, [2 / 3, -1 / 3, -1 / 3, 0, 1, -1], rtol=1e-6)
    std = jnp.array([np.std([1, 0, 0], ddof=1), np.std([1, 2, 0], ddof=1)])[g]
    np.testing.assert_allclose(P.group_advantages(r, g, 2) * (std + 1e-6), dr, rtol=1e-5, atol=1e-7)


def test_rloo_hand_case():
    r = _arr([1, 0, 0, 1, 0, 1, 2, 5])
    g = jnp.array([0, 0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_allclose(P.rloo_advantages(r, g, 3),
                               [2 / 3, -2 / 3, -2 / 3, 2 / 3, -1.5, 0.0, 1.5, 5.0], rtol=1e-6)


def test_advantages_ignore_invalid_rows():
    r = _arr([1, 0, 100, 1])
    valid = jnp.array([True, True, False, True])
    a = P.group_advantages(r, jnp.zeros(4, jnp.int32), 1, scale="population", valid=valid)
    mean, std = 2 / 3, np.std([1, 0, 1])
    np.testing.assert_allclose(a, [(1 - mean) / (std + 1e-6), -mean / (std + 1e-6), 0, (1 - mean) / (std + 1e-6)],
                               rtol=1e-5)


def test_batch_advantages_whiten():
    a = _arr([[1, 2, 3], [4, 0, 0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]], bool)
    w = P.batch_advantages(a, mask)
    vals = np.array([1, 2, 3, 4.0])
    np.testing.assert_allclose(w[mask], (vals - vals.mean()) / (vals.std() + 1e-6), rtol=1e-5)
    assert float(jnp.abs(w[~mask]).sum()) == 0.0


def test_outcome_advantages_dispatch():
    r = _arr([1, 0, 0, 1, 2, 0])
    g = P.contiguous_group_ids(6, 3)
    np.testing.assert_allclose(P.outcome_advantages("dr_grpo", r, g, 2), P.dr_grpo_advantages(r, g, 2))
    np.testing.assert_allclose(P.outcome_advantages("rloo", r, g, 2), P.rloo_advantages(r, g, 2))
    np.testing.assert_allclose(P.outcome_advantages("grpo_population", r, g, 2),
                               P.group_advantages(r, g, 2, scale="population"))
    np.testing.assert_allclose(P.outcome_advantages("batch", r, g, 2),
                               (r - 2 / 3) / (np.std(np.asarray(r), ddof=1) + 1e-6), rtol=1e-5)
    with pytest.raises(ConfigError, match="'ppo'"):
        P.outcome_advantages("ppo", r, g, 2)


def test_contiguous_group_ids_rejects_bad_size():
    np.testing.assert_array_equal(P.contiguous_group_ids(6, 2), [0, 0, 1, 1, 2, 2])
    with pytest.raises(ConfigError, match="group_size=4"):
        P.contiguous_group_ids(6, 4)


# ---------------------------------------------------------------------------------------------------- aggregation


def test_aggregation_modes_ragged_hand_case():
    L = _arr([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
    expect = {
        "token-mean": (17.0, 5.0),
        "seq-mean-token-mean": (2.0 + 5.5, 2.0),
        "seq-mean-token-sum": (17.0, 2.0),
        "seq-mean-token-sum-norm": (17.0 / 4, 2.0),
    }
    for mode, (s, c) in expect.items():
        got = P.aggregate(L, mask, mode)
        np.testing.assert_allclose(got, (s, c), rtol=1e-6, err_msg=mode)
    np.testing.assert_allclose(P.aggregate(L, mask, "seq-mean-token-sum-norm", norm_length=8), (17 / 8, 2.0))
    # L_max per sequence (the rollout's generation budget [B]) and as a traced scalar
    np.testing.assert_allclose(P.aggregate(L, mask, "seq-mean-token-sum-norm", norm_length=_arr([2, 4, 8])),
                               (6 / 2 + 11 / 4, 2.0), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda n: P.aggregate(L, mask, "seq-mean-token-sum-norm", norm_length=n))(
        jnp.float32(8)), (17 / 8, 2.0), rtol=1e-6)
    with pytest.raises(ConfigError, match="norm_length"):
        P.aggregate(L, mask, "seq-mean-token-sum-norm", norm_length=0)
    with pytest.raises(ConfigError, match="'token-sum'"):
        P.aggregate(L, mask, "token-sum")


def test_sampler_mismatch_hand_case():
    """Sampler/trainer mismatch on sampled tokens: mean |Δ| and the k3 estimate of KL(μ‖π), over the mask."""
    lp = _arr([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    mu = _arr([[-1.0, -1.5, -9.0], [-0.5, -1.0, 0.0]])
    mask = jnp.array([[1, 1, 0], [0, 1, 0]], bool)
    out = P.sampler_mismatch(lp, mu, mask)
    d = np.array([0.0, -0.5, 0.5])
    np.testing.assert_allclose(out["abs_logp_diff"], np.abs(d).mean(), rtol=1e-6)
    np.testing.assert_allclose(out["kl"], np.mean(np.expm1(d) - d), rtol=1e-6)
    same = P.sampler_mismatch(lp, lp, mask)
    assert float(same["abs_logp_diff"]) == 0.0 and float(same["kl"]) == 0.0
    assert float(P.sampler_mismatch(lp, mu, jnp.zeros_like(mask))["kl"]) == 0.0


def test_microbatch_accumulation_equals_full_batch():
    logp, old, adv, mask = _toy(B=4, T=5, seed=3)
    aggs = jax.jit(lambda L, m: [P.aggregate(L, m, a) for a in P.AGG_MODES])
    L = P.ppo_clip_loss(P.token_ratio(logp, old, mask), P.broadcast_advantages(adv, mask), 0.2, 0.28, 3.0)[0]
    full, halves = aggs(L, mask), [aggs(L[i:i + 2], mask[i:i + 2]) for i in (0, 2)]
    for a, f, h0, h1 in zip(P.AGG_MODES, full, *halves):
        np.testing.assert_allclose(P.safe_divide(h0[0] + h1[0], h0[1] + h1[1]), P.safe_divide(*f), rtol=1e-6,
                                   err_msg=a)
    # the same through policy_loss, with a KL term
    cfg = P.PolicyLossConfig(kl_coef=0.1)
    s, c, _ = _pl("grpo", logp, old, adv, mask, cfg, old)
    parts = [_pl("grpo", logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], cfg, old[i:i + 2]) for i in (0, 2)]
    np.testing.assert_allclose(P.safe_divide(parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]),
                               P.safe_divide(s, c), rtol=1e-6)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_empty_mask_gives_zero_loss_and_finite_grad(mode):
    logp, old, adv, _ = _toy(B=2, T=3)
    mask = jnp.zeros((2, 3), bool)
    cfg = P.PolicyLossConfig(kl_coef=0.1)

    def f(lp):
        s, c, d = P.policy_loss(mode, lp, old, adv, mask, cfg, ref_logp=old)
        return P.safe_divide(s, c), d

    (loss, diag), g = jax.jit(jax.value_and_grad(f, has_aux=True))(logp)
    assert float(loss) == 0.0
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) == 0.0
    for k, v in diag.items():
        assert np.isfinite(np.asarray(v)).all(), k


# ---------------------------------------------------------------------------------------------------- KL penalties


def test_kl_estimators_values_and_gradients():
    lp, ref = _arr([-1.0]), _arr([-1.5])
    d = -0.5
    want = {"k1": 0.5, "k2": 0.125, "k3": math.exp(d) - d - 1, "k3+": math.exp(d) - d - 1}
    grads = {"k1": 1.0, "k2": 0.5, "k3": 1 - math.exp(d), "k3+": 0.5}  # k3+: value of k3, gradient of k2
    for est in P.KL_ESTIMATORS:
        v, g = jax.value_and_grad(lambda x: P.kl_penalty(x, ref, est)[0])(lp)
        assert float(v) == pytest.approx(want[est], rel=1e-6), est
        assert float(g[0]) == pytest.approx(grads[est], rel=1e-6), est
    # k3 clipped to ≤ 10 for a huge gap, never negative
    assert float(P.kl_penalty(_arr([-30.0]), _arr([0.0]), "k3")[0]) == 10.0
    assert float(jnp.min(P.kl_penalty(_arr([-3, -1, 0]), _arr([0, -1, -3]), "k3"))) >= 0.0


def test_kl_estimators_unbiased_against_exact_kl():
    logits_pi, logits_ref = np.array([1.0, 0.2, -0.5, 0.0, 0.7]), np.array([0.3, 0.5, 0.0, -1.0, 0.9])
    pi = logits_pi - np.log(np.exp(logits_pi).sum())
    ref = logits_ref - np.log(np.exp(logits_ref).sum())
    exact = float(np.sum(np.exp(pi) * (pi - ref)))  # KL(π ‖ π_ref)
    y = np.random.default_rng(0).choice(5, size=50_000, p=np.exp(pi))
    for est in ("k1", "k3"):
        mc = float(jnp.mean(P.kl_penalty(_arr(pi[y]), _arr(ref[y]), est)))
        assert mc == pytest.approx(exact, abs=0.01), est
    # k2 is only second-order accurate, but non-negative
    assert float(jnp.min(P.kl_penalty(_arr(pi[y]), _arr(ref[y]), "k2"))) >= 0


def test_kl_term_added_with_same_aggregation():
    logp, old, adv, mask = _toy()
    ref = old - 0.1
    cfg0 = P.PolicyLossConfig()
    cfg1 = P.PolicyLossConfig(kl_coef=0.04, kl_estimator="k3")
    s0, c0, _ = _pl("grpo", logp, old, adv, mask, cfg0)
    s1, c1, d1 = _pl("grpo", logp, old, adv, mask, cfg1, ref_logp=ref)
    kl = P.aggregate(P.kl_penalty(logp, ref, "k3"), mask, "seq-mean-token-mean")
    assert float(c0) == float(c1) == float(kl[1])
    np.testing.assert_allclose(s1, s0 + 0.04 * kl[0], rtol=1e-6)
    assert float(d1["kl_loss"]) == pytest.approx(float(kl[0] / kl[1]), rel=1e-6)
    with pytest.raises(ConfigError, match="ref_logp"):
        P.policy_loss("grpo", logp, old, adv, mask, cfg1)


# ---------------------------------------------------------------------------------------------------- CPPO


def _cppo_loop(ratio, adv, d, valid, delta, w_min, delta_b):
    """Algorithm 1, one token at a time (reference for the batched cumsum implementation)."""
    B, T = d.shape
    out = np.zeros((B, T))
    for b in range(B):
        n = int(valid[b].sum())
        S = W = 0.0
        t = 0
        for j in range(T):
            if not valid[b, j]:
                continue
            t += 1
            w = 1.0 if n == 1 else 1 - (1 - w_min) / (n - 1) * (t - 1)
            z = w * d[b, j]
            c = min(delta, delta + delta_b * W - S)
            out[b, j] = float(adv[b, j] * (ratio[b, j] - 1) <= 0 or z <= c)
            S += z
            W += w
    return out


def test_cppo_hand_run_six_tokens():
    d = _arr([[0.1, 0.2, 0.05, 0.16, 0.01, 0.1]])
    ratio = jnp.full((1, 6), 1.1)
    adv = jnp.ones((1, 6))
    valid = jnp.ones((1, 6), bool)
    np.testing.assert_allclose(P.position_weights(valid, 0.8), [[1, 0.96, 0.92, 0.88, 0.84, 0.8]], rtol=1e-6)
    m, tok, bud = _cppo_mask(ratio, adv, d, valid, 0.15, 0.8, 0.015)
    # t1: Z=.1 ≤ .15 keep; t2: Z=.192 > δ (token reject); t3..: c = .15 + .015 W − S < 0 (budget reject)
    np.testing.assert_array_equal(m, [[1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(tok, [[False, True, False, False, False, False]])
    np.testing.assert_array_equal(bud, [[False, False, True, True, True, True]])
    # tokens whose update moves ρ back toward 1 are never blocked
    m2, _, _ = _cppo_mask(jnp.full((1, 6), 0.9), adv, d, valid, 0.15, 0.8, 0.015)
    np.testing.assert_array_equal(m2, jnp.ones((1, 6)))
    # a small divergence stays within the budget
    m3, _, _ = _cppo_mask(ratio, adv, jnp.full((1, 6), 0.01), valid, 0.15, 0.8, 0.015)
    np.testing.assert_array_equal(m3, jnp.ones((1, 6)))


def test_cppo_batched_equals_loop():
    rng = np.random.default_rng(7)
    B, T = 4, 7
    d = _arr(rng.uniform(0, 0.2, (B, T)))
    ratio = _arr(1.0 + 0.3 * rng.standard_normal((B, T)))
    adv = _arr(np.sign(rng.standard_normal((B, 1))) * np.ones((B, T)))
    valid = jnp.arange(T)[None] < jnp.array([7, 4, 1, 6])[:, None]
    valid = valid.at[3, 2].set(False)  # a hole
    for delta_b in (0.015, jnp.array([0.01, 0.02, 0.03, 0.04])):
        m, _, _ = _cppo_mask(ratio, adv, d, valid, 0.1, 0.8, delta_b)
        dbs = np.broadcast_to(np.asarray(delta_b), (B,))
        ref = np.stack([_cppo_loop(np.asarray(ratio)[b:b + 1], np.asarray(adv)[b:b + 1], np.asarray(d)[b:b + 1],
                                   np.asarray(valid)[b:b + 1], 0.1, 0.8, float(dbs[b]))[0] for b in range(B)])
        np.testing.assert_array_equal(np.asarray(m), ref)


def test_cppo_limits_dppo_and_ppo_mask():
    rng = np.random.default_rng(1)
    B, T = 3, 8
    ratio = _arr(1.0 + 0.4 * rng.standard_normal((B, T)))
    adv = _arr(rng.standard_normal((B, T)))
    d = _arr(rng.uniform(0, 0.4, (B, T)))
    valid = jnp.ones((B, T), bool)
    toward = adv * (ratio - 1) <= 0
    m, _, _ = _cppo_mask(ratio, adv, d, valid, 0.15, w_min=1.0, delta_b=1e9)
    np.testing.assert_array_equal(m, (toward | (d <= 0.15)).astype(jnp.float32))  # DPPO
    eps = 0.2
    m, _, _ = _cppo_mask(ratio, adv, jnp.abs(ratio - 1), valid, eps, w_min=1.0, delta_b=1e9)
    _, clipped, _ = P.ppo_clip_loss(ratio, adv, eps, eps, None)
    np.testing.assert_array_equal(m, (~clipped).astype(jnp.float32))  # PPO keeps the gradient iff not clipped


def test_cppo_soft_variant_hand_values():
    d = _arr([[0.3, 0.05]])
    valid = jnp.ones((1, 2), bool)
    m, _, _ = _cppo_mask(jnp.full((1, 2), 1.2), jnp.ones((1, 2)), d, valid, 0.15, 1.0, 0.0, soft=True)
    # t1: x = max(.3/.15, .3/.15) = 2 → 0.5; t2: x = max(.05/.15, .35/.15) = 7/3 → 3/7
    np.testing.assert_allclose(m, [[0.5, 3 / 7]], rtol=1e-6)
    m, _, _ = _cppo_mask(jnp.full((1, 2), 0.8), jnp.ones((1, 2)), d, valid, 0.15, 1.0, 0.0, soft=True)
    np.testing.assert_allclose(m, [[1.0, 1.0]])


def test_cppo_divergences():
    lp, old = jnp.log(_arr([0.3])), jnp.log(_arr([0.5]))
    assert float(P.cppo_divergence("binary_tv", lp, old)[0]) == pytest.approx(0.2, rel=1e-6)
    bkl = 0.5 * math.log(0.5 / 0.3) + 0.5 * math.log(0.5 / 0.7)
    assert float(P.cppo_divergence("binary_kl", lp, old)[0]) == pytest.approx(bkl, rel=1e-5)
    # top-2 of μ = {0.5, 0.3}; π there = {0.4, 0.4}; sampled token outside top-K: μ 0.1, π 0.05
    mu_k, pi_k = jnp.log(_arr([[0.5, 0.3]])), jnp.log(_arr([[0.4, 0.4]]))
    tv = P.cppo_divergence("topk_tv", jnp.log(_arr([0.05])), jnp.log(_arr([0.1])), mu_k, pi_k, jnp.array([False]))
    # others: μ 0.1, π 0.15 → ½(0.1 + 0.1 + 0.05 + 0.05) = 0.15
    assert float(tv[0]) == pytest.approx(0.15, rel=1e-5)
    # sampled token inside top-K is not double counted: others μ 0.2, π 0.2 → ½(0.1 + 0.1) = 0.1
    tv_in = P.cppo_divergence("topk_tv", jnp.log(_arr([0.4])), jnp.log(_arr([0.5])), mu_k, pi_k, jnp.array([True]))
    assert float(tv_in[0]) == pytest.approx(0.1, rel=1e-5)
    kl_in = P.cppo_divergence("topk_kl", jnp.log(_arr([0.4])), jnp.log(_arr([0.5])), mu_k, pi_k, jnp.array([True]))
    assert float(kl_in[0]) == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4), rel=1e-5)
    with pytest.raises(ConfigError, match="top"):
        P.cppo_divergence("topk_tv", lp, old)
    with pytest.raises(ConfigError, match="'tvd'"):
        P.cppo_divergence("tvd", lp, old)


def test_cppo_adaptive_delta_b():
    d = _arr([[0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10], [0.001] * 11, [0.5] * 11])
    valid = jnp.ones((3, 11), bool).at[1].set(False)
    np.testing.assert_allclose(P.cppo_adaptive_delta_b(d, valid, 0.02), [0.04, 0.02, 0.04], rtol=1e-6)
    d2 = _arr([[0.0, 0.01, 0.02, 0.025, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03]])
    assert float(P.cppo_adaptive_delta_b(d2, jnp.ones((1, 11), bool), 0.02)[0]) == pytest.approx(0.03)


def test_cppo_loss_is_masked_ratio_times_advantage():
    logp, old, adv, mask = _toy(seed=5)
    cfg = P.PolicyLossConfig(cppo_delta=0.05)
    s, c, diag = _pl("cppo", logp, old, adv, mask, cfg)
    ratio = P.token_ratio(logp, old, mask)
    a = P.broadcast_advantages(adv, mask)
    m, _, _ = _cppo_mask(ratio, a, P.binary_tv(logp, old), mask, 0.05, 0.8, 0.015)
    np.testing.assert_allclose((s, c), P.aggregate(-m * ratio * a, mask, "token-mean"), rtol=1e-6)
    assert 0.0 <= float(diag["cppo_budget_reject_frac"]) <= 1.0
    # the mask is stop-gradient: gradient = −M ρ A ∇lp / count
    g = _pl_grad("cppo", logp, old, adv, mask, cfg)
    np.testing.assert_allclose(g, -m * ratio * a * mask, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- APPO


def test_discounted_reverse_cumsum_and_future_kl_limits():
    np.testing.assert_allclose(P.discounted_reverse_cumsum(_arr([[1, 2, 3]]), 0.5), [[2.75, 3.5, 3.0]])
    logp, old, _, mask = _toy()
    d = P.log_ratio(logp, old, mask)
    part = d <= math.log(3.0)
    np.testing.assert_allclose(P.future_kl(logp, old, mask, gamma_f=0.0), d * part * mask, rtol=1e-6)
    # participation excludes large positive log-ratios
    fk = P.future_kl(_arr([[2.0, 0.5]]), jnp.zeros((1, 2)), jnp.ones((1, 2), bool), gamma_f=1.0)
    np.testing.assert_allclose(fk, [[0.5, 0.5]], rtol=1e-6)


def test_appo_future_factor_range_and_negative_override():
    fkl = _arr([-1.0, 0.05, 3.0, 3.0])
    f = P.appo_future_factor(fkl, _arr([1.0, 1.0, 1.0, 7.0]), _arr([1.0, 1.0, 1.0, -1.0]))
    np.testing.assert_allclose(f, [1.0, math.exp(0.05), 1.2, 1.0], rtol=1e-6)


def test_appo_b0_equals_dapo():
    logp, old, adv, mask = _toy(seed=2)
    cfg = P.PolicyLossConfig(appo_b=0.0)
    np.testing.assert_allclose(_pl("appo", logp, old, adv, mask, cfg)[:2],
                               _pl("dapo", logp, old, adv, mask)[:2], rtol=1e-6)


def test_appo_drops_sequences_with_several_dual_clipped_tokens():
    old = jnp.zeros((2, 3))
    logp = _arr([[2.0, 2.0, 0.0], [2.0, 0.0, 0.0]])  # ρ = e² > 3: row 0 has 2 dual-clipped tokens, row 1 one
    adv = _arr([-1.0, -1.0])
    mask = jnp.ones((2, 3), bool)
    cfg = P.PolicyLossConfig(appo_b=0.0)
    s, c, d = _pl("appo", logp, old, adv, mask, cfg)
    assert float(c) == 3.0 and float(d["appo_dropped_seqs"]) == 1.0
    assert float(s) == pytest.approx(3.0 + 1.0 + 1.0, rel=1e-6)  # row 1: dual bound 3, then ρ=1 twice


def test_reinforce_is_unclipped_ratio_times_advantage():
    old = jnp.log(_arr([[0.25, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    logp = jnp.log(_arr([[0.5, 0.5, 0.25], [0.25, 0.5, 0.5]]))  # ρ = [[2, 1, 0.5], [0.5, ·, ·]]
    adv, mask = _arr([2.0, -1.0]), jnp.array([[1, 1, 1], [1, 0, 0]], bool)
    s, c, d = _pl("reinforce", logp, old, adv, mask)
    assert float(c) == 4.0 and float(s) == pytest.approx(-4.0 - 2.0 - 1.0 + 0.5, rel=1e-6)  # token-mean of −ρA
    assert float(d["clip_frac"]) == 0.0 and float(d["dual_clip_frac"]) == 0.0
    np.testing.assert_allclose(_pl_grad("reinforce", logp, old, adv, mask), [[-4, -2, -1], [0.5, 0, 0]], rtol=1e-6)
    # CPPO whose mask keeps every token (δ, δ_b → ∞) is the same loss
    logp, old, adv, mask = _toy(seed=7)
    wide = P.PolicyLossConfig(cppo_delta=1e9, cppo_delta_b=1e9)
    np.testing.assert_allclose(_pl("reinforce", logp, old, adv, mask)[:2], _pl("cppo", logp, old, adv, mask, wide)[:2],
                               rtol=1e-6)


def test_branching_score():
    H = _arr([[0.1, 2.0, 0.5, 3.0]])
    logp = _arr([[0.0, 0.1, 0.0, 0.0]])
    roll = jnp.zeros((1, 4))
    mask = jnp.ones((1, 4), bool)
    score, cand = P.branching_score(H, logp, roll, mask, gamma=1.0, eps=0.2)
    omega = np.exp([0.1, 0.1, 0.0, 0.0])
    zh = (np.array([0.1, 2.0, 0.5, 3.0]) - 1.4) / np.std([0.1, 2.0, 0.5, 3.0])
    zo = (omega - omega.mean()) / omega.std()
    np.testing.assert_allclose(score, [zh * zo], rtol=1e-5)
    np.testing.assert_array_equal(cand, [(zh > 0) & (zo > 0)])  # only token 1: high entropy, future gain
    s0, c0 = P.branching_score(jnp.ones((1, 4)), logp, roll, mask)
    assert float(jnp.abs(s0).sum()) == 0.0 and not bool(c0.any())


# ---------------------------------------------------------------------------------------------------- DAPO helpers


def test_zero_variance_group_filter():
    r = _arr([1, 1, 0, 1, 0, 0, 2])
    g = jnp.array([0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(P.zero_variance_group_mask(r, g, 4), [False, False, True, True, False, False,
                                                                          False])
    valid = jnp.array([True, True, True, False, True, True, True])
    np.testing.assert_array_equal(P.zero_variance_group_mask(r, g, 4, valid)[2:4], [False, False])


def test_overlong_reward_penalty():
    got = P.overlong_reward_penalty(jnp.array([5, 6, 8, 10, 12]), max_length=10, buffer_length=4)
    np.testing.assert_allclose(got, [0, 0, -0.5, -1, -1], atol=1e-7)
    with pytest.raises(ConfigError, match="buffer_length=0"):
        P.overlong_reward_penalty(jnp.array([1]), 10, 0)


# ---------------------------------------------------------------------------------------------------- policy_loss


def test_mode_defaults_and_config_errors():
    assert P.PolicyLossConfig().resolve("dapo").eps_high == 0.28
    assert P.PolicyLossConfig().resolve("gspo").eps_low == 3e-4
    assert P.PolicyLossConfig().resolve("dr_grpo").aggregation == "seq-mean-token-sum-norm"
    assert P.PolicyLossConfig(ctpo_ratio="geomean").resolve("ctpo").ctpo_p == -0.5
    for kw, msg in [({"aggregation": "mean"}, "aggregation='mean'"), ({"kl_estimator": "k4"}, "k4"),
                    ({"dual_clip_c": 1.0}, "dual_clip_c=1.0"), ({"eps_low": 1.5}, "eps_low=1.5")]:
        with pytest.raises(ConfigError, match=msg):
            P.PolicyLossConfig(**kw)
    logp, old, adv, mask = _toy()
    with pytest.raises(ConfigError, match="'trpo'"):
        P.policy_loss("trpo", logp, old, adv, mask)


def test_loss_mode_registry_maps_the_flat_config_keys():
    """Every registered mode's args field is a flat config key (``f`` or ``key_prefix + f``) whose default is the
    args class's; mode_args maps the flat keys, None taking the mode default unless None means something."""
    flat = {f.name: f.default for f in dataclasses.fields(P.PolicyLossConfig)}
    for mode in P.LOSS_MODES.names():
        cls = P.LOSS_MODES.entry(mode).config_cls
        assert issubclass(cls, P.LossModeArgs), mode
        for f in dataclasses.fields(cls):
            key = f.name if f.name in P.SHARED_KEYS else cls.key_prefix + f.name
            assert key in flat, (mode, key)
            assert flat[key] is None or flat[key] == f.default, (mode, key)
    cfg = P.PolicyLossConfig(eps_low=0.1, dual_clip_c=None, cppo_delta=0.05, ctpo_ratio="geomean", appo_b=0.5)
    assert cfg.mode_args("cppo") == P.CPPOArgs(delta=0.05)
    assert cfg.mode_args("dapo") == P.DAPOArgs(eps_low=0.1, dual_clip_c=None)  # ε_high stays dapo's 0.28
    assert cfg.mode_args("appo") == P.APPOArgs(eps_low=0.1, dual_clip_c=None, b=0.5)
    assert cfg.mode_args("ctpo").exponent == -0.5 and cfg.mode_args("gspo") == P.GSPOArgs(eps_low=0.1)
    assert P.PolicyLossConfig().mode_args("dr_grpo").aggregation == "seq-mean-token-sum-norm"
    # keys of other modes are checked whichever mode runs; messages name the flat key
    for kw, msg in [({"cppo_w_min": 0.0}, "cppo_w_min=0.0"), ({"cppo_delta": 0.0}, "cppo_delta=0.0"),
                    ({"ctpo_ratio": "sum"}, "ctpo_ratio='sum'"), ({"cppo_divergence": "tv"}, "cppo_divergence='tv'"),
                    ({"eps_high": -0.1}, "eps_high=-0.1")]:
        with pytest.raises(ConfigError, match=msg):
            P.PolicyLossConfig(**kw)
    with pytest.raises(ConfigError, match="loss_mode='bnpo'.*token-mean"):
        P.PolicyLossConfig().mode_args("bnpo")


def test_grpo_and_dr_grpo_differ_from_ppo_only_by_aggregation():
    logp, old, adv, mask = _toy(seed=4)
    T = mask.shape[1]
    ratio = P.token_ratio(logp, old, mask)
    loss, _, _ = P.ppo_clip_loss(ratio, P.broadcast_advantages(adv, mask), 0.2, 0.2, 3.0)
    for mode, agg in (("ppo", "token-mean"), ("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")):
        np.testing.assert_allclose(_pl(mode, logp, old, adv, mask)[:2], P.aggregate(loss, mask, agg),
                                   rtol=1e-6, err_msg=mode)
    s, c, _ = _pl("dr_grpo", logp, old, adv, mask)
    assert float(c) == 3.0 and float(s) == pytest.approx(float(jnp.sum(loss * mask)) / T, rel=1e-6)


def test_diagnostics_buckets_and_ratio_stats():
    old = jnp.zeros((2, 4))
    logp = jnp.log(_arr([[1.0, 1.5, 1.0, 2.0], [0.5, 1.0, 9.0, 9.0]]))
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    cfg = P.PolicyLossConfig(num_position_buckets=2)
    _, _, d = _pl("ppo", logp, old, _arr([1.0, 1.0]), mask, cfg, entropy=jnp.full((2, 4), 0.7))
    # clipped (A>0, ρ>1.2): (0,1) at bucket 0, (0,3) at bucket 1
    np.testing.assert_allclose(d["token_count_by_bucket"], [4, 2])
    np.testing.assert_allclose(d["clip_count_by_bucket"], [1, 1])
    np.testing.assert_allclose(d["clip_frac_by_bucket"], [0.25, 0.5])
    assert float(d["clip_frac"]) == pytest.approx(2 / 6)
    assert float(d["ratio_min"]) == pytest.approx(0.5) and float(d["ratio_max"]) == pytest.approx(2.0)
    assert float(d["ratio_mean"]) == pytest.approx(7.0 / 6, rel=1e-6)
    assert float(d["approx_kl"]) == pytest.approx(-float(jnp.sum(logp * mask)) / 6, rel=1e-6)
    assert float(d["entropy"]) == pytest.approx(0.7, rel=1e-6)


@pytest.mark.parametrize("mode", ["grpo", "ctpo", "cppo", "appo"])  # seq-mean, cumsum, prefix budget, scan
def test_sharded_matches_single_device(mode):
    logp, old, adv, mask = _toy(B=8, T=4, seed=6)
    cfg = P.PolicyLossConfig(kl_coef=0.01)
    f = jax.jit(lambda lp, o, a, m, r: P.policy_loss(mode, lp, o, a, m, cfg, ref_logp=r)[:2])
    ref = old - 0.05
    plain = f(logp, old, adv, mask, ref)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    args = [jax.device_put(x, shard) for x in (logp, old, adv, mask, ref)]
    sharded = f(*args)
    np.testing.assert_allclose(sharded, plain, rtol=1e-5)
    assert np.isfinite(np.asarray(plain)).all() and float(plain[1]) > 0


@pytest.mark.parametrize("scale", ["bessel", "population"])
def test_zero_variance_groups_give_zero_advantage_without_eps(scale):
    """ε = 0: a zero-variance group (even one whose float mean is off by rounding, 0.1 × 3) gets A = 0, not NaN or
    ±tiny/tiny; other groups are (r − mean)/std exactly; a group of one keeps A = r."""
    r = _arr([0.1, 0.1, 0.1, 1, 0, 1, 7])
    g = jnp.array([0, 0, 0, 1, 1, 1, 2])
    a = np.asarray(P.group_advantages(r, g, 3, scale=scale, eps=0.0))
    ddof = 1 if scale == "bessel" else 0
    s = np.std([1.0, 0.0, 1.0], ddof=ddof)
    np.testing.assert_allclose(a, [0, 0, 0, (1 / 3) / s, -(2 / 3) / s, (1 / 3) / s, 7.0], rtol=1e-5)
    flat = P.batch_advantages(_arr([0.1, 0.1, 0.1]), jnp.ones(3, bool), scale=scale, eps=0.0)
    np.testing.assert_array_equal(np.asarray(flat), 0.0)
    np.testing.assert_array_equal(np.asarray(P.outcome_advantages("grpo", _arr([2.0, 2.0]), jnp.zeros(2, jnp.int32),
                                                                  1, eps=0.0)), 0.0)
