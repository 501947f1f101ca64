"""Build the tiny Hugging Face parity fixtures under tests/fixtures/hf/<family>/.

For each family (Llama with llama3 RoPE scaling, untied; Qwen2 with q/k/v bias, tied; Qwen3 with q/k norm, explicit
head_dim, untied, saved as sharded safetensors with an index) this builds a random ``transformers`` model on CPU in
float32, rounds every weight to a bfloat16-representable value (so the checkpoint can be stored in bfloat16 and stay
small while the float32 goldens stay exact), saves it, and records golden logits from the eager float32 forward on
random tokens:

- ``logits_full``: every position valid, positions ``0..T-1``;
- ``logits_padded``: rows left-padded, ``attention_mask`` + ``position_ids = cumsum(mask) - 1`` as HF ``generate``
  builds them (padding positions hold HF's placeholder 1; only valid positions are compared).

Run from the repo root: ``python scripts/make_hf_fixtures.py`` (needs torch and transformers). The functions are
also used by tests/test_hf.py for the live parity tests.
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")
BATCH, LENGTH = 3, 10
PADS = (0, 3, 6)  # left padding per row

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
FAMILIES = {
    "llama": dict(cls="LlamaForCausalLM", rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16}),
    "qwen2": dict(cls="Qwen2ForCausalLM", rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen3": dict(cls="Qwen3ForCausalLM", rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  head_dim=32),
}


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random float32 ``transformers`` model of ``family`` with O(1) logits: every weight (biases and norm scales
    included) is drawn from a seeded normal and rounded to bfloat16-representable values."""
    import torch
    import transformers

    spec = {**COMMON, **FAMILIES[family], **overrides}
    cls = getattr(transformers, spec.pop("cls"))
    rope = {"rope_type": "default"}
    if "rope_scaling" in spec:
        rope = dict(spec.pop("rope_scaling"))
    rope["rope_theta"] = spec.pop("rope_theta")
    config = cls.config_class(rope_parameters=rope, **spec)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith("bias"):
                value = 0.2 * noise
            else:
                value = noise * p.shape[-1] ** -0.5  # [out, in]: unit-variance outputs
            p.copy_(value.to(torch.bfloat16).to(torch.float32))
    model.config._attn_implementation = "eager"
    return model


def random_batch(vocab: int, seed: int = 0, pads=PADS, length: int = LENGTH):
    """``tokens [B, T]`` int32, left-padding ``valid [B, T]`` bool and HF-style ``positions [B, T]`` int32."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(len(pads), length)).astype(np.int32)
    valid = np.arange(length)[None, :] >= np.asarray(pads)[:, None]
    positions = np.where(valid, np.cumsum(valid, axis=1) - 1, 1).astype(np.int32)
    return tokens, valid, positions


def hf_logits(model, tokens, valid=None, positions=None, bidirectional=False) -> np.ndarray:
    """Eager float32 logits ``[B, T, V]`` of a ``transformers`` model.

    ``bidirectional``: pass a 4D additive mask where every query sees every valid key (LLaDA/Dream attention).
    """
    import torch

    B, T = tokens.shape
    valid = np.ones((B, T), bool) if valid is None else valid
    positions = np.broadcast_to(np.arange(T), (B, T)) if positions is None else positions
    if bidirectional:
        mask = torch.zeros(B, 1, T, T)
        mask.masked_fill_(~torch.as_tensor(valid)[:, None, None, :], torch.finfo(torch.float32).min)
    else:
        mask = torch.as_tensor(valid.astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens.astype(np.int64)), attention_mask=mask,
                    position_ids=torch.as_tensor(np.array(positions, np.int64)), use_cache=False)
    return out.logits.to(torch.float32).numpy()


def make_fixture(family: str, root: str = ROOT) -> str:
    import torch

    model = build_hf_model(family, seed=len(family))
    tokens, valid, positions = random_batch(model.config.vocab_size, seed=len(family))
    full = hf_logits(model, tokens)
    padded = hf_logits(model, tokens, valid, positions)
    out = os.path.join(root, family)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    shard = "150KB" if family == "qwen3" else None  # one family exercises the sharded index
    model.to(torch.bfloat16).save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    np.savez_compressed(os.path.join(out, "goldens.npz"), tokens=tokens, valid=valid, positions=positions,
                        logits_full=full, logits_padded=padded)
    return out


def main(argv=None) -> int:
    families = (argv if argv is not None else sys.argv[1:]) or list(FAMILIES)
    for family in families:
        out = make_fixture(family)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{family}: {out} ({size / 1024:.0f} KiB: {sorted(os.listdir(out))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
