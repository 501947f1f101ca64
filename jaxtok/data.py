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

Splits. Synthetic tasks have disjoint train/eval splits (by a hash of the canonical problem) and draw without end.
File datasets (:class:`FileTask`: ``data.train_files`` / ``data.eval_files``, JSONL / Parquet / ``datasets``
directories) have the splits their files give; with no eval file and ``data.eval_fraction=0`` there is no eval
split and asking for one is a ConfigError (the training loop skips its held-out eval with a warning). A finite
split is drawn at most once per epoch: ``num_examples`` is capped at its size (:func:`capped`), never wrapped.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import re
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np

from jaxtok.registry import ConfigError
from jaxtok.tasks.base import Example, split_of
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


FILE_TASKS = ("files", "jsonl", "parquet")  # data.task values served by FileTask
FILE_KINDS = {".jsonl": "jsonl", ".parquet": "parquet"}  # extension -> reader; a directory is an HF dataset


def _is_messages(value) -> bool:
    """Whether a prompt field holds chat messages (a list of ``{"role": ..., "content": ...}`` mappings)."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value))


def expand_paths(paths: Sequence[str], key: str) -> list[str]:
    """The files named by ``paths`` (config key ``key``) in order, glob patterns (``data/train-*.parquet``)
    expanded and sorted; a path or pattern that names nothing is a ConfigError."""
    out = []
    for p in paths:
        if any(c in p for c in "*?["):
            hits = sorted(glob.glob(p))
            if not hits:
                raise ConfigError(f"{key}: pattern {p!r} matches no file")
            out += hits
        elif not Path(p).exists():
            raise ConfigError(f"{key}: {p!r}: no such file or directory")
        else:
            out.append(p)
    return out


def file_kind(path: str, forced: Optional[str] = None) -> str:
    """How to read ``path``: ``forced`` (``jsonl``/``parquet``, the older ``data.task`` form) or by extension
    (``.jsonl``, ``.parquet``); a directory is a ``datasets`` directory saved with ``save_to_disk`` (``hf``)."""
    if forced in ("jsonl", "parquet"):
        return forced
    if Path(path).is_dir():
        return "hf"
    kind = FILE_KINDS.get(Path(path).suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown data file type; allowed: .jsonl, .parquet, or a directory saved with "
                          f"datasets' save_to_disk")
    return kind


def _read_jsonl(path: str) -> list:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
    return rows


def _read_parquet(path: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(str(path)).to_pylist()


def _read_hf_dir(path: str) -> list:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading the datasets directory {path} needs the `datasets` library: "
                          f"pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"{path}: a DatasetDict with splits {sorted(ds)}; name one split's directory, e.g. "
                          f"{Path(path) / sorted(ds)[0]}")
    return ds.to_list()


def read_records(path: str, kind: Optional[str] = None) -> list:
    """The records (dicts) of one data file: JSONL, Parquet (pyarrow) or a ``datasets`` directory (``datasets``),
    chosen by :func:`file_kind`."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    kind = file_kind(path, kind)
    rows = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf_dir}[kind](path)
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"{path}: record {i} is a {type(r).__name__}, not an object with fields")
    return rows


@dataclasses.dataclass(frozen=True)
class Fields:
    """Which record fields hold what (``data.prompt_field`` / ``messages_field`` / ``answer_field`` /
    ``target_field``)."""

    prompt: str = "prompt"
    messages: Optional[str] = None
    answer: str = "answer"
    target: Optional[str] = None


def _field(record: Mapping, name: str, key: str, where: str):
    """``record[name]``; a missing or null field is a ConfigError naming ``where`` (file and record), the field,
    the config key that names it and the fields the record has."""
    if record.get(name) is None:
        what = "has no field" if name not in record else "has a null field"
        raise ConfigError(f"{where} {what} {name!r} (fields: {sorted(record)}); set {key}")
    return record[name]


