"""Model FLOPs per token, counted from the config the way MaxText does (``docs/reference/performance_metrics.md``).

Each matmul of an ``[m, k] x [k, n]`` costs ``2 m k n`` FLOPs forward; training costs 3x forward (backward = 2x).
Attention score and context matmuls are counted over the attended length, with causal attention at half
(the masked upper triangle is not useful work). Embedding lookups, norms and softmax are not counted.
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


def num_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Parameter count from the config (matches ``nnx.state(Decoder(cfg))`` exactly)."""
    D, F, H, K, N, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.vocab_size)
    attn = D * H * N + 2 * D * K * N + H * N * D
    if cfg.qkv_bias:
        attn += H * N + 2 * K * N
    if cfg.qk_norm:
        attn += 2 * N
    per_layer = attn + 3 * D * F + 2 * D
    total = cfg.num_layers * per_layer + D
    if include_embedding:
        total += V * D + (0 if cfg.tie_embeddings else D * V)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, attention: str = "causal") -> FlopsPerToken:
    """Forward model FLOPs per token at context ``seq_len`` (``causal`` attention counted at half)."""
    D, F, H, K, N, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.vocab_size, cfg.num_layers)
    qkvo = 2 * D * (H * N + 2 * K * N) + 2 * H * N * D
    mlp = 2 * 3 * D * F
    dense = L * (qkvo + mlp) + 2 * D * V
    attended = seq_len / 2 if attention == "causal" else seq_len
    attn = L * 2 * 2 * H * N * attended  # scores + context
    return FlopsPerToken(dense=float(dense), attention=float(attn))
