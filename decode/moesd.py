"""MoESD's cost model of speculative decoding (SD) for sparse mixture-of-experts targets (Huang et al., NeurIPS 2025,
arXiv:2505.19645), as small pure functions.

The paper's argument. One SD round drafts γ tokens per row (γ draft forwards) and verifies them with one target
forward over γ+1 tokens per row; it emits σ tokens per row on average. Against autoregressive (AR) decoding,

    speedup(B, γ) = σ(α, γ) · T_T(B, 1) / (γ · T_D(B, 1) + T_T(B, γ+1)),   σ = (1 − α^{γ+1}) / (1 − α)      (1)

(Leviathan et al. 2023 for σ with a per-token acceptance rate α; MoESD's decomposition of the round time).
``T_T(B, 1) / T_T(B, γ+1)`` is what MoESD calls the **target efficiency**: how much more one verification costs
than one AR step. Speedup is σ times the target efficiency, shrunk by the draft's share.

A forward's time is a roofline over the weight bytes it reads and the FLOPs it does. A dense model reads all its
weights whatever the token count ``n = B·T``; an MoE layer reads only the experts some token was routed to. With
uniform top-k routing of ``n`` tokens over ``N`` experts the expected number of activated experts is

    E_act(n) = N · (1 − (1 − k/N)^n)                                                                      (2)

so at batch 1 verification (n = γ+1) reads several times more expert weights than an AR step (n = 1) and the
target efficiency of an MoE is poor; at medium batch sizes E_act(B) is already ≈ N, verification reads no extra
weights, and because each expert sees only ``n·k/N`` tokens the expert matmuls stay memory-bound to a much larger
``n`` than a dense model of the same active parameters (whose single MLP sees all ``n`` tokens): the MoE's
target efficiency stays near 1 over a wider range of B, which is the paper's "MoE benefits more from SD at medium
batch sizes". At large B both become compute-bound and the efficiency tends to ``1/(γ+1)``.

Time of one forward over ``n`` tokens (:func:`forward_time`): the non-expert part (attention projections, dense
MLPs, embeddings/LM head, router) ``max(bytes/BW, 2·params·n/peak)``, plus the expert part
``max(E_act(n)·expert_bytes/BW, 2·k·expert_params·n/peak)``, plus a fixed per-forward ``overhead`` (kernel
launches / dispatch; dominant for tiny models on a CPU). KV-cache reads and attention-score FLOPs are left out
(short contexts); so is load imbalance between experts (MoESD fits a correction factor for it on real GPUs).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from .spec_cost import expected_tokens_per_round  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Roofline of one accelerator: ``bandwidth`` bytes/s of weight reads, ``peak_flops`` FLOP/s of matmuls,
    ``overhead`` seconds per forward independent of its size."""

    name: str
    bandwidth: float
    peak_flops: float
    overhead: float = 0.0

    def __post_init__(self):
        if self.bandwidth <= 0 or self.peak_flops <= 0 or self.overhead < 0:
            raise ValueError(f"Hardware {self.name!r}: bandwidth and peak_flops must be > 0, overhead >= 0")


# published peak numbers (dense bf16 tensor-core FLOP/s, HBM bandwidth); no overhead term
HARDWARE = {
    "h100-sxm": Hardware("h100-sxm", bandwidth=3.35e12, peak_flops=989e12),
    "a100-80g": Hardware("a100-80g", bandwidth=2.04e12, peak_flops=312e12),
    "h200": Hardware("h200", bandwidth=4.8e12, peak_flops=989e12),
}


@dataclasses.dataclass(frozen=True)
class TargetShape:
    """What a forward reads and computes: ``dense_params`` parameters used by every token (attention, dense MLPs,
    router, LM head, shared experts), ``expert_params`` parameters of ONE routed expert summed over the sparse
    layers, ``num_experts`` N and ``top_k`` k per sparse layer (0 and 0 for a dense model), ``bytes_per_param``."""

    dense_params: float
    expert_params: float = 0.0
    num_experts: int = 0
    top_k: int = 0
    bytes_per_param: float = 2.0

    def __post_init__(self):
        if (self.num_experts == 0) != (self.top_k == 0) or not 0 <= self.top_k <= self.num_experts:
            raise ValueError(f"TargetShape: top_k={self.top_k} must be in 1..num_experts={self.num_experts} "
                             f"(both 0 for a dense model)")
        if self.num_experts == 0 and self.expert_params:
            raise ValueError("TargetShape: expert_params without experts")

    @property
    def active_params(self) -> float:
        """Parameters one token uses: dense part + k experts."""
        return self.dense_params + self.top_k * self.expert_params

    @property
    def total_params(self) -> float:
        return self.dense_params + self.num_experts * self.expert_params


def expected_active_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """MoESD eq. (2): expected number of distinct experts activated when ``tokens`` tokens each pick ``top_k`` of
    ``num_experts`` uniformly, ``N·(1 − (1 − k/N)^tokens)``. (Exact for one token's k distinct picks: k.)"""
    if num_experts == 0:
        return 0.0
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def roofline(bytes_read: float, flops: float, hw: Hardware) -> float:
    """Seconds of a kernel bounded by memory or compute: ``max(bytes / BW, flops / peak)``."""
    return max(bytes_read / hw.bandwidth, flops / hw.peak_flops)