def record_example(record: Mapping, fields: Fields, where: str) -> Example:
    """The :class:`Example` of one file record.

    Prompt: ``fields.messages`` (a list of ``{role, content}`` chat messages, kept a list so the tokenizer's chat
    template renders it; a trailing ``assistant`` message is the target when there is no target field) or
    ``fields.prompt`` (text, or chat messages when the field holds them). Answer: ``str(record[fields.answer])``.
    Target (SFT): ``fields.target`` when set, else the trailing assistant message, else the answer itself, with
    no answer mark added. Errors name ``where`` (file and record) and the field."""
    target = None
    if fields.messages:
        prompt = _field(record, fields.messages, "data.messages_field", where)
        if not _is_messages(prompt):
            raise ConfigError(f"{where}: field {fields.messages!r} is not a non-empty list of {{role, content}} "
                             f"messages (got {type(prompt).__name__})")
        prompt = [dict(m) for m in prompt]
        if prompt[-1]["role"] == "assistant":
            if len(prompt) == 1:
                raise ConfigError(f"{where}: field {fields.messages!r} holds only an assistant message (no prompt)")
            prompt, target = prompt[:-1], str(prompt[-1]["content"])
    else:
        prompt = _field(record, fields.prompt, "data.prompt_field", where)
        prompt = [dict(m) for m in prompt] if _is_messages(prompt) else str(prompt)
    answer = str(_field(record, fields.answer, "data.answer_field", where))
    if fields.target:
        target = str(_field(record, fields.target, "data.target_field", where))
    return Example(prompt=prompt, target=answer if target is None else target, answer=answer, meta=dict(record))


def load_examples(paths: Sequence[str], fields: Fields, kind: Optional[str] = None) -> tuple:
    """The examples of ``paths`` in order (every record checked now, so a bad one fails before any compute)."""
    out = []
    for path in paths:
        out += [record_example(r, fields, f"{path}: record {i}") for i, r in enumerate(read_records(path, kind))]
    return tuple(out)


def holdout(examples: Sequence[Example], fraction: float) -> tuple[tuple, tuple]:
    """``(train, eval)``: a deterministic share ``fraction`` of ``examples`` held out by a hash of the prompt (as
    the synthetic tasks split, :func:`jaxtok.tasks.base.split_of`), so equal prompts land in the same split and the
    split does not depend on the file order or the seed."""
    keys = [json.dumps(ex.prompt, sort_keys=True) for ex in examples]
    side = [split_of(k, fraction) for k in keys]
    return (tuple(ex for ex, s in zip(examples, side) if s == "train"),
            tuple(ex for ex, s in zip(examples, side) if s == "eval"))


NO_EVAL = ("no held-out eval data: data.eval_files is empty; set data.eval_files, or data.eval_fraction to hold out "
           "a deterministic share of data.train_files")


