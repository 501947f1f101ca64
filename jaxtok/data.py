"""Data pipelines on grain: SFT batches and prompt batches from synthetic tasks or local JSONL/Parquet files.

Padding. SFT rows are ``<bos> prompt target <eos>`` RIGHT-padded to ``seq_len``; ``loss_mask`` marks the target and
``<eos>`` tokens (token t is predicted from position t-1). Prompt rows for rollouts and eval are LEFT-padded to
``prompt_len`` so every row's last prompt token sits at the same index and generation appends in lock-step; the
model derives positions from ``valid`` (``cumsum(valid) - 1``), so padding never shifts RoPE positions.

Packing is not performed: one example per row. Packed rows would need per-segment attention masks and position
resets in every objective and sampler; for the short synthetic sequences the padding waste is small and rows stay
independent (which the per-row selection rules and rewards assume).

Nothing is truncated silently: an over-long example is dropped (``overlong="drop"``: the pipeline probes its first
examples and warns once with how many of them are too long, and its :class:`DropCounter` counts every drop) or
raises naming the example index, its length and the limit (``overlong="error"``). With ``worker_count > 0`` the
drops happen in worker processes, so the parent's counter stays at 0; the upfront warning still fires.

Splits. Synthetic tasks have disjoint train/eval splits (by a hash of the canonical problem). A JSONL/Parquet file
is one split: :class:`FileTask` serves the same records for any split name, so point eval at a separate file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np

from jaxtok.tasks.base import Example, extract_after_mark
from jaxtok.tasks.tokenizer import SpecialTokens, encode

log = logging.getLogger(__name__)


OVERLONG = ("drop", "error")


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

    def __getstate__(self):  # grain worker processes receive a copy (their drops are not seen by the parent)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def drop(self, index: int, length: int) -> None:
        with self._lock:
            self.count += 1
            log.debug("dropped over-long %s example %d (%d tokens > %d)", self.what, index, length, self.limit)

    def warn(self, dropped: int, probed: int, first: tuple[int, int]) -> None:
        """Warn once per pipeline with the count of over-long examples among the first ``probed``."""
        with self._lock:
            if self._warned:
                return
            self._warned = True
        log.warning("dropping over-long %s examples: %d of the first %d exceed %d tokens (first: index %d, %d "
                    "tokens); the pipeline's DropCounter counts all drops", self.what, dropped, probed, self.limit,
                    *first)


def _check_overlong(overlong: str) -> None:
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}: allowed {OVERLONG}")


def prompt_ids(tok, example: Example) -> list[int]:
    """Token ids of the prompt: a list of chat messages rendered with the tokenizer's chat template (with the
    generation prompt, and the ``tokenizer.chat_template_kwargs``), or plain text after ``bos`` where the
    tokenizer adds one."""
    if isinstance(example.prompt, str):
        return tok.encode_prompt(example.prompt)
    return tok.apply_chat_template(example.prompt, add_generation_prompt=True)


def sft_ids(tok, example: Example) -> tuple[list[int], int]:
    """Token ids of ``prompt target <eos>`` and the length of the prompt part (the completion mask starts after
    it; with chat messages, after the rendered generation prompt)."""
    prompt = prompt_ids(tok, example)
    return prompt + encode(tok, example.target) + [SpecialTokens.of(tok).eos], len(prompt)


def _fits(length: int, limit: int, what: str, key: str, index: int, overlong: str,
          counter: Optional[DropCounter]) -> bool:
    """Whether an encoded row of ``length`` tokens fits ``limit``; an over-long one is counted (``drop``) or
    raises :class:`OverlongError` naming the row, its length and the config key (``error``)."""
    if length <= limit:
        return True
    if overlong == "error":
        raise OverlongError(f"{what} {index}: {length} tokens > {key}={limit} "
                            f"(raise {key} or set data.overlong=drop)")
    if counter is not None:
        counter.drop(index, length)
    return False


def encode_sft(tok, example: Example, seq_len: int, overlong: str = "drop", *, index: int = -1,
               counter: Optional[DropCounter] = None) -> Optional[dict]:
    """``<bos> prompt target <eos>`` right-padded to ``seq_len`` → tokens/positions/valid/loss_mask ``[T]``.

    ``loss_mask`` is True on the target tokens and ``<eos>`` (token t is predicted from position t-1).
    Returns None for an over-long example with ``overlong="drop"`` (counted in ``counter``); raises
    :class:`OverlongError` naming ``index``, the length and ``seq_len`` with ``overlong="error"``.
    """
    _check_overlong(overlong)
    ids, n_prompt = sft_ids(tok, example)
    if not _fits(len(ids), seq_len, "example", "data.seq_len", index, overlong, counter):
        return None
    n = len(ids)
    tokens = np.full((seq_len,), SpecialTokens.of(tok).pad, np.int32)
    tokens[:n] = ids
    valid = np.arange(seq_len) < n
    loss_mask = np.zeros((seq_len,), bool)
    loss_mask[n_prompt:n] = True
    return {"tokens": tokens, "positions": np.maximum(np.cumsum(valid) - 1, 0).astype(np.int32),
            "valid": valid, "loss_mask": loss_mask}


def encode_prompt(tok, example: Example, prompt_len: int, overlong: str = "drop", *, index: int = -1,
                  counter: Optional[DropCounter] = None) -> Optional[dict]:
    """``<bos> prompt`` LEFT-padded to ``prompt_len`` → ``prompt [P]``, ``prompt_valid [P]``, ``index []``.

    Over-long prompts: None with ``overlong="drop"`` (counted in ``counter``), :class:`OverlongError` with "error".
    """
    _check_overlong(overlong)
    sp = SpecialTokens.of(tok)
    ids = prompt_ids(tok, example)
    if not _fits(len(ids), prompt_len, "prompt", "data.prompt_len", index, overlong, counter):
        return None
    prompt = np.full((prompt_len,), sp.pad, np.int32)
    prompt[prompt_len - len(ids):] = ids
    return {"prompt": prompt, "prompt_valid": np.arange(prompt_len) >= prompt_len - len(ids),
            "index": np.int32(index)}


# ----------------------------------------------------------------------------------------------------------------
# Example sources
# ----------------------------------------------------------------------------------------------------------------


def _is_messages(value) -> bool:
    """Whether a prompt field holds chat messages (a list of ``{"role": ..., "content": ...}`` mappings)."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value))


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
        prompt = r[self.prompt_field]
        if not _is_messages(prompt):
            prompt = str(prompt)
        return Example(prompt=prompt, target=target, answer=answer, meta=r)

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_after_mark(completion) if ">" in completion else completion.strip() or None

    def reward(self, completion: str, example: Example) -> float:
        return float(self.extract_answer(completion) == example.answer)

    def format_ok(self, completion: str) -> bool:
        return self.extract_answer(completion) is not None


