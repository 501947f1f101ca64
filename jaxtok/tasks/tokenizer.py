"""One tokenizer path: Hugging Face ``tokenizers`` everywhere.

The synthetic tasks use a small character-level WordLevel tokenizer built here and saved as ``tokenizer.json``; a
real model's ``tokenizer.json`` loads through the same :func:`load_tokenizer`, so nothing downstream special-cases
the toy setting.
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path
from typing import Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

NUM_RAINBOW_PADS = 7
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<mask>"] + [f"<pad_{i}>" for i in range(1, NUM_RAINBOW_PADS + 1)]
CHARACTERS = list(string.digits) + list("+-*/=(),;:>| \n") + list(string.ascii_lowercase)
VOCAB = SPECIAL_TOKENS + CHARACTERS
VOCAB_SIZE = len(VOCAB)  # 61


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens of a tokenizer (``None`` where it has no such token)."""

    pad: int
    bos: Optional[int]
    eos: int
    mask: Optional[int]
    rainbow_pads: tuple[int, ...] = ()

    @classmethod
    def of(cls, tok: Tokenizer) -> "SpecialTokens":
        def tid(*names):
            for n in names:
                i = tok.token_to_id(n)
                if i is not None:
                    return i
            return None

        eos = tid("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
        if eos is None:
            raise ValueError("tokenizer has no recognised end-of-sequence token (<eos>, </s>, <|endoftext|>, ...)")
        pad = tid("<pad>", "<|pad|>", "[PAD]")
        pads = tuple(i for i in (tid(f"<pad_{k}>") for k in range(1, NUM_RAINBOW_PADS + 1)) if i is not None)
        return cls(pad=eos if pad is None else pad, bos=tid("<bos>", "<s>", "<|begin_of_text|>"), eos=eos,
                   mask=tid("<mask>", "<|mask|>", "[MASK]"), rainbow_pads=pads)


def build_tokenizer() -> Tokenizer:
    """The character-level tokenizer of the synthetic tasks: specials at ids 0..10, then one id per character."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json`` into directory ``path`` (or to ``path`` if it ends in .json)."""
    path = Path(path)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "tokenizer.json"
    tok.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` file or a directory holding one (the synthetic one or a real model's)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {str(path)!r}")
    return Tokenizer.from_file(str(path))


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special-token post-processing.

    Characters the tokenizer cannot represent raise instead of silently becoming its unknown token (the
    character tokenizer's unknown token is ``<pad>``, so an unknown character would otherwise vanish as padding).
    """
    enc = tok.encode(text, add_special_tokens=False)
    unk = getattr(tok.model, "unk_token", None)
    unk_id = tok.token_to_id(unk) if unk else None
    if unk_id is not None and unk_id in enc.ids:
        bad = sorted({text[s:e] for i, (s, e) in zip(enc.ids, enc.offsets) if i == unk_id and text[s:e] != unk})
        if bad:
            raise ValueError(f"text {text[:60]!r} has characters the tokenizer does not know: {bad} "
                             f"(unknown token {unk!r}); the character tokenizer covers {''.join(CHARACTERS)!r}")
    return enc.ids


def decode(tok: Tokenizer, ids, stop_at_eos: bool = True) -> str:
    """Text of ``ids`` (special tokens removed); stops at the first end-of-sequence token."""
    ids = [int(i) for i in ids]
    if stop_at_eos:
        eos = SpecialTokens.of(tok).eos
        if eos in ids:
            ids = ids[: ids.index(eos)]
    return tok.decode(ids, skip_special_tokens=True)