@dataclasses.dataclass(frozen=True)
class FileTask:
    """File datasets (JSONL / Parquet / ``datasets`` directories) as researchers keep them.

    ``train`` and ``eval`` hold the examples of each split (None: the split has no data, and asking for it is a
    ConfigError saying what to set). Nothing of the synthetic tasks' answer format applies: targets are used as
    written, and the answer is what the configured reward extracts. :meth:`extract_answer` is the last match of
    ``answer_regex`` (its first group when it has one), else the whole stripped completion; ``exact_match``
    compares that with the stripped reference answer; ``math_verify`` parses it (``\\boxed{6}, since 6 > 3`` →
    6). :attr:`has_format` is True only with ``answer_regex`` (``format_ok``: the regex matches); without one
    there is no answer format to check, so held-out eval reports no ``format_ok`` and the ``format`` reward is
    refused by config validation (:meth:`format_ok` then only says whether the completion is non-empty).
    """

    train: Optional[tuple]
    eval: Optional[tuple]
    answer_regex: Optional[str] = None
    name: str = "files"

    @classmethod
    def from_files(cls, train_files: Sequence[str] = (), eval_files: Sequence[str] = (), fields: Fields = Fields(),
                   *, eval_fraction: float = 0.0, answer_regex: Optional[str] = None,
                   kind: Optional[str] = None) -> "FileTask":
        """Load the train and eval files (glob patterns expanded; ``kind`` forces the reader, else by extension).
        With no eval file, ``eval_fraction > 0`` holds out that share of the train examples (:func:`holdout`);
        otherwise the task has no eval split."""
        train = load_examples(expand_paths(train_files, "data.train_files"), fields, kind) if train_files else None
        evals = load_examples(expand_paths(eval_files, "data.eval_files"), fields, kind) if eval_files else None
        if eval_fraction > 0:
            if evals is not None:
                raise ConfigError(f"data.eval_fraction={eval_fraction}: hold-out is for runs without "
                                  f"data.eval_files; set one of them")
            if train is None:
                raise ConfigError(f"data.eval_fraction={eval_fraction}: needs data.train_files to hold out from")
            train, evals = holdout(train, eval_fraction)
            if not evals or not train:
                raise ConfigError(f"data.eval_fraction={eval_fraction} leaves {len(train)} train and {len(evals)} "
                                  f"eval examples; each split needs at least one")
        for name, split in (("data.train_files", train), ("data.eval_files", evals)):
            if split is not None and not split:
                raise ConfigError(f"{name}: the files hold no records")
        return cls(train, evals, answer_regex)

    @classmethod
    def load(cls, path: str, kind: Optional[str] = None, prompt_field: str = "prompt", answer_field: str = "answer",
             target_field: Optional[str] = None, *, messages_field: Optional[str] = None,
             answer_regex: Optional[str] = None) -> "FileTask":
        """One file as the train split (the older ``data.task: jsonl|parquet`` + ``data.path`` form)."""
        return cls.from_files([path], fields=Fields(prompt_field, messages_field, answer_field, target_field),
                              answer_regex=answer_regex, kind=kind)

    def _split(self, split: str) -> tuple:
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}: allowed ('train', 'eval')")
        data = self.train if split == "train" else self.eval
        if data is None:
            raise ConfigError(NO_EVAL if split == "eval" else "no training data: data.train_files is empty")
        return data

    def has_split(self, split: str) -> bool:
        """Whether ``split`` has data (a file task may have no eval split)."""
        return (self.train if split == "train" else self.eval) is not None

    def split_size(self, split: str) -> int:
        """Examples in ``split``: pipelines draw at most this many (no wrapping); ConfigError if it has none."""
        return len(self._split(split))

    def __len__(self) -> int:
        return len(self.train or ())

    def example(self, split: str, index: int) -> Example:
        data = self._split(split)
        if not 0 <= index < len(data):
            raise IndexError(f"{split} example {index}: the {split} files hold {len(data)} examples")
        return data[index]

    @property
    def has_format(self) -> bool:
        """Whether the task has an answer format to check (``answer_regex`` is set)."""
        return self.answer_regex is not None

    def extract_answer(self, completion: str) -> Optional[str]:
        """The last match of ``answer_regex`` (group 1 if the pattern has groups), else the stripped completion;
        None when there is no match or nothing is left."""
        if self.answer_regex is None:
            return completion.strip() or None
        matches = list(re.finditer(self.answer_regex, completion, flags=re.S))
        if not matches:
            return None
        m = matches[-1]
        text = m.group(1) if m.re.groups else m.group(0)
        return (text or "").strip() or None

    def reward(self, completion: str, example: Example) -> float:
        """Exact match of the extracted answer and the stripped reference answer."""
        return float(self.extract_answer(completion) == example.answer.strip())

    def format_ok(self, completion: str) -> bool:
        """With ``answer_regex``: whether it matches the completion (see :attr:`has_format`)."""
        if self.answer_regex is None:
            return bool(completion.strip())
        return re.search(self.answer_regex, completion, flags=re.S) is not None


def split_size(task, split: str) -> Optional[int]:
    """How many examples ``task`` has in ``split`` (file and reasoning-gym tasks), or None (synthetic tasks draw
    without end)."""
    fn = getattr(task, "split_size", None)
    return None if fn is None else int(fn(split))


