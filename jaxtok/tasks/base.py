"""Synthetic verifiable tasks: deterministic examples with disjoint train/eval splits, an answer extractor and a
reward function."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Optional, Protocol

import numpy as np

SPLITS = ("train", "eval")
ANSWER_MARK = ">"
STEP_SEP = ";"


@dataclasses.dataclass(frozen=True)
class Example:
    """``prompt`` is given to the model, ``target`` is the full worked response (scratchpad, then
    ``>answer``), ``answer`` is what the extractor must return for full reward."""

    prompt: str
    target: str
    answer: str
    meta: Any = None


class Task(Protocol):
    name: str

    def example(self, split: str, index: int) -> Example: ...

    def extract_answer(self, completion: str) -> Optional[str]: ...

    def reward(self, completion: str, example: Example) -> float: ...

    def format_ok(self, completion: str) -> bool: ...

    def steps(self, example: Example) -> list[tuple[int, int]]: ...


def split_of(problem: str, eval_fraction: float = 0.1) -> str:
    """Assign a canonical problem string to a split by its hash, so no eval problem ever appears in train."""
    h = int.from_bytes(hashlib.blake2b(problem.encode(), digest_size=8).digest(), "little")
    return "eval" if (h % 10_000) < eval_fraction * 10_000 else "train"


def sample_in_split(make, split: str, seed: int, index: int, eval_fraction: float = 0.1):
    """Draw problems from ``make(rng)`` (which returns ``(canonical, value)``) until one lands in ``split``.

    Deterministic in ``(seed, split, index)``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed {SPLITS}")
    if index < 0:
        raise ValueError(f"index={index}: must be >= 0")
    for attempt in range(10_000):
        rng = np.random.default_rng([seed, SPLITS.index(split), index, attempt])
        canonical, value = make(rng)
        if split_of(canonical, eval_fraction) == split:
            return value
    raise RuntimeError(f"could not draw a {split} example: the problem space is too small for the split")


def extract_after_mark(completion: str) -> Optional[str]:
    """Text after the last ``>`` up to the end of line (None if there is no mark or nothing after it)."""
    if ANSWER_MARK not in completion:
        return None
    ans = completion.rsplit(ANSWER_MARK, 1)[1].split("\n", 1)[0].strip()
    return ans or None


def scratchpad_steps(target: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the ``;``-separated scratchpad steps of a target (the text before the
    last ``>``), for span-level methods such as TRACE (train_methods.md §3)."""
    body = target.rsplit(ANSWER_MARK, 1)[0] if ANSWER_MARK in target else target
    spans, start = [], 0
    for seg in body.split(STEP_SEP):
        spans.append((start, start + len(seg)))
        start += len(seg) + 1
    return spans


class MarkedAnswerTask:
    """Shared behaviour of the synthetic tasks: the answer follows the last ``>``, the scratchpad steps are the
    ``;``-separated segments before it, and the reward is exact match (a task overrides what differs)."""

    @staticmethod
    def steps(example: Example) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of each scratchpad step inside ``example.target``."""
        return scratchpad_steps(example.target)

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_after_mark(completion)

    def reward(self, completion: str, example: Example) -> float:
        return float(self.extract_answer(completion) == example.answer)
