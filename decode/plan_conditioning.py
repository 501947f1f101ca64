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

CLI::

    python -m jaxtok.decode.plan_conditioning CONFIG [key=value ...] --planner RUN --plan-tokens 0 4 8
        [--placement after before] [--eval 256] --out DIR

with a diffusion decode config (``model.init_from`` = the diffusion LM; ``decode.policy``/``policy_args`` the
sampler; ``--planner`` defaults to ``decode.draft_init_from``). Writes ``DIR/results.{json,md}`` and
``DIR/exact_match_vs_plan.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional, Sequence

import jax
import numpy as np

from .diffusion import diffusion_generate, policy_args_and_heads, stop_ids_of
from .generate import generate

PLACEMENTS = ("after", "before")


def ar_plan(planner, prompt, prompt_valid, *, plan_tokens: int, stop_tokens: Sequence[int], pad_id: int = 0,
            rng=None):
    """The planner's first ``plan_tokens`` greedy tokens: ``(plan [B, k], plan_valid [B, k], forwards)``; a row that
    ends earlier keeps the tokens before its terminator (the terminator is not part of the plan)."""
    if plan_tokens < 1:
        raise ValueError(f"plan_tokens={plan_tokens}: must be >= 1 (0 = no plan: skip the planner)")
    out = generate(planner, prompt, prompt_valid, max_new_tokens=plan_tokens, temperature=0.0,
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


def evaluate_plan(cfg, model, planner, tok, task, *, plan_tokens: int, placement: str = "after",
                  policy: Optional[str] = None, policy_args=None, num_examples: Optional[int] = None,
                  sep: str = ";") -> tuple[dict, list[dict]]:
    """Held-out exact match of the diffusion LM with a ``plan_tokens``-token AR plan (0: no plan).

    Settings as :func:`jaxtok.decode.diffusion.evaluate_policy` (``decode.max_new_tokens`` = the response budget:
    with ``after`` the diffusion LM generates ``max_new_tokens − k`` positions). Returns ``(metrics, samples)``:
    ``exact_match``, ``format_ok``, ``mean_nfe`` (diffusion forwards per row), ``planner_forwards`` (AR forwards per row),
    ``mean_plan_len``, ``wall_s``, ``num_examples``."""
    from jaxtok.data import prompt_dataset
    from jaxtok.tasks.tokenizer import SpecialTokens, decode, encode

    sp = SpecialTokens.of(tok)
    policy = policy or cfg.decode.policy or "llada"
    args, heads = policy_args_and_heads(policy, policy_args if policy_args is not None
                                        else dict(cfg.decode.policy_args))
    n = num_examples or cfg.data.num_eval
    budget = cfg.decode.max_new_tokens
    gen_len = budget - plan_tokens if placement == "after" else budget
    if gen_len < 1:
        raise ValueError(f"plan_tokens={plan_tokens} leaves no positions of decode.max_new_tokens={budget}")
    ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=cfg.decode.batch_size,
                           num_examples=n, overlong=cfg.data.overlong)
    stop = stop_ids_of(tok)
    key = jax.random.key(cfg.train.seed)
    hits = fmt = total = nfe = plan_len = ar_fwd = 0
    samples, wall = [], 0.0
    for i, batch in enumerate(ds):
        t0 = time.perf_counter()
        prompt, pv = batch["prompt"], batch["prompt_valid"]
        if plan_tokens > 0:
            plan, plan_valid, fwd = ar_plan(planner, prompt, pv, plan_tokens=plan_tokens, stop_tokens=stop,
                                            pad_id=sp.pad)
            prompt, pv = compose_prompt(prompt, pv, plan, plan_valid, placement=placement, bos_id=sp.bos,
                                        sep_ids=encode(tok, sep), pad_id=sp.pad)
            ar_fwd += fwd * prompt.shape[0]  # every row takes part in the batch's planner forwards
        else:
            plan = np.zeros((prompt.shape[0], 0), np.int32)
            plan_valid = np.zeros((prompt.shape[0], 0), bool)
        out = diffusion_generate(model, prompt, pv, gen_len=gen_len, policy=policy, policy_args=args, heads=heads,
                                 temperature=0.0, rng=jax.random.fold_in(key, i), stop_tokens=stop, pad_id=sp.pad,
                                 attention=cfg.model.attention, block_size=cfg.model.block_size)
        tokens = np.asarray(out.tokens)
        wall += time.perf_counter() - t0
        nfe += int(np.asarray(out.nfe).sum())
        for r in range(tokens.shape[0]):
            ex = task.example("eval", int(batch["index"][r]))
            head = plan[r][plan_valid[r]].tolist() if placement == "after" else []
            text = decode(tok, head + tokens[r].tolist())
            ok = task.reward(text, ex) >= 1.0
            hits += ok
            fmt += bool(task.format_ok(text))
            plan_len += int(plan_valid[r].sum())
            total += 1
            if len(samples) < 8:
                samples.append({"prompt": ex.prompt, "plan": decode(tok, plan[r][plan_valid[r]].tolist()),
                                "completion": text, "answer": ex.answer, "correct": bool(ok)})
    metrics = {"plan_tokens": plan_tokens, "placement": placement, "policy": policy,
               "exact_match": hits / max(total, 1), "format_ok": fmt / max(total, 1),
               "mean_nfe": nfe / max(total, 1), "mean_plan_len": plan_len / max(total, 1),
               "planner_forwards": ar_fwd / max(total, 1), "wall_s": wall, "num_examples": total}
    return metrics, samples


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config
    from jaxtok.metrics import write_results
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import load_tokenizer_for

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a diffusion decode config (model.init_from = the diffusion LM)")
    ap.add_argument("overrides", nargs="*", help="key.subkey=value config overrides")
    ap.add_argument("--planner", default=None, help="AR run directory (default: decode.draft_init_from)")
    ap.add_argument("--plan-tokens", type=int, nargs="+", default=None,
                    help="plan lengths to compare (default: 0 and decode.draft_len)")
    ap.add_argument("--placement", nargs="+", choices=PLACEMENTS, default=["after"])
    ap.add_argument("--eval", type=int, default=0, help="held-out prompts (default data.num_eval)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    planner_path = a.planner or cfg.decode.draft_init_from
    if not cfg.model.init_from or not planner_path:
        raise SystemExit("set model.init_from=<diffusion run> and --planner / decode.draft_init_from=<AR run>")
    model, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype, diffusion=True)
    planner, _ = load_any(planner_path, key="--planner / decode.draft_init_from", dtype=cfg.model.dtype)
    tok = load_tokenizer_for(cfg)
    task = make_task_from_config(cfg.data)
    ks = a.plan_tokens if a.plan_tokens is not None else [0, cfg.decode.draft_len]
    table = []
    for placement in a.placement:
        for k in ks:
            if k == 0 and placement != a.placement[0]:
                continue  # the baseline does not depend on the placement
            m, samples = evaluate_plan(cfg, model, planner, tok, task, plan_tokens=k, placement=placement,
                                       num_examples=a.eval or None)
            table.append(m)
            print(json.dumps(m), flush=True)
            print("  e.g.", json.dumps(samples[:2]), flush=True)

    def draw(ax):
        for placement in a.placement:
            rows = [r for r in table if r["placement"] == placement or r["plan_tokens"] == 0]
            ax.plot([r["plan_tokens"] for r in rows], [r["exact_match"] for r in rows], marker="o", label=placement)
        ax.set_xlabel("plan tokens from the AR planner")
        ax.set_ylabel("exact match")
        ax.legend()

    results = {"init_from": cfg.model.init_from, "planner": planner_path, "policy": cfg.decode.policy or "llada",
               "policy_args": dict(cfg.decode.policy_args), "budget": cfg.decode.max_new_tokens, "rows": table,
               "device": jax.devices()[0].device_kind}
    write_results(a.out, results, table, title="plan conditioning: exact match with vs without an AR plan",
                  plots={"exact_match_vs_plan": draw})
    return table


if __name__ == "__main__":
    main()
