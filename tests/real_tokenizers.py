"""Real Qwen3 and Llama-3 tokenizer directories built offline (test support, not a test module).

The vocabularies (BPE ranks and special tokens) come from the ``quicktok-v1`` PyPI package; ``transformers``'
``TikTokenConverter`` turns ranks into a byte-level BPE ``tokenizer.json``; the side files are what the public
checkpoints ship: Qwen3's ``tokenizer_config.json`` (no bos, ``eos_token`` ``<|im_end|>``, pad ``<|endoftext|>``)
and ``generation_config.json`` (``eos_token_id`` [151645, 151643]); Meta-Llama-3-8B-Instruct's (bos
``<|begin_of_text|>``, ``eos_token`` ``<|end_of_text|>``; ``generation_config.json`` adds ``<|eot_id|>`` 128009).
Chat templates are in ``tests/fixtures/chat_templates/``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN3_VOCAB_SIZE = 151_936  # config.json vocab_size (embedding rows; ids past the tokenizer are padding)
LLAMA3_VOCAB_SIZE = 128_256
# Qwen3 marks these added tokens special=False (they stay in decoded text)
_QWEN_NON_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}


def _tokenizer_json(encoding: str, pattern: str, out: Path, non_special=frozenset(), bos: str | None = None) -> None:
    """Write ``out/tokenizer.json`` for a quicktok encoding: regular tokens by rank, special tokens after them."""
    import quicktok
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = quicktok.get_encoding(encoding)
    specials = sorted(enc.special_tokens_set, key=enc.encode_single_token)
    n_regular = enc.encode_single_token(specials[0])
    ranks = out / f"{encoding}.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(enc.decode_single_token_bytes(i)).decode()} {i}\n"
                             for i in range(n_regular)))
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    ranks.unlink()
    tok.add_tokens([AddedToken(s, special=s not in non_special, normalized=False) for s in specials])
    assert tok.token_to_id(specials[0]) == n_regular and tok.token_to_id(specials[-1]) == enc.max_token_value
    if bos is not None:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(out / "tokenizer.json"))


def _write(out: Path, name: str, obj) -> None:
    (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False))


def build_qwen3(out: str | Path) -> Path:
    """A Qwen3 tokenizer directory (the real 151,669-token vocabulary; chat template with the thinking switch)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _tokenizer_json("qwen3", QWEN_PATTERN, out, non_special=_QWEN_NON_SPECIAL)
    _write(out, "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "split_special_tokens": False,
        "model_max_length": 131072, "clean_up_tokenization_spaces": False, "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": (TEMPLATES / "qwen3.jinja").read_text()})
    _write(out, "generation_config.json", {"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                           "pad_token_id": 151643, "do_sample": True, "temperature": 0.6,
                                           "top_k": 20, "top_p": 0.95})
    return out


def build_llama3(out: str | Path) -> Path:
    """A Meta-Llama-3-8B-Instruct tokenizer directory (128,256 tokens; bos added by the post-processor)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _tokenizer_json("llama3", LLAMA3_PATTERN, out, bos="<|begin_of_text|>")
    _write(out, "tokenizer_config.json", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "model_max_length": 1000000000000000019884624838656,
        "clean_up_tokenization_spaces": True, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": (TEMPLATES / "llama3_instruct.jinja").read_text()})
    _write(out, "generation_config.json", {"bos_token_id": 128000, "eos_token_id": [128001, 128009]})
    return out
