"""Verifiable rewards for rollouts, composed with weights (``rollout.rewards: {exact_match: 1.0, format: 0.1}``).

A reward is ``fn(task, completion: str, example) -> float`` registered in :data:`jaxtok.registry.REWARDS`;
:func:`score` returns ``R = Σ_name w_name · r_name`` per completion as a float32 ``[B]`` array. Rewards run on the
host on decoded text, once per rollout batch, outside any jitted code.

- ``exact_match``: the task's own verifier (``task.reward``: extracted answer == reference), 1 or 0.
- ``task_score``: the task's own score as it is (``task.reward``), e.g. reasoning-gym's partial credit in [0, 1].
- ``format``: 1 when the completion follows the task's answer format (``task.format_ok``), else 0.
- ``math_verify``: symbolic/numeric equivalence of the extracted answer and the reference (HF ``math-verify``:
  ``1/2`` matches ``0.5`` and ``\\frac{1}{2}``), for free-form math answers.
- ``para_format``: the PARA-GRPO structural-tag score for ``<think>…</think><answer>…</answer>`` completions
  (train_methods.md §12, ``answer_suffix`` on, no tool terms), capped at 1; it may be negative (an unclosed
  ``<think>`` is penalised).
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


@REWARDS.register("task_score")
def task_score(task, completion: str, example) -> float:
    """The task's own score of the completion (``task.reward``), partial credit kept (reasoning-gym scorers)."""
    return float(task.reward(completion, example))


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


_THINK_CLOSED = re.compile(r"<think>(.*?)</think>", re.S)
_THINK_OPEN = re.compile(r"<think>(.*?)(?:<tool_|<answer>|<\|im_end\|>|$)", re.S)  # cut at the next section
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_TAG_PAIRS = ("think", "tool_call", "tool_code", "answer")
SUBSTANTIVE_THINK_CHARS = 10  # ParaVT ``has_substantive_think(min_chars=10)``


def substantive_think(text: str, min_chars: int = SUBSTANTIVE_THINK_CHARS) -> bool:
    """PARA-GRPO (§12): the first closed ``<think>…</think>`` block, else an unclosed ``<think>`` read up to the next
    ``<answer>`` / ``<tool_`` tag (or the end), holds at least ``min_chars`` characters once stripped of surrounding whitespace."""
    match = _THINK_CLOSED.search(text) or _THINK_OPEN.search(text)
    return match is not None and len(match.group(1).strip()) >= min_chars


def nonempty_answer(text: str) -> bool:
    """PARA-GRPO (§12): some closed ``<answer>…</answer>`` pair (any of them, not only the first) brackets
    non-whitespace content; an unclosed or empty answer earns nothing."""
    return any(body.strip() for body in _ANSWER.findall(text))


def para_format_score(text: str, lambda_anchor: float = 0.5) -> float:
    """PARA-GRPO targeted format score (train_methods.md §12, ``answer_suffix`` on; ParaVT ``format.py`` weights):

    ``R_fmt = 0.2·[think] + [answer]·(0.3·[<answer>] + 0.2·[</answer>])
    + λ_anchor·(0.4·[</think> ∧ think] + 0.3·[</think> ∧ think ∧ answer ∧ </answer>] − 0.3·[<think> ∧ no </think>])
    + 0.1·[score > 0 ∧ every tag pair balanced]``, capped at 1 from above only (an unclosed, empty think scores
    ``−0.3·λ_anchor``).

    ``[think]`` = :func:`substantive_think` (≥ 10 characters), ``[answer]`` = :func:`nonempty_answer`; the flow
    bonus needs a non-empty answer (the reference checks the tags' presence, not their order); the balance check
    counts ``think``, ``tool_call``, ``tool_code`` and ``answer`` tags. The tool term ``0.3·[think before a
    parseable tool call]`` is omitted (no tool use in this library).
    """
    think = substantive_think(text)
    answer = nonempty_answer(text)
    score = 0.2 * think
    if answer:
        score += 0.3 * ("<answer>" in text) + 0.2 * ("</answer>" in text)
    closed = "</think>" in text and think
    anchor = 0.4 * closed + 0.3 * (closed and answer and "</answer>" in text) \
        - 0.3 * ("<think>" in text and "</think>" not in text)
    score += lambda_anchor * anchor
    if score > 0 and all(text.count(f"<{t}>") == text.count(f"</{t}>") for t in _TAG_PAIRS):
        score += 0.1
    return float(min(score, 1.0))


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
