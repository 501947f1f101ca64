"""Model presets: the tiny zoo shapes trained on the synthetic tasks, and real shapes (no weights) so shardings,
memory and FLOPs can be computed for Qwen3, Qwen2.5, Llama-3.2 and the mixture-of-experts Qwen3-30B-A3B,
Mixtral-8x7B and Qwen1.5-MoE-A2.7B (Qwen2-MoE, with a shared expert) (``tiny_moe`` is a tiny Qwen3-MoE for tests).

Real shapes follow the published HF ``config.json`` files of those checkpoints.
"""

from __future__ import annotations

import dataclasses

from jaxtok.models.transformer import ModelConfig, RopeScaling

_LLAMA32_ROPE = RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)


def _qwen3(d, f, layers, heads, kv, tie, vocab=151936):
    return ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=tie,
                       qk_norm=True, max_position_embeddings=40960, architecture="qwen3")


def _qwen25(d, f, layers, heads, kv, tie, vocab=151936):
    return ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv, head_dim=d // heads, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       tie_embeddings=tie, qkv_bias=True, max_position_embeddings=32768, architecture="qwen2")


def _llama32(d, f, layers, heads, kv):
    return ModelConfig(vocab_size=128256, hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv, head_dim=d // heads, rope_theta=500_000.0, rope_scaling=_LLAMA32_ROPE,
                       rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=131072, architecture="llama")


def _qwen3_moe(d, f, moe_f, layers, heads, kv, experts, k, vocab=151936):
    return dataclasses.replace(_qwen3(d, f, layers, heads, kv, False, vocab), architecture="qwen3_moe",
                               num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=moe_f,
                               norm_topk_prob=True, router_aux_loss_coef=0.001)


def _mixtral(d, f, layers, heads, kv, experts, k):
    return ModelConfig(vocab_size=32000, hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv, head_dim=d // heads, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
                       tie_embeddings=False, max_position_embeddings=32768, architecture="mixtral",
                       num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=f, norm_topk_prob=True,
                       router_aux_loss_coef=0.02)


def _qwen15_moe(d, f, moe_f, shared_f, layers, heads, experts, k):
    return ModelConfig(vocab_size=151936, hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, head_dim=d // heads, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       tie_embeddings=False, qkv_bias=True, max_position_embeddings=8192, architecture="qwen2_moe",
                       num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=moe_f,
                       shared_expert_intermediate_size=shared_f, norm_topk_prob=False, router_aux_loss_coef=0.001)


def _tiny(d, f, layers, heads, kv, **kw):
    return ModelConfig(vocab_size=64, hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv, head_dim=d // heads, rope_theta=10000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=512, architecture="qwen3", qk_norm=True, **kw)


PRESETS: dict[str, ModelConfig] = {
    # tiny zoo (vocab is overridden by the task tokenizer's size)
    "tiny_teacher": _tiny(192, 512, 4, 6, 2),
    "tiny_student": _tiny(96, 256, 2, 4, 2),
    "tiny_draft": _tiny(48, 128, 1, 2, 1),
    "tiny_diffusion": _tiny(128, 384, 3, 4, 2, mask_token_id=3),
    # ~25M parameters (~100 MB in float32): the CPU benchmarks' model that does not fit in the caches
    "small": _tiny(512, 1536, 8, 8, 4),
    # a tiny Qwen3-MoE: 8 experts of width 32, top-2, 2 layers (tests, MoE speculative-decoding experiments)
    "tiny_moe": dataclasses.replace(_tiny(64, 128, 2, 4, 2), architecture="qwen3_moe", num_experts=8,
                                    num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    # real shapes
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, False),
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, True),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, False, vocab=152064),
    "llama-3.2-1b": _llama32(2048, 8192, 16, 32, 8),
    "llama-3.2-3b": _llama32(3072, 8192, 28, 24, 8),
    "qwen3-30b-a3b": _qwen3_moe(2048, 6144, 768, 48, 32, 4, 128, 8),
    "mixtral-8x7b": _mixtral(4096, 14336, 32, 32, 8, 8, 2),
    "qwen1.5-moe-a2.7b": _qwen15_moe(2048, 5632, 1408, 5632, 24, 16, 60, 4),
}


def get(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with dataclass field ``overrides`` (e.g. ``vocab_size=64``, ``dtype="bfloat16"``)."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; allowed: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown} for preset {name!r}; allowed: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def names() -> list[str]:
    return sorted(PRESETS)
