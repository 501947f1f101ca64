"""Model FLOPs per token, counted from the config the way MaxText does (``docs/reference/performance_metrics.md``).

Each matmul of an ``[m, k] x [k, n]`` costs ``2 m k n`` FLOPs forward; training costs 3x forward (backward = 2x).
Attention score and context matmuls are counted over the attended length, with causal attention at half
(the masked upper triangle is not useful work). Embedding lookups, norms and softmax are not counted.

Mixture of experts: a sparse layer costs its router (``2 D E``) and only the ``k`` experts a token is routed to
(``k · 2 · 3 D F_moe``), not all ``E``, plus a shared expert and its gate where the family has one (Qwen2-MoE);
:func:`num_params` counts all experts (``active=False``) or the parameters one token uses (``active=True``: the
router, ``k`` experts and the shared expert per sparse layer).
"""

from __future__ import annotations

import dataclasses

from jaxtok.models.transformer import ModelConfig


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token split into the dense matmuls and the attention (score + context) matmuls."""

    dense: float
    attention: float

    @property
    def forward(self) -> float:
        return self.dense + self.attention

    @property
    def train(self) -> float:
        return 3.0 * self.forward


def _mlp_params(cfg: ModelConfig, layer: int, active: bool) -> int:
    D = cfg.hidden_size
    if not cfg.is_sparse_layer(layer):
        return 3 * D * cfg.intermediate_size
    experts = cfg.num_experts_per_tok if active else cfg.num_experts
    shared = 3 * D * cfg.shared_expert_intermediate_size + D if cfg.shared_expert_intermediate_size else 0
    return D * cfg.num_experts + experts * 3 * D * cfg.moe_intermediate_size + shared  # router, experts, shared


def num_params(cfg: ModelConfig, include_embedding: bool = True, active: bool = False) -> int:
    """Parameter count from the config (matches ``nnx.state(Decoder(cfg))`` exactly); ``active``: only the
    parameters one token uses (MoE: the router and ``num_experts_per_tok`` experts of each sparse layer)."""
    D, F, H, K, N, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.vocab_size)
    attn = D * H * N + 2 * D * K * N + H * N * D
    if cfg.qkv_bias:
        attn += H * N + 2 * K * N
    if cfg.qk_norm:
        attn += 2 * N
    del F
    total = sum(attn + 2 * D + _mlp_params(cfg, i, active) for i in range(cfg.num_layers)) + D
    if include_embedding:
        total += V * D + (0 if cfg.tie_embeddings else D * V)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, attention: str = "causal") -> FlopsPerToken:
    """Forward model FLOPs per token at context ``seq_len`` (``causal`` attention counted at half; MoE layers
    count the router and the active experts only)."""
    D, F, H, K, N, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.vocab_size, cfg.num_layers)
    qkvo = 2 * D * (H * N + 2 * K * N) + 2 * H * N * D
    del F
    dense = L * qkvo + sum(2 * _mlp_params(cfg, i, active=True) for i in range(L)) + 2 * D * V
    attended = seq_len / 2 if attention == "causal" else seq_len
    attn = L * 2 * 2 * H * N * attended  # scores + context
    return FlopsPerToken(dense=float(dense), attention=float(attn))
