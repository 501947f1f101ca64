"""Scaling laws for speculative decoding (Yan et al. 2025, "Scaling Laws for Speculative Decoding", arXiv:2505.07858;
their drafter is Scylla) as small pure functions: the log-linear fits and the γ choice they feed.

The paper's Theorems 1.1-1.3 state that the draft's acceptance rate grows log-linearly in the draft's pre-training
tokens D and in its capacity N (parameters), and that decoding speed varies log-linearly with batch size:
``α ≈ a + b · ln x`` along each axis (:func:`fit_log_linear`; jointly ``a + b ln N + c ln D``,
:func:`fit_log_linear_2d`). Acceptance is measured here as the per-draft rate α implied by the mean accepted length
at draft length γ (:func:`jaxtok.decode.spec_cost.alpha_from_accepted`, inverting Leviathan et al.'s ``E[accepted] = α(1 − α^γ) /
(1 − α)``), so runs at different γ give one α. With a draft/target cost ratio ``c`` the expected speedup of γ drafts
per round is ``σ(α, γ) / (1 + γ c)`` (:func:`speedup_model`); :func:`best_gamma` picks the γ that maximises it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .spec_cost import alpha_from_accepted, expected_tokens_per_round


def fit_log_linear(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least squares ``y = a + b · ln x`` -> ``{a, b, r2, n}`` (``r2`` = 1 − SS_res / SS_tot; 1.0 when y is
    constant and fitted exactly). Needs at least two distinct positive x."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x {x.shape} and y {y.shape}: two 1-D sequences of equal length")
    if np.any(x <= 0) or len(np.unique(x)) < 2:
        raise ValueError("x: needs positive values, at least two distinct")
    A = np.stack([np.ones_like(x), np.log(x)], axis=1)  # [n, 2]
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    return {"a": float(a), "b": float(b), "r2": _r2(y, A @ np.array([a, b])), "n": int(len(x))}


def fit_log_linear_2d(x1: Sequence[float], x2: Sequence[float], y: Sequence[float]) -> dict:
    """Least squares ``y = a + b · ln x1 + c · ln x2`` -> ``{a, b, c, r2, n}`` (e.g. x1 = draft parameters,
    x2 = training tokens)."""
    x1, x2, y = (np.asarray(v, np.float64) for v in (x1, x2, y))
    if not x1.shape == x2.shape == y.shape or x1.ndim != 1:
        raise ValueError("x1, x2, y: 1-D sequences of equal length")
    if np.any(x1 <= 0) or np.any(x2 <= 0):
        raise ValueError("x1, x2: positive values")
    A = np.stack([np.ones_like(x1), np.log(x1), np.log(x2)], axis=1)  # [n, 3]
    if np.linalg.matrix_rank(A) < 3:
        raise ValueError("x1, x2: need variation along both (and not collinear in log space)")
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]), "r2": _r2(y, A @ coef), "n": int(len(y))}


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    return 1.0 if ss_tot == 0.0 else 1.0 - ss_res / ss_tot


def predict_log_linear(fit: dict, x: float) -> float:
    """``a + b · ln x`` of a :func:`fit_log_linear` result."""
    return fit["a"] + fit["b"] * math.log(x)


def speedup_model(alpha: float, gamma: int, c: float) -> float:
    """Expected speedup over AR of γ drafts per round at draft/target cost ratio ``c`` (verification costing one
    target step): ``σ(α, γ) / (1 + γ c)`` (Leviathan et al. 2023, Thm 3.8)."""
    return expected_tokens_per_round(alpha, gamma) / (1.0 + gamma * c)


def best_gamma(alpha: float, c: float, gammas: Sequence[int]) -> int:
    """The γ of ``gammas`` with the largest :func:`speedup_model` (the smallest on ties)."""
    return max(sorted(int(g) for g in gammas), key=lambda g: (speedup_model(alpha, g, c), -g))