def has_split(task, split: str) -> bool:
    """Whether ``task`` has data for ``split`` (a file task without eval files has no eval split)."""
    fn = getattr(task, "has_split", None)
    return True if fn is None else bool(fn(split))


def capped(task, split: str, num_examples: int) -> int:
    """``num_examples`` capped at the split's size: a finite split is drawn once per epoch, never wrapped to fill
    ``data.num_eval`` / ``data.num_train``."""
    size = split_size(task, split)
    return num_examples if size is None else min(num_examples, size)


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
                worker_count: int = 0, drop_remainder: bool = True) -> tuple[grain.IterDataset, DropCounter]:
    """Batches ``{tokens, positions, valid, loss_mask}`` of shape ``[batch_size, seq_len]`` from ``task``.

    Deterministic in ``seed``; the iterator's ``get_state()/set_state()`` resume it exactly. Returns the dataset
    and the counter of dropped over-long examples. ``num_examples`` is capped at the split's size for finite
    (file) tasks (:func:`capped`); ``drop_remainder=False`` keeps a short last batch (:func:`pad_sft_batch`).
    """
    _check_overlong(overlong)
    _check_sizes(batch_size=batch_size, num_examples=num_examples, worker_count=worker_count)
    num_examples = capped(task, split, num_examples)
    counter = DropCounter("SFT", seq_len)
    _probe(lambda i: len(sft_ids(tok, task.example(split, i))[0]), num_examples, "data.seq_len", seq_len, overlong,
           counter)

    def enc(i):
        return encode_sft(tok, task.example(split, int(i)), seq_len, overlong, index=int(i), counter=counter)

    return _pipeline(enc, num_examples, seed, shuffle, num_epochs, batch_size, drop_remainder, worker_count), counter


def pad_sft_batch(batch: Mapping[str, Any], size: int) -> dict:
    """A short (last) SFT batch padded to ``size`` rows with copies of its first row whose ``loss_mask`` is all
    False, so a jitted eval step sees one static shape and the padding adds no tokens to token-weighted metrics."""
    rows = np.asarray(batch["tokens"]).shape[0]
    extra = size - rows
    if extra < 0:
        raise ValueError(f"batch of {rows} rows is larger than the padded size {size}")
    out = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], extra, 0)]) for k, v in batch.items()}
    out["loss_mask"][rows:] = False
    return out


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
    use ``shuffle=True, num_epochs=None, drop_remainder=True``. ``num_examples`` is capped at the split's size for
    finite (file) tasks, so a small eval file is evaluated once per example, never wrapped (:func:`capped`)."""
    _check_overlong(overlong)
    _check_sizes(batch_size=batch_size, num_examples=num_examples, worker_count=worker_count)
    num_examples = capped(task, split, num_examples)
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


def file_task_from_config(section) -> FileTask:
    """The :class:`FileTask` of a ``DataSection`` with ``task`` in :data:`FILE_TASKS`. ``data.path`` (the older
    single-file form) is read as ``data.train_files=[path]`` through the same code; ``task: jsonl|parquet``
    force that reader, ``task: files`` chooses it by each file's extension."""
    train_files = list(section.train_files) or ([section.path] if section.path else [])
    fields = Fields(section.prompt_field, section.messages_field, section.answer_field, section.target_field)
    return FileTask.from_files(train_files, list(section.eval_files), fields, eval_fraction=section.eval_fraction,
                               answer_regex=section.answer_regex,
                               kind=section.task if section.task != "files" else None)


def make_task_from_config(section):
    """The task named by a ``DataSection``: file datasets (:func:`file_task_from_config`) or a registered task
    (synthetic, ``reasoning_gym``)."""
    if section.task in FILE_TASKS:
        return file_task_from_config(section)
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
    """The first ``n`` examples of ``split`` (at most the split's size for file datasets: never wrapped)."""
    return [task.example(split, i) for i in range(capped(task, split, n))]


def stack(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stack per-example dicts into a batch."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
