"""Multi-step arithmetic with a worked scratchpad.

Prompt ``12+7-3=``; target ``12+7=19;19-3=16>16`` — one scratchpad step per ``;``-separated segment (left to
right evaluation), then ``>`` and the answer. Step boundaries are exposed for span-level methods (TRACE).
"""

from __future__ import annotations

import dataclasses

from jaxtok.registry import TASKS
from jaxtok.tasks.base import Example, MarkedAnswerTask, sample_in_split


@dataclasses.dataclass(frozen=True)
class ArithArgs:
    digits: int = 2  # operands have 1..digits digits
    steps: int = 1  # number of operations
    ops: str = "+-"  # allowed operators among "+-*"
    eval_fraction: float = 0.1

    def __post_init__(self):
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits={self.digits}: allowed 1..6")
        if not 1 <= self.steps <= 8:
            raise ValueError(f"steps={self.steps}: allowed 1..8")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops={self.ops!r}: a non-empty subset of '+-*'")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction}: allowed (0, 1)")


@dataclasses.dataclass(frozen=True)
class ArithTask(MarkedAnswerTask):
    args: ArithArgs
    seed: int = 0
    name: str = "arith"

    def _make(self, rng):
        hi = 10**self.args.digits
        nums = [int(rng.integers(0, hi)) for _ in range(self.args.steps + 1)]
        ops = [self.args.ops[int(rng.integers(0, len(self.args.ops)))] for _ in range(self.args.steps)]
        problem = str(nums[0]) + "".join(o + str(n) for o, n in zip(ops, nums[1:]))
        return problem, (nums, ops)

    def example(self, split: str, index: int) -> Example:
        nums, ops = sample_in_split(self._make, split, self.seed, index, self.args.eval_fraction)
        acc, lines = nums[0], []
        for op, n in zip(ops, nums[1:]):
            new = acc + n if op == "+" else acc - n if op == "-" else acc * n
            lines.append(f"{acc}{op}{n}={new}")
            acc = new
        prompt = str(nums[0]) + "".join(o + str(n) for o, n in zip(ops, nums[1:])) + "="
        return Example(prompt=prompt, target=";".join(lines) + f">{acc}", answer=str(acc), meta={"steps": lines})

    def format_ok(self, completion: str) -> bool:
        ans = self.extract_answer(completion)
        return ans is not None and ans.lstrip("-").isdigit()


@TASKS.register("arith", ArithArgs)
def make_arith(args: ArithArgs, seed: int = 0) -> ArithTask:
    return ArithTask(args, seed)
