"""The batch-size-aware draft-length policy (``batch_gamma``) and its cost model: hand-computed values and limits.
Pure Python/NumPy math plus one tiny jitted ``round_gamma``; no model is built."""

import math

import jax.numpy as jnp
import pytest

from jaxtok.decode import draft_policies as dp
from jaxtok.registry import ConfigError


def test_expected_tokens_per_round_hand_values_and_limits():
    # α = 0.5, γ = 2: 1 + 0.5 + 0.25 = 1.75 = (1 - 0.5^3) / 0.5
    assert dp.expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert dp.expected_tokens_per_round(1.0, 4) == 5.0  # every draft accepted: γ + 1
    assert dp.expected_tokens_per_round(0.0, 4) == 1.0  # nothing accepted: the target's own token
    assert dp.expected_tokens_per_round(0.9, 0) == 1.0  # γ = 0 is an AR step


@pytest.mark.parametrize("alpha,gamma", [(0.3, 1), (0.5, 2), (0.8, 4), (0.95, 8)])
def test_alpha_from_accepted_inverts_the_expectation(alpha, gamma):
    mean_accepted = dp.expected_tokens_per_round(alpha, gamma) - 1.0
    assert dp.alpha_from_accepted(mean_accepted, gamma) == pytest.approx(alpha, abs=1e-6)


def test_alpha_from_accepted_clamps():
    assert dp.alpha_from_accepted(0.0, 4) == 0.0
    assert dp.alpha_from_accepted(4.0, 4) == 1.0
    with pytest.raises(ValueError, match="gamma"):
        dp.alpha_from_accepted(1.0, 0)


def test_interp_log_batch():
    # halfway between batch 1 and 4 in log2 is batch 2
    assert dp.interp_log_batch(2, (1, 4), (0.0, 1.0)) == pytest.approx(0.5)
    assert dp.interp_log_batch(1, (1, 4), (0.0, 1.0)) == 0.0
    assert dp.interp_log_batch(64, (1, 4), (0.0, 1.0)) == 1.0  # clamped outside the calibrated range
    assert dp.interp_log_batch(8, (4,), (3.0,)) == 3.0


def test_batch_gamma_speedup_hand_value():
    # α = 0.5, γ = 2: 1.75 tokens per round / (1 + 0.1·2 + 0.2·2 + 0.4) = 1.75 / 2.0
    assert dp.batch_gamma_speedup(2, 0.5, c=0.2, k=0.1, overhead=0.4) == pytest.approx(0.875)
    assert dp.batch_gamma_speedup(0, 0.5, c=5.0, k=5.0, overhead=5.0) == 1.0


def test_batch_gamma_picks_long_drafts_when_cheap_and_ar_when_not():
    args = dp.BatchGammaArgs(batch_sizes=(1, 64), acceptance=(0.9,), draft_cost=(0.05, 0.5),
                             verify_cost=(0.0, 0.9), round_overhead=(0.1, 0.5), candidates=(0, 2, 4, 6, 8))
    g1, scores1 = dp.batch_gamma_choice(args, 1)
    # batch 1: speedup(γ) = E(0.9, γ) / (1.1 + 0.05γ); γ = 8 maximises it among {2, 4, 6, 8}
    expect = {g: dp.expected_tokens_per_round(0.9, g) / (1.1 + 0.05 * g) for g in (2, 4, 6, 8)}
    assert g1 == max(expect, key=expect.get) == 8
    assert scores1[8] == pytest.approx(expect[8])
    # batch 64: verification and drafts cost as much as the tokens they save -> plain AR
    g64, scores64 = dp.batch_gamma_choice(args, 64)
    assert g64 == 0 and all(v < 1.0 for g, v in scores64.items() if g > 0)


def test_batch_gamma_ties_go_to_ar():
    # acceptance 0: every γ yields 1 token per round at a cost > 1 step; with zero costs γ ties AR -> AR
    args = dp.BatchGammaArgs(acceptance=(0.0,), draft_cost=(0.0,), verify_cost=(0.0,), round_overhead=(0.0,))
    assert dp.batch_gamma_choice(args, 1)[0] == 0


def test_batch_gamma_policy_round_gamma_and_registry():
    pol = dp.build_policy("batch_gamma", {"batch_sizes": [1, 64], "acceptance": [0.9], "draft_cost": [0.05, 0.5],
                                          "verify_cost": [0.0, 0.9], "round_overhead": [0.1, 0.5]})
    assert pol.gamma_for(1) == 8 and pol.gamma_for(64) == 0
    g = pol.round_gamma(pol.init(3, 4), 4, 3)  # capped by the loop's draft_len
    assert g.dtype == jnp.int32 and g.tolist() == [4, 4, 4]


@pytest.mark.parametrize("bad,match", [
    ({"batch_sizes": [4, 1]}, "batch_sizes"),
    ({"batch_sizes": [1, 4], "draft_cost": [0.1, 0.2, 0.3]}, "draft_cost"),
    ({"acceptance": [1.5]}, "acceptance"),
    ({"candidates": [-1, 2]}, "candidates"),
    ({"round_overhead": [-1.0]}, "round_overhead"),
    ({"draft_cost": [-0.1]}, "draft_cost"),
])
def test_batch_gamma_args_errors_name_the_key(bad, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        dp.build_policy("batch_gamma", bad)


def test_model_matches_leviathan_closed_form():
    # Leviathan et al. 2023 (eq. for the walltime improvement with verification cost 1): (1-α^{γ+1})/((1-α)(γc+1))
    a, g, c = 0.8, 5, 0.05
    closed = (1 - a ** (g + 1)) / ((1 - a) * (g * c + 1))
    assert dp.batch_gamma_speedup(g, a, c=c, k=0.0, overhead=0.0) == pytest.approx(closed)
    assert math.isclose(dp.expected_tokens_per_round(a, g), sum(a ** i for i in range(g + 1)))


def _spec_membound():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "spec_membound.py"
    spec = importlib.util.spec_from_file_location("_spec_membound", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spec_membound_chi2_homogeneity_and_bracketed_ratios():
    import numpy as np

    mod = _spec_membound()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, (600, 2))
    b = rng.integers(0, 3, (600, 2))
    p_same, cells = mod.chi2_homogeneity(a, b)
    assert cells == 9 and p_same > 1e-3  # two samples of one law (9 tuples, all frequent)
    p_diff, _ = mod.chi2_homogeneity(a, np.zeros_like(b))  # a point mass against a uniform law
    assert p_diff < 1e-10
    assert mod.chi2_homogeneity(np.zeros((5, 2), int), np.zeros((5, 2), int))[0] == 1.0  # one cell: no evidence
    # method 30 tok/s between AR passes of 10 and 20 tok/s -> 2x
    assert mod.bracket_ratios([30.0], [10.0], [20.0]) == [2.0]
