"""Verifiable rewards for rollouts, composed with weights (``rollout.rewards: {exact_match: 1.0, format: 0.1}``).

A reward is ``fn(task, completion: str, example) -> float`` registered in :data:`jaxtok.registry.REWARDS`;
:func:`score` returns ``R = Σ_name w_name · r_name`` per completion as a float32 ``[B]`` array. Rewards run on the
host on decoded text, once per rollout batch, outside any jitted code.

- ``exact_match``: the task's own verifier (``task.reward``: extracted answer == reference), 1 or 0.
- ``format``: 1 when the completion follows the task's answer format (``task.format_ok``), else 0.
- ``math_verify``: symbolic/numeric equivalence of the extracted answer and the reference (HF ``math-verify``:
  ``1/2`` matches ``0.5`` and ``\\frac{1}{2}``), for free-form math answers.
- ``para_format``: the PARA-GRPO structural-tag score for ``<think>…</think><answer>…</answer>`` completions
  (train_methods.md §12, ``answer_suffix`` on, no tool terms), capped at 1.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from jaxtok.registry import REWARDS


@REWARDS.register("exact_match")
def exact_match(task, completion: str, example) -> float:
    """1 if the task's verifier accepts the completion's answer, else 0."""
    return float(task.reward(completion, example) >= 1.0)


@REWARDS.register("format")
def format_reward(task, completion: str, example) -> float:
    """1 if the completion follows the task's answer format (``task.format_ok``), else 0."""
    del example
    return float(bool(task.format_ok(completion)))


@REWARDS.register("math_verify")
def math_verify(task, completion: str, example) -> float:
    """1 if the extracted answer is mathematically equivalent to ``example.answer`` (HF ``math-verify``)."""
    from math_verify import parse, verify

    answer = task.extract_answer(completion)
    if answer is None:
        return 0.0
    gold, pred = parse(str(example.answer)), parse(answer)
    return float(bool(gold) and bool(pred) and verify(gold, pred))


_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def para_format_score(text: str, lambda_anchor: float = 0.5) -> float:
    """PARA-GRPO format score (train_methods.md §12, tool terms omitted):

    ``0.2·[substantive think] + [non-empty answer]·(0.3·[<answer>] + 0.2·[</answer>]) + λ_anchor·(0.4·[</think> ∧
    think] + 0.3·[think → answer in order] − 0.3·[<think> unclosed]) + 0.1·[all tag pairs balanced ∧ score > 0]``,
    clipped to ``[0, 1]``. Empty answer tags earn no answer credit.
    """
    think = _THINK.search(text)
    think_open = text.split("<think>", 1)[1] if "<think>" in text else ""  # an unclosed think still counts
    substantive = len((think.group(1) if think else think_open).strip()) > 0
    answer = _ANSWER.search(text)
    after_open = text.split("<answer>", 1)[1] if "<answer>" in text else ""  # an unclosed answer still counts
    has_answer = len((answer.group(1) if answer else after_open).strip()) > 0
    score = 0.2 * substantive
    score += has_answer * (0.3 * ("<answer>" in text) + 0.2 * ("</answer>" in text))
    closed = think is not None
    flow = think is not None and answer is not None and think.end() <= answer.start()
    unclosed = "<think>" in text and "</think>" not in text
    score += lambda_anchor * (0.4 * (closed and substantive) + 0.3 * flow - 0.3 * unclosed)
    balanced = all(text.count(f"<{t}>") == text.count(f"</{t}>") for t in ("think", "answer"))
    if balanced and score > 0:
        score += 0.1
    return float(min(max(score, 0.0), 1.0))


@REWARDS.register("para_format")
def para_format(task, completion: str, example) -> float:
    """PARA-GRPO structural-tag format score of the completion (:func:`para_format_score`)."""
    del task, example
    return para_format_score(completion)


def score(task, completions: Sequence[str], examples: Sequence, weights: Mapping[str, float]) -> np.ndarray:
    """``R_b = Σ_name weights[name] · reward_name(completion_b)`` as float32 ``[B]``; unknown names raise
    ConfigError listing the registered rewards."""
    fns = {name: REWARDS.get(name, "rollout.rewards") for name in weights}
    out = np.zeros(len(completions), np.float32)
    for b, (text, ex) in enumerate(zip(completions, examples)):
        out[b] = sum(float(w) * fns[name](task, text, ex) for name, w in weights.items())
    return out
