"""Arithmetic whose train split is a file of model samples (sequence-level distillation / SFT on teacher samples).

``arith_samples`` is the ``arith`` task (same arguments, same held-out split, answer extractor and reward) whose
train example ``i`` is record ``i mod len`` of a JSONL file with ``prompt`` and ``target`` fields (e.g. completions a
teacher sampled at T=1 on the train prompts: ``scripts/teacher_samples.py``). Training on it is SFT on those samples;
evaluation stays on the arith held-out problems. Set ``data.num_train`` to the number of records for one pass per
epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from jaxtok.registry import TASKS
from jaxtok.tasks.arith import ArithArgs, ArithTask
from jaxtok.tasks.base import Example


@dataclasses.dataclass(frozen=True)
class ArithSamplesArgs(ArithArgs):
    samples: str = ""  # JSONL of {"prompt", "target"} records (train split)
    only_correct: bool = False  # keep only records whose target's answer is right (rejection sampling)

    def __post_init__(self):
        super().__post_init__()
        if not self.samples:
            raise ValueError("samples='': the path of a JSONL file of {prompt, target} records is required")


@functools.lru_cache(maxsize=8)
def _records(path: str, only_correct: bool) -> tuple:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.task_args.samples={path!r} does not exist")
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if "prompt" not in r or "target" not in r:
            raise ValueError(f"{path}: record {i} needs 'prompt' and 'target' fields, has {sorted(r)}")
    if only_correct:
        rows = [r for r in rows if r.get("correct", True)]
    if not rows:
        raise ValueError(f"{path}: no records")
    return tuple(rows)


@dataclasses.dataclass(frozen=True)
class ArithSamplesTask(ArithTask):
    name: str = "arith_samples"

    def example(self, split: str, index: int) -> Example:
        if split != "train":
            return super().example(split, index)
        recs = _records(self.args.samples, self.args.only_correct)
        r = recs[index % len(recs)]
        return Example(prompt=r["prompt"], target=r["target"], answer=str(r.get("answer", "")), meta=r)


@TASKS.register("arith_samples", ArithSamplesArgs)
def make_arith_samples(args: ArithSamplesArgs, seed: int = 0) -> ArithSamplesTask:
    return ArithSamplesTask(args, seed)
