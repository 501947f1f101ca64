"""Sorting: ``s:5,2,9=`` → ``2,5,9>2,5,9`` (the sorted list, then ``>`` and the answer)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from jaxtok.registry import TASKS
from jaxtok.tasks.base import Example, extract_after_mark, sample_in_split


@dataclasses.dataclass(frozen=True)
class SortArgs:
    length: int = 5
    max_number: int = 9
    eval_fraction: float = 0.1

    def __post_init__(self):
        if not 2 <= self.length <= 16:
            raise ValueError(f"length={self.length}: allowed 2..16")
        if not 1 <= self.max_number <= 999:
            raise ValueError(f"max_number={self.max_number}: allowed 1..999")


@dataclasses.dataclass(frozen=True)
class SortTask:
    args: SortArgs
    seed: int = 0
    name: str = "sort"

    def _make(self, rng):
        nums = [int(x) for x in rng.integers(0, self.args.max_number + 1, self.args.length)]
        return ",".join(map(str, nums)), nums

    def example(self, split: str, index: int) -> Example:
        nums = sample_in_split(self._make, split, self.seed, index, self.args.eval_fraction)
        answer = ",".join(map(str, sorted(nums)))
        return Example(prompt="s:" + ",".join(map(str, nums)) + "=", target=f"{answer}>{answer}", answer=answer)

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_after_mark(completion)

    def reward(self, completion: str, example: Example) -> float:
        return float(self.extract_answer(completion) == example.answer)

    def format_ok(self, completion: str) -> bool:
        ans = self.extract_answer(completion)
        return ans is not None and all(p.isdigit() for p in ans.split(","))


@TASKS.register("sort", SortArgs)
def make_sort(args: SortArgs, seed: int = 0) -> SortTask:
    return SortTask(args, seed)
