"""jaxtok.models: one Flax NNX decoder family (Llama-3, Qwen2/2.5, Qwen3 shapes), its KV cache, heads, presets,
FLOP counts and Hugging Face interop."""

from jaxtok.models import heads, presets, value
from jaxtok.models.cache import KVCache
from jaxtok.models.hf import convert, load_checkpoint, load_hf, save_checkpoint, save_hf
from jaxtok.models.flops import FlopsPerToken, flops_per_token, num_params
from jaxtok.models.transformer import (
    ATTENTION_KINDS,
    Decoder,
    DecoderOutput,
    ModelConfig,
    RopeScaling,
    check_token_ids,
)
from jaxtok.models.value import LengthValueModel
from jaxtok.tasks.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "ATTENTION_KINDS", "Decoder", "DecoderOutput", "FlopsPerToken", "KVCache", "LengthValueModel", "ModelConfig",
    "RopeScaling", "TextTokenizer",
    "check_token_ids", "convert", "heads", "flops_per_token", "load_checkpoint", "load_hf", "load_tokenizer", "num_params", "presets",
    "save_checkpoint", "save_hf", "value",
]
