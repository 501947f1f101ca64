"""Sorting: ``s:5,2,9=`` → ``2,5,9>2,5,9`` (the sorted list, then ``>`` and the answer).

``alphabet="digits"`` draws integers in ``[0, max_number]`` and sorts them numerically; ``alphabet="letters"`` draws
lowercase letters and sorts them alphabetically (``s:d,a,c=`` → ``a,c,d>a,c,d``).
"""

from __future__ import annotations

import dataclasses
import string

from jaxtok.registry import TASKS
from jaxtok.tasks.base import Example, MarkedAnswerTask, sample_in_split

ALPHABETS = ("digits", "letters")


@dataclasses.dataclass(frozen=True)
class SortArgs:
    length: int = 5
    max_number: int = 9  # digits: items in [0, max_number]
    alphabet: str = "digits"  # "digits" (numbers) | "letters" (a-z)
    eval_fraction: float = 0.1

    def __post_init__(self):
        if not 2 <= self.length <= 16:
            raise ValueError(f"length={self.length}: allowed 2..16")
        if not 1 <= self.max_number <= 999:
            raise ValueError(f"max_number={self.max_number}: allowed 1..999")
        if self.alphabet not in ALPHABETS:
            raise ValueError(f"alphabet={self.alphabet!r}: allowed {ALPHABETS}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction}: allowed (0, 1)")


@dataclasses.dataclass(frozen=True)
class SortTask(MarkedAnswerTask):
    args: SortArgs
    seed: int = 0
    name: str = "sort"

    def _make(self, rng):
        if self.args.alphabet == "letters":
            items = [string.ascii_lowercase[int(i)] for i in rng.integers(0, 26, self.args.length)]
        else:
            items = [int(x) for x in rng.integers(0, self.args.max_number + 1, self.args.length)]
        return ",".join(map(str, items)), items

    def example(self, split: str, index: int) -> Example:
        items = sample_in_split(self._make, split, self.seed, index, self.args.eval_fraction)
        answer = ",".join(map(str, sorted(items)))
        return Example(prompt="s:" + ",".join(map(str, items)) + "=", target=f"{answer}>{answer}", answer=answer,
                       meta={"items": items})

    def format_ok(self, completion: str) -> bool:
        """The answer is a comma-separated list of items of the task's alphabet."""
        ans = self.extract_answer(completion)
        ok = str.isdigit if self.args.alphabet == "digits" else (lambda p: len(p) == 1 and p.islower())
        return ans is not None and all(ok(p) for p in ans.split(","))


@TASKS.register("sort", SortArgs)
def make_sort(args: SortArgs, seed: int = 0) -> SortTask:
    return SortTask(args, seed)
