"""The expected-tokens law of speculative decoding, shared by the draft-length policies, the MoESD cost model and the
scaling-law fits (pure Python, no JAX).

With i.i.d. per-draft acceptance α and γ drafts per round, a round emits the accepted prefix plus the target's own
token: ``σ(α, γ) = (1 − α^{γ+1}) / (1 − α)`` tokens (Leviathan et al. 2023, eq. 1), of which ``σ − 1`` are accepted
drafts.
"""

from __future__ import annotations


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """σ(α, γ) = (1 − α^{γ+1}) / (1 − α): expected tokens emitted per round (γ + 1 at α = 1, 1 at γ = 0)."""
    if not 0.0 <= alpha <= 1.0 or gamma < 0:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1] and gamma={gamma!r} >= 0")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def alpha_from_accepted(mean_accepted: float, gamma: int, iters: int = 60) -> float:
    """The per-draft acceptance α whose expected accepted drafts per round, ``σ(α, γ) − 1 = α(1 − α^γ)/(1 − α)``,
    equal ``mean_accepted`` (bisection: increasing in α from 0 to γ). Clamped: 0 if ``mean_accepted <= 0``, 1 if
    ``>= γ``. Turns a fixed-γ run's mean accepted length into one α comparable across γ."""
    if gamma < 1:
        raise ValueError(f"gamma={gamma!r}: allowed integers >= 1")
    if mean_accepted <= 0.0:
        return 0.0
    if mean_accepted >= gamma:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if expected_tokens_per_round(mid, gamma) - 1.0 < mean_accepted:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