def forward_time(shape: TargetShape, tokens: float, hw: Hardware, active_experts: Optional[float] = None) -> float:
    """Seconds of one forward over ``tokens`` tokens (B rows × T positions): the dense part's roofline plus the
    expert part's roofline (reading ``E_act(tokens)`` experts, or ``active_experts`` if given, e.g. a measured
    count) plus ``hw.overhead``. Every token does ``2·active_params`` FLOPs."""
    b = shape.bytes_per_param
    t = roofline(shape.dense_params * b, 2.0 * shape.dense_params * tokens, hw)
    if shape.num_experts:
        e = expected_active_experts(shape.num_experts, shape.top_k, tokens) if active_experts is None \
            else active_experts
        t += roofline(e * shape.expert_params * b, 2.0 * shape.top_k * shape.expert_params * tokens, hw)
    return t + hw.overhead


def target_efficiency(t_step: float, t_verify: float) -> float:
    """MoESD's target efficiency ``T_T(B, 1) / T_T(B, γ+1)``: 1 when verifying γ+1 tokens costs an AR step,
    ``1/(γ+1)`` when it costs γ+1 of them."""
    return t_step / t_verify


def sd_speedup(alpha: float, gamma: int, t_step: float, t_verify: float, t_draft: float) -> float:
    """Eq. (1): speedup of SD over AR with ``t_step`` = T_T(B, 1), ``t_verify`` = T_T(B, γ+1) and ``t_draft`` =
    T_D(B, 1): ``σ(α, γ) · t_step / (γ · t_draft + t_verify)``."""
    return expected_tokens_per_round(alpha, gamma) * t_step / (gamma * t_draft + t_verify)


def predicted_speedup(target: TargetShape, draft: TargetShape, batch: int, gamma: int, alpha: float,
                      hw: Hardware) -> dict:
    """Eq. (1) with every time from :func:`forward_time`: ``{speedup, target_efficiency, t_step, t_verify,
    t_draft, experts_step, experts_verify}`` at ``batch`` rows."""
    t_step = forward_time(target, batch, hw)
    t_verify = forward_time(target, batch * (gamma + 1), hw)
    t_draft = forward_time(draft, batch, hw)
    return {
        "speedup": sd_speedup(alpha, gamma, t_step, t_verify, t_draft),
        "target_efficiency": target_efficiency(t_step, t_verify),
        "t_step": t_step, "t_verify": t_verify, "t_draft": t_draft,
        "experts_step": expected_active_experts(target.num_experts, target.top_k, batch),
        "experts_verify": expected_active_experts(target.num_experts, target.top_k, batch * (gamma + 1)),
    }


def shape_of(cfg, bytes_per_param: Optional[float] = None) -> TargetShape:
    """A :class:`TargetShape` from a ``jaxtok.models.ModelConfig``: every non-expert parameter (embedding rows are
    gathered, not read whole, so the input embedding is excluded; a tied LM head still reads it) counts as dense;
    ``expert_params`` = ``3·D·F_moe`` per sparse layer; bytes from ``param_dtype`` unless given."""
    from jaxtok.models.flops import num_params

    D = cfg.hidden_size
    total = num_params(cfg, include_embedding=False)
    head = D * cfg.vocab_size  # the LM head (tied or not) is read by every forward
    sparse = sum(cfg.is_sparse_layer(i) for i in range(cfg.num_layers))
    per_expert = 3 * D * cfg.moe_intermediate_size * sparse if cfg.num_experts else 0
    dense = total - cfg.num_experts * per_expert + head
    b = bytes_per_param if bytes_per_param is not None else {"float32": 4, "bfloat16": 2, "float16": 2}[
        cfg.param_dtype]
    return TargetShape(dense_params=float(dense), expert_params=float(per_expert),
                       num_experts=cfg.num_experts if sparse else 0, top_k=cfg.num_experts_per_tok if sparse else 0,
                       bytes_per_param=float(b))


def dense_equivalent(shape: TargetShape) -> TargetShape:
    """The dense model with the same active parameters: one MLP of ``k`` experts' width (``k·expert_params``)."""
    return TargetShape(dense_params=shape.active_params, bytes_per_param=shape.bytes_per_param)


def speedup_curve(target: TargetShape, draft: TargetShape, batches: Sequence[int], gamma: int, alpha: float,
                  hw: Hardware) -> list[dict]:
    """:func:`predicted_speedup` at every batch size (rows with ``batch`` added)."""
    return [{"batch": int(b), **predicted_speedup(target, draft, int(b), gamma, alpha, hw)} for b in batches]


def best_batch_gain(moe_curve: Sequence[dict], dense_curve: Sequence[dict]) -> dict:
    """Where the MoE's predicted speedup exceeds the dense model's the most: ``{batch, ratio}`` with ratio =
    MoE speedup / dense speedup (``ratio`` < 1 everywhere means the paper's direction does not hold there)."""
    ratios = [(m["speedup"] / d["speedup"], m["batch"]) for m, d in zip(moe_curve, dense_curve)]
    r, b = max(ratios)
    return {"batch": b, "ratio": r}
