"""Data pipelines on grain: SFT batches and prompt batches from synthetic tasks or local JSONL/Parquet files.

Padding. SFT rows are ``<bos> prompt target <eos>`` RIGHT-padded to ``seq_len``; ``loss_mask`` marks the target and
``<eos>`` tokens (token t is predicted from position t-1). Prompt rows for rollouts and eval are LEFT-padded to
``prompt_len`` so every row's last prompt token sits at the same index and generation appends in lock-step; the
model derives positions from ``valid`` (``cumsum(valid) - 1``), so padding never shifts RoPE positions.

Packing is not performed: one example per row. Packed rows would need per-segment attention masks and position
resets in every objective and sampler; for the short synthetic sequences the padding waste is small and rows stay
independent (which the per-row selection rules and rewards assume).

Nothing is truncated silently: an over-long example is dropped (``overlong="drop"``, counted and reported once
per pipeline) or raises (``overlong="error"``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import grain
import numpy as np

from jaxtok.tasks.base import Example, extract_after_mark
from jaxtok.tasks.tokenizer import SpecialTokens, encode

log = logging.getLogger(__name__)


class OverlongError(ValueError):
    """An example longer than the configured length with ``overlong="error"``."""


@dataclasses.dataclass
class DropCounter:
    """Thread-safe count of dropped over-long examples, reported once."""

    what: str
    limit: int
    count: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    _warned: bool = False

    def drop(self, index: int, length: int) -> None:
        with self._lock:
            self.count += 1
            if not self._warned:
                self._warned = True
                log.warning("dropping over-long %s examples (first: index %d, %d tokens > %d); see .count",
                            self.what, index, length, self.limit)


def encode_sft(tok, example: Example, seq_len: int, *, index: int = -1, overlong: str = "drop") -> Optional[dict]:
    """``<bos> prompt target <eos>`` right-padded to ``seq_len`` → tokens/positions/valid/loss_mask ``[T]``.

    Returns None for an over-long example with ``overlong="drop"``; raises :class:`OverlongError` with "error".
    """
    sp = SpecialTokens.of(tok)
    prompt = ([sp.bos] if sp.bos is not None else []) + encode(tok, example.prompt)
    target = encode(tok, example.target) + [sp.eos]
    ids = prompt + target
    if len(ids) > seq_len:
        if overlong == "error":
            raise OverlongError(f"example {index}: {len(ids)} tokens > data.seq_len={seq_len} "
                                f"(raise data.seq_len or set data.overlong=drop)")
        return None
    n = len(ids)
    tokens = np.full((seq_len,), sp.pad, np.int32)
    tokens[:n] = ids
    valid = np.arange(seq_len) < n
    loss_mask = np.zeros((seq_len,), bool)
    loss_mask[len(prompt):n] = True
    return {"tokens": tokens, "positions": np.maximum(np.cumsum(valid) - 1, 0).astype(np.int32),
            "valid": valid, "loss_mask": loss_mask}


def encode_prompt(tok, example: Example, prompt_len: int, *, index: int = -1, overlong: str = "drop") -> Optional[dict]:
    """``<bos> prompt`` LEFT-padded to ``prompt_len`` → ``prompt [P]``, ``prompt_valid [P]``."""
    sp = SpecialTokens.of(tok)
    ids = ([sp.bos] if sp.bos is not None else []) + encode(tok, example.prompt)
    if len(ids) > prompt_len:
        if overlong == "error":
            raise OverlongError(f"prompt {index}: {len(ids)} tokens > data.prompt_len={prompt_len}")
        return None
    prompt = np.full((prompt_len,), sp.pad, np.int32)
    prompt[prompt_len - len(ids):] = ids
    return {"prompt": prompt, "prompt_valid": np.arange(prompt_len) >= prompt_len - len(ids),
            "index": np.int32(index)}


# ----------------------------------------------------------------------------------------------------------------
# Example sources
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileTask:
    """A local JSONL/Parquet prompt dataset with a field mapping; exact-match reward on the answer field."""

    records: tuple
    prompt_field: str
    answer_field: str
    target_field: Optional[str]
    name: str = "file"

    @classmethod
    def load(cls, path: str, kind: str, prompt_field="prompt", answer_field="answer", target_field=None) -> "FileTask":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"data.path={path!r} does not exist")
        if kind == "jsonl":
            rows = []
            for i, line in enumerate(p.read_text().splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
        elif kind == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from None
            rows = pq.read_table(str(p)).to_pylist()
        else:
            raise ValueError(f"data.task={kind!r}: file datasets are 'jsonl' or 'parquet'")
        for i, r in enumerate(rows):
            for f in (prompt_field, answer_field) + ((target_field,) if target_field else ()):
                if f not in r:
                    raise KeyError(f"{path}: record {i} has no field {f!r} (fields: {sorted(r)}); "
                                   f"set data.prompt_field / data.answer_field")
        return cls(tuple(rows), prompt_field, answer_field, target_field)

    def __len__(self) -> int:
        return len(self.records)

    def example(self, split: str, index: int) -> Example:
        r = self.records[index % len(self.records)]
        answer = str(r[self.answer_field])
        target = str(r[self.target_field]) if self.target_field else f">{answer}"
        return Example(prompt=str(r[self.prompt_field]), target=target, answer=answer, meta=r)

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_after_mark(completion) if ">" in completion else completion.strip() or None

    def reward(self, completion: str, example: Example) -> float:
        return float(self.extract_answer(completion) == example.answer)

    def format_ok(self, completion: str) -> bool:
        return self.extract_answer(completion) is not None


# ----------------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------------


def _check_some_fit(encode_fn, num_examples: int, key: str, limit: int, probe: int = 64) -> None:
    """Fail fast (instead of filtering forever) when none of the first ``probe`` examples fits."""
    n = min(num_examples, probe)
    if n and all(encode_fn(i) is None for i in range(n)):
        raise OverlongError(f"none of the first {n} examples fits {key}={limit}; raise {key}")


def _batched(ds: grain.MapDataset, encode_fn, batch_size: int, drop_remainder: bool) -> grain.IterDataset:
    return (ds.map(encode_fn).to_iter_dataset().filter(lambda x: x is not None)
            .batch(batch_size, drop_remainder=drop_remainder))


def sft_dataset(task, split: str, tok, *, seq_len: int, batch_size: int, num_examples: int, seed: int = 0,
                shuffle: bool = True, num_epochs: Optional[int] = None, overlong: str = "drop",
                worker_count: int = 0) -> tuple[grain.IterDataset, DropCounter]:
    """Batches ``{tokens, positions, valid, loss_mask}`` of shape ``[batch_size, seq_len]`` from ``task``.

    Deterministic in ``seed``; the iterator's ``get_state()/set_state()`` resume it exactly. Returns the dataset
    and the counter of dropped over-long examples.
    """
    counter = DropCounter("SFT", seq_len)
    _check_some_fit(lambda i: encode_sft(tok, task.example(split, i), seq_len), num_examples, "data.seq_len", seq_len)

    def enc(i):
        out = encode_sft(tok, task.example(split, int(i)), seq_len, index=int(i), overlong=overlong)
        if out is None:
            counter.drop(int(i), seq_len + 1)
        return out

    ds = grain.MapDataset.range(num_examples)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    out = _batched(ds, enc, batch_size, drop_remainder=True)
    if worker_count:
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out, counter


def prompt_dataset(task, split: str, tok, *, prompt_len: int, batch_size: int, num_examples: int,
                   overlong: str = "drop") -> tuple[grain.IterDataset, DropCounter]:
    """Left-padded prompt batches ``{prompt [B,P], prompt_valid [B,P], index [B]}``; ``index`` recovers each row's
    :class:`Example` with ``task.example(split, index)`` (strings cannot travel in arrays)."""
    counter = DropCounter("prompt", prompt_len)
    _check_some_fit(lambda i: encode_prompt(tok, task.example(split, i), prompt_len), num_examples,
                    "data.prompt_len", prompt_len)

    def enc(i):
        out = encode_prompt(tok, task.example(split, int(i)), prompt_len, index=int(i), overlong=overlong)
        if out is None:
            counter.drop(int(i), prompt_len + 1)
        return out

    return _batched(grain.MapDataset.range(num_examples), enc, batch_size, drop_remainder=False), counter


def make_task_from_config(section):
    """The task named by a ``DataSection`` (a synthetic task or a JSONL/Parquet file)."""
    if section.task in ("jsonl", "parquet"):
        return FileTask.load(section.path, section.task, section.prompt_field, section.answer_field,
                             section.target_field)
    from jaxtok.tasks import make_task

    return make_task(section.task, section.task_args, section.seed)


def eval_examples(task, split: str, n: int) -> list[Example]:
    """The first ``n`` examples of ``split`` (wrapping for file datasets)."""
    return [task.example(split, i) for i in range(n)]


def stack(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stack per-example dicts into a batch."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
