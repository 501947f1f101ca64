"""Plan conditioning ("Think First, Diffuse Fast", decode_methods.md §B22): an autoregressive planner writes a
short plan that becomes part of the diffusion LM's prompt — a frozen scaffold every masked position sees from the
first denoising step; the diffusion sampler is unchanged (training-free).

At the scale of the synthetic tasks the plan is the planner's first ``k`` greedy tokens of its worked scratchpad
(the zoo teacher's ``12+7=19;...``), terminators excluded. Two placements (:func:`compose_prompt`):

- ``after``: ``prompt ‖ plan`` — the plan is the start of the response, in the format the diffusion LM was trained
  on; the diffusion LM fills the remaining ``max_new_tokens − k`` positions and the completion scored is
  ``plan ‖ generated``.
- ``before``: ``<bos> plan ‖ sep ‖ prompt`` — the paper's literal layout (plan ahead of the question); the completion
  scored is the generated text alone. A diffusion LM never trained with such a prefix sees it out of distribution.

``k = 0`` is the unconditioned baseline (the same code path). Cost: ``k`` planner forwards (prefill + k − 1 decode
steps) on top of the diffusion NFE, reported separately.

The experiment (exact match with vs without a plan) is the ``plan_conditioning`` bench
(:mod:`jaxtok.bench.plan_conditioning`, ``jaxtok bench configs/bench/plan_conditioning.yaml``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from .generate import generate
from jaxtok.sampling import GREEDY

PLACEMENTS = ("after", "before")


def ar_plan(planner, prompt, prompt_valid, *, plan_tokens: int, stop_tokens: Sequence[int], pad_id: int = 0,
            rng=None):
    """The planner's first ``plan_tokens`` greedy tokens: ``(plan [B, k], plan_valid [B, k], forwards)``; a row that
    ends earlier keeps the tokens before its terminator (the terminator is not part of the plan)."""
    if plan_tokens < 1:
        raise ValueError(f"plan_tokens={plan_tokens}: must be >= 1 (0 = no plan: skip the planner)")
    out = generate(planner, prompt, prompt_valid, max_new_tokens=plan_tokens, sampling=GREEDY,
                   stop_tokens=tuple(stop_tokens), pad_id=pad_id, rng=jax.random.key(0) if rng is None else rng)
    tokens = np.asarray(out.tokens)
    valid = np.asarray(out.valid) & ~np.isin(tokens, np.asarray(stop_tokens))
    valid &= np.cumprod(valid, axis=1).astype(bool)  # a prefix: nothing after the first terminator
    return tokens, valid, int(out.num_forwards)


def compose_prompt(prompt, prompt_valid, plan, plan_valid, *, placement: str = "after", bos_id: Optional[int] = None,
                   sep_ids: Sequence[int] = (), pad_id: int = 0):
    """The diffusion prompt with the plan, LEFT-padded to a common width ``[B, P + k (+ len(sep))]``.

    ``after``: ``prompt ‖ plan``; ``before``: ``[bos] plan ‖ sep ‖ prompt`` (the prompt's own leading ``bos_id``
    moves to the front)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: allowed {PLACEMENTS}")
    prompt, prompt_valid = np.asarray(prompt), np.asarray(prompt_valid, bool)
    plan, plan_valid = np.asarray(plan), np.asarray(plan_valid, bool)
    rows = []
    for r in range(prompt.shape[0]):
        p = prompt[r][prompt_valid[r]].tolist()
        k = plan[r][plan_valid[r]].tolist()
        if placement == "after":
            rows.append(p + k)
        else:
            head = [p.pop(0)] if (bos_id is not None and p and p[0] == bos_id) else []
            rows.append(head + k + list(sep_ids) + p)
    width = prompt.shape[1] + plan.shape[1] + (len(sep_ids) if placement == "before" else 0)
    out = np.full((len(rows), width), pad_id, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for r, ids in enumerate(rows):
        out[r, width - len(ids):] = ids
        valid[r, width - len(ids):] = True
    return out, valid