# ----------------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------------


def _probe(length_fn, num_examples: int, key: str, limit: int, overlong: str, counter: DropCounter,
           probe: int = 256) -> None:
    """Look at the first ``probe`` examples before streaming: fail fast when none fits (instead of filtering
    forever), raise on the first over-long one with ``overlong="error"``, else warn once with the count."""
    n = min(num_examples, probe)
    long = [(i, length) for i in range(n) if (length := length_fn(i)) > limit]
    if not long:
        return
    if overlong == "error":
        i, length = long[0]
        raise OverlongError(f"example {i}: {length} tokens > {key}={limit} (raise {key} or set data.overlong=drop)")
    if len(long) == n:
        raise OverlongError(f"none of the first {n} examples fits {key}={limit}; raise {key}")
    counter.warn(len(long), n, long[0])


def _with_workers(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    """Move the pipeline into ``worker_count`` grain worker processes (0: stay in-process)."""
    if not worker_count:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags when it starts workers; jaxtok has no absl main
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def _batched(ds: grain.MapDataset, encode_fn, batch_size: int, drop_remainder: bool) -> grain.IterDataset:
    # One prefetch thread: encoding is pure Python (GIL-bound), so grain's default 16 threads only add contention;
    # one thread still overlaps data preparation with the jitted step.
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(2 * batch_size, 16))
    return (ds.map(encode_fn).to_iter_dataset(read).filter(lambda x: x is not None)
            .batch(batch_size, drop_remainder=drop_remainder))


def _pipeline(encode_fn, num_examples: int, seed: int, shuffle: bool, num_epochs: Optional[int], batch_size: int,
              drop_remainder: bool, worker_count: int) -> grain.IterDataset:
    """Indices -> (shuffled, repeated) -> encoded rows (over-long ones filtered) -> batches -> optional workers."""
    ds = grain.MapDataset.range(num_examples)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    return _with_workers(_batched(ds, encode_fn, batch_size, drop_remainder=drop_remainder), worker_count)


def sft_dataset(task, split: str, tok, *, seq_len: int, batch_size: int, num_examples: int, seed: int = 0,
                shuffle: bool = True, num_epochs: Optional[int] = None, overlong: str = "drop",
                worker_count: int = 0) -> tuple[grain.IterDataset, DropCounter]:
    """Batches ``{tokens, positions, valid, loss_mask}`` of shape ``[batch_size, seq_len]`` from ``task``.

    Deterministic in ``seed``; the iterator's ``get_state()/set_state()`` resume it exactly. Returns the dataset
    and the counter of dropped over-long examples.
    """
    _check_overlong(overlong)
    _check_sizes(batch_size=batch_size, num_examples=num_examples, worker_count=worker_count)
    counter = DropCounter("SFT", seq_len)
    _probe(lambda i: len(sft_ids(tok, task.example(split, i))[0]), num_examples, "data.seq_len", seq_len, overlong,
           counter)

    def enc(i):
        return encode_sft(tok, task.example(split, int(i)), seq_len, overlong, index=int(i), counter=counter)

    return _pipeline(enc, num_examples, seed, shuffle, num_epochs, batch_size, True, worker_count), counter


