"""Multi-step arithmetic with a worked scratchpad.

Prompt ``12+7-3=``; target ``12+7=19;19-3=16>16`` — one scratchpad step per ``;``-separated segment (left to
right evaluation), then ``>`` and the answer. Step boundaries are exposed for span-level methods (TRACE).

``direct_fraction`` mixes answer-only targets into the train split: for that share of train examples (chosen by a
hash of the seed and the example index, so the split is deterministic) the target is ``>16`` alone, without the
scratchpad. A model SFT'd on the mix sometimes writes the scratchpad (long) and sometimes answers directly (short):
the variable-length testbed variant of docs/results/length_control_testbed.md. Eval targets never change.
"""

from __future__ import annotations

import dataclasses
import hashlib

from jaxtok.registry import TASKS
from jaxtok.tasks.base import Example, MarkedAnswerTask, sample_in_split


@dataclasses.dataclass(frozen=True)
class ArithArgs:
    digits: int = 2  # operands have 1..digits digits
    steps: int = 1  # number of operations
    ops: str = "+-"  # allowed operators among "+-*"
    eval_fraction: float = 0.1
    direct_fraction: float = 0.0  # share of TRAIN targets that are the answer alone (">16", no scratchpad)

    def __post_init__(self):
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits={self.digits}: allowed 1..6")
        if not 1 <= self.steps <= 8:
            raise ValueError(f"steps={self.steps}: allowed 1..8")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops={self.ops!r}: a non-empty subset of '+-*'")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction}: allowed (0, 1)")
        if not 0.0 <= self.direct_fraction <= 1.0:  # also rejects NaN
            raise ValueError(f"direct_fraction={self.direct_fraction}: allowed [0, 1]")


def is_direct(seed: int, index: int, direct_fraction: float) -> bool:
    """Whether train example ``index`` gets an answer-only target: a uniform draw in [0, 1) from a hash of
    ``(seed, index)`` falls below ``direct_fraction`` (0: never, 1: always; deterministic, independent of the
    problem drawn, so about that share of any index range is direct)."""
    h = int.from_bytes(hashlib.blake2b(f"direct/{seed}/{index}".encode(), digest_size=8).digest(), "little")
    return h / 2.0**64 < direct_fraction


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
        if split == "train" and is_direct(self.seed, index, self.args.direct_fraction):
            return Example(prompt=prompt, target=f">{acc}", answer=str(acc), meta={"steps": lines, "direct": True})
        return Example(prompt=prompt, target=";".join(lines) + f">{acc}", answer=str(acc), meta={"steps": lines})

    def format_ok(self, completion: str) -> bool:
        ans = self.extract_answer(completion)
        return ans is not None and ans.lstrip("-").isdigit()


@TASKS.register("arith", ArithArgs)
def make_arith(args: ArithArgs, seed: int = 0) -> ArithTask:
    return ArithTask(args, seed)
