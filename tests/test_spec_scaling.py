"""Speculative-decoding scaling-law fits (decode/spec_scaling.py): exact recovery of log-linear laws, hand values,
the α inversion of the accepted length, and the γ choice in its limits. Pure NumPy, no compiles."""

import math

import numpy as np
import pytest

from jaxtok.decode import spec_scaling as s


def test_fit_recovers_an_exact_log_linear_law():
    x = [1e4, 3e4, 1e5, 1e6]
    y = [0.2 + 0.05 * math.log(v) for v in x]
    f = s.fit_log_linear(x, y)
    assert f["a"] == pytest.approx(0.2) and f["b"] == pytest.approx(0.05) and f["r2"] == pytest.approx(1.0)
    assert s.predict_log_linear(f, 1e7) == pytest.approx(0.2 + 0.05 * math.log(1e7))


def test_fit_hand_value_two_points_and_noise():
    # two points: the line through them; ln e = 1, ln e^3 = 3 -> b = (0.7 - 0.5) / 2 = 0.1, a = 0.4
    f = s.fit_log_linear([math.e, math.e**3], [0.5, 0.7])
    assert f["b"] == pytest.approx(0.1) and f["a"] == pytest.approx(0.4)
    # noise lowers r2 below 1; a flat y gives b = 0
    rng = np.random.default_rng(0)
    x = np.geomspace(10, 1e5, 12)
    noisy = s.fit_log_linear(x, 0.3 + 0.02 * np.log(x) + rng.normal(0, 0.02, x.shape))
    assert 0.0 < noisy["r2"] < 1.0 and noisy["b"] == pytest.approx(0.02, abs=0.01)
    flat = s.fit_log_linear([1, 2, 4], [0.5, 0.5, 0.5])
    assert flat["b"] == pytest.approx(0.0, abs=1e-12) and flat["r2"] == 1.0


def test_fit_2d_recovers_both_slopes():
    n = [1e5, 1e5, 1e6, 1e6, 3e6]
    d = [1e6, 1e7, 1e6, 1e7, 3e6]
    y = [0.1 + 0.03 * math.log(a) + 0.01 * math.log(b) for a, b in zip(n, d)]
    f = s.fit_log_linear_2d(n, d, y)
    assert (f["a"], f["b"], f["c"]) == pytest.approx((0.1, 0.03, 0.01)) and f["r2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="variation"):
        s.fit_log_linear_2d([1, 2, 4], [1, 1, 1], [0.1, 0.2, 0.3])


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        s.fit_log_linear([0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="distinct"):
        s.fit_log_linear([2, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        s.fit_log_linear([1, 2, 3], [0.1, 0.2])


def test_alpha_inversion():
    for alpha in (0.1, 0.5, 0.8, 0.95):
        for gamma in (1, 2, 4, 8):
            m = s.expected_tokens_per_round(alpha, gamma) - 1.0
            assert s.alpha_from_accepted(m, gamma) == pytest.approx(alpha, abs=1e-8)
    # γ = 1: E[accepted] = α exactly
    assert s.alpha_from_accepted(0.37, 1) == pytest.approx(0.37)
    assert s.alpha_from_accepted(0.0, 4) == 0.0 and s.alpha_from_accepted(4.0, 4) == 1.0


def test_speedup_and_best_gamma_limits():
    # free drafts, perfect acceptance: longer is always better
    assert s.best_gamma(1.0, 0.0, [1, 2, 4, 8]) == 8
    # nothing is ever accepted: every draft is wasted -> the shortest
    assert s.best_gamma(0.0, 0.1, [1, 2, 4, 8]) == 1
    # hand value: α = 0.5, γ = 2, c = 0.25 -> 1.75 / 1.5
    assert s.speedup_model(0.5, 2, 0.25) == pytest.approx(1.75 / 1.5)
    # α = 0.8, c = 0.05: σ/(1+γc) = 1.8/1.05, 2.44/1.1, 3.3616/1.2, 4.3289/1.4 -> γ = 8
    assert s.best_gamma(0.8, 0.05, [1, 2, 4, 8]) == 8
    # the same α with an expensive draft (c = 0.5) -> γ = 2 (2.44/2 = 1.22 beats 1.8/1.5 and 3.36/3)
    assert s.best_gamma(0.8, 0.5, [1, 2, 4, 8]) == 2
