"""Countdown: reach a target with ``+ - * /`` using each given number exactly once.

Prompt ``c:3,5,7|56=``; target ``3+5=8;8*7=56>(3+5)*7`` — a worked scratchpad (one ``;``-separated step per
operation, combining the running value with the next number), then ``>`` and the answer expression.
The reward verifies the extracted expression (numbers used exactly once, value equals the target), so any
correct solution scores, not only the reference.
"""

from __future__ import annotations

import ast
import dataclasses
from fractions import Fraction
from typing import Optional

from jaxtok.registry import TASKS
from jaxtok.tasks.base import Example, MarkedAnswerTask, sample_in_split


@dataclasses.dataclass(frozen=True)
class CountdownArgs:
    numbers: int = 3  # how many numbers are given
    max_number: int = 12
    eval_fraction: float = 0.1

    def __post_init__(self):
        if not 2 <= self.numbers <= 5:
            raise ValueError(f"numbers={self.numbers}: allowed 2..5")
        if not 2 <= self.max_number <= 99:
            raise ValueError(f"max_number={self.max_number}: allowed 2..99")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction}: allowed (0, 1)")


def evaluate_expression(expr: str) -> Optional[tuple[Fraction, list[int]]]:
    """Exact value and the integer literals of an arithmetic expression, or None if it is not one."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None
    nums: list[int] = []

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            nums.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ZeroDivisionError
            return a / b
        raise ValueError("not an arithmetic expression")

    try:
        return ev(tree), nums
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def _top_level_additive(expr: str) -> bool:
    """Whether ``expr`` has a ``+`` or ``-`` outside parentheses (so it needs them before ``*`` or ``/``)."""
    depth = 0
    for c in expr:
        depth += (c == "(") - (c == ")")
        if depth == 0 and c in "+-":
            return True
    return False


@dataclasses.dataclass(frozen=True)
class CountdownTask(MarkedAnswerTask):
    args: CountdownArgs
    seed: int = 0
    name: str = "countdown"

    def _make(self, rng):
        nums = [int(rng.integers(1, self.args.max_number + 1)) for _ in range(self.args.numbers)]
        exprs = [(str(n), Fraction(n)) for n in nums]
        order = list(rng.permutation(len(exprs)))
        exprs = [exprs[i] for i in order]
        acc_s, acc_v = exprs[0]
        lines = []
        for s, v in exprs[1:]:
            # keep every intermediate value a positive integer
            choices = ["+", "*"] + (["-"] if acc_v > v else []) + (["/"] if (acc_v / v).denominator == 1 else [])
            op = choices[int(rng.integers(0, len(choices)))]
            new_v = {"+": acc_v + v, "-": acc_v - v, "*": acc_v * v, "/": acc_v / v}[op]
            lines.append(f"{acc_v}{op}{v}={new_v}")
            acc_v = new_v
            acc_s = f"({acc_s}){op}{s}" if op in "*/" and _top_level_additive(acc_s) else f"{acc_s}{op}{s}"
        problem = ",".join(map(str, nums)) + f"|{int(acc_v)}"
        return problem, (nums, int(acc_v), acc_s, lines)

    def example(self, split: str, index: int) -> Example:
        nums, target, solution, lines = sample_in_split(self._make, split, self.seed, index,
                                                        self.args.eval_fraction)
        prompt = "c:" + ",".join(map(str, nums)) + f"|{target}="
        return Example(prompt=prompt, target=";".join(lines) + f">{solution}", answer=solution,
                       meta={"numbers": nums, "target": target, "steps": lines})

    def reward(self, completion: str, example: Example) -> float:
        """1 if the extracted expression uses exactly the given numbers and equals the target."""
        ans = self.extract_answer(completion)
        res = evaluate_expression(ans) if ans else None
        if res is None:
            return 0.0
        value, used = res
        return float(sorted(used) == sorted(example.meta["numbers"]) and value == example.meta["target"])

    def format_ok(self, completion: str) -> bool:
        ans = self.extract_answer(completion)
        return ans is not None and evaluate_expression(ans) is not None


@TASKS.register("countdown", CountdownArgs)
def make_countdown(args: CountdownArgs, seed: int = 0) -> CountdownTask:
    return CountdownTask(args, seed)