def pad_prompt_batch(batch: Mapping[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt [size, P], prompt_valid [size, P])`` of a :func:`prompt_dataset` batch, a short (last) batch padded
    with copies of its first row, so a jitted decoder sees one static shape; callers score only the first
    ``batch["prompt"].shape[0]`` rows."""
    prompt, valid = np.asarray(batch["prompt"]), np.asarray(batch["prompt_valid"])
    extra = size - prompt.shape[0]
    if extra < 0:
        raise ValueError(f"batch of {prompt.shape[0]} rows is larger than the padded size {size}")
    return (np.concatenate([prompt, np.repeat(prompt[:1], extra, 0)]),
            np.concatenate([valid, np.repeat(valid[:1], extra, 0)]))


def prompt_dataset(task, split: str, tok, *, prompt_len: int, batch_size: int, num_examples: int,
                   overlong: str = "drop", seed: int = 0, shuffle: bool = False, num_epochs: Optional[int] = 1,
                   drop_remainder: bool = False, worker_count: int = 0) -> tuple[grain.IterDataset, DropCounter]:
    """Left-padded prompt batches ``{prompt [B,P], prompt_valid [B,P], index [B]}``; ``index`` recovers each row's
    :class:`Example` with ``task.example(split, index)`` (strings cannot travel in arrays; see
    :func:`examples_of`). By default one ordered pass with a short last batch (eval); rollouts over the train split
    use ``shuffle=True, num_epochs=None, drop_remainder=True``."""
    _check_overlong(overlong)
    _check_sizes(batch_size=batch_size, num_examples=num_examples, worker_count=worker_count)
    counter = DropCounter("prompt", prompt_len)
    _probe(lambda i: len(prompt_ids(tok, task.example(split, i))), num_examples, "data.prompt_len", prompt_len,
           overlong, counter)

    def enc(i):
        return encode_prompt(tok, task.example(split, int(i)), prompt_len, overlong, index=int(i), counter=counter)

    return _pipeline(enc, num_examples, seed, shuffle, num_epochs, batch_size, drop_remainder, worker_count), counter


def examples_of(task, split: str, batch: dict) -> list[Example]:
    """The :class:`Example` of every row of a prompt batch (from its ``index`` array)."""
    return [task.example(split, int(i)) for i in np.asarray(batch["index"])]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        lo = 0 if name == "worker_count" else 1
        if int(value) < lo:
            raise ValueError(f"{name}={value}: must be >= {lo}")


def make_task_from_config(section):
    """The task named by a ``DataSection`` (a synthetic task or a JSONL/Parquet file)."""
    if section.task in ("jsonl", "parquet"):
        return FileTask.load(section.path, section.task, section.prompt_field, section.answer_field,
                             section.target_field)
    from jaxtok.tasks import make_task

    return make_task(section.task, section.task_args, section.seed)


def from_config(section, tok, split: str, kind: str = "sft"):
    """Pipeline for a ``DataSection`` (any object with its fields) → ``(task, dataset, drop_counter)``.

    ``kind="sft"``: SFT batches of ``seq_len``; ``kind="prompt"``: left-padded prompt batches of ``prompt_len``.
    The train split draws ``num_train`` examples, shuffled and repeated forever with full batches; the eval split
    draws ``num_eval`` examples in order, one pass (the last batch of prompt pipelines may be short).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: allowed ('train', 'eval')")
    if kind not in ("sft", "prompt"):
        raise ValueError(f"kind={kind!r}: allowed ('sft', 'prompt')")
    task = make_task_from_config(section)
    train = split == "train"
    common = dict(batch_size=section.batch_size, num_examples=section.num_train if train else section.num_eval,
                  overlong=section.overlong, worker_count=section.worker_count)
    if kind == "sft":
        ds, counter = sft_dataset(task, split, tok, seq_len=section.seq_len, seed=section.seed, shuffle=train,
                                  num_epochs=None if train else 1, **common)
    else:
        ds, counter = prompt_dataset(task, split, tok, prompt_len=section.prompt_len, seed=section.seed,
                                     shuffle=train, num_epochs=None if train else 1, drop_remainder=train, **common)
    return task, ds, counter


def eval_examples(task, split: str, n: int) -> list[Example]:
    """The first ``n`` examples of ``split`` (wrapping for file datasets)."""
    return [task.example(split, i) for i in range(n)]


def stack(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stack per-example dicts into a batch."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
