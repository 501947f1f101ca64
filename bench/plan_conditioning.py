"""``plan_conditioning`` benchmark ("Think First, Diffuse Fast", decode_methods.md §B22): held-out exact match of a
diffusion LM with and without an AR planner's plan in its prompt (:mod:`jaxtok.decode.plan_conditioning`), for each
plan length and placement.

The config is a diffusion decode config: ``model.init_from`` = the diffusion LM, ``decode.policy``/``policy_args``
the sampler, ``decode.max_new_tokens`` the response budget; ``bench.args.planner`` (default
``decode.draft_init_from``) the AR planner. Writes ``results.{json,md}`` and ``exact_match_vs_plan.png``::

    jaxtok bench configs/bench/plan_conditioning.yaml model.init_from=runs/zoo/diffusion
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from jaxtok.data import prompt_dataset
from jaxtok.decode.diffusion import diffusion_generate, policy_and_heads, stop_ids_of
from jaxtok.decode.plan_conditioning import PLACEMENTS, ar_plan, compose_prompt
from jaxtok.registry import BENCHES, ConfigError
from jaxtok.tasks.tokenizer import SpecialTokens, decode, encode

from .plots import draw_exact_match_vs_plan


@dataclasses.dataclass(frozen=True)
class PlanConditioningArgs:
    """``planner``: run directory of the AR planner (default ``decode.draft_init_from``); ``plan_tokens``: the plan
    lengths compared (0 = no plan; default ``[0, decode.draft_len]``); ``placements``: where the plan goes
    (:data:`jaxtok.decode.plan_conditioning.PLACEMENTS`); ``num_examples``: held-out prompts per row (default
    ``data.num_eval``)."""

    planner: Optional[str] = None
    plan_tokens: Optional[tuple[int, ...]] = None
    placements: tuple[str, ...] = ("after",)
    num_examples: Optional[int] = None

    def __post_init__(self):
        bad = [p for p in self.placements if p not in PLACEMENTS]
        if bad or not self.placements:
            raise ValueError(f"placements={list(self.placements)}: allowed {list(PLACEMENTS)} (at least one)")
        if self.plan_tokens is not None and (not self.plan_tokens or min(self.plan_tokens) < 0):
            raise ValueError(f"plan_tokens={self.plan_tokens}: non-negative integers (0 = no plan)")


def evaluate_plan(cfg, model, planner, tok, task, *, plan_tokens: int, placement: str = "after",
                  policy: Optional[str] = None, policy_args=None, num_examples: Optional[int] = None,
                  sep: str = ";") -> tuple[dict, list[dict]]:
    """Held-out exact match of the diffusion LM with a ``plan_tokens``-token AR plan (0: no plan).

    Settings as :func:`jaxtok.decode.evaluate.evaluate_policy` (``decode.max_new_tokens`` = the response budget:
    with ``after`` the diffusion LM generates ``max_new_tokens − k`` positions). Returns ``(metrics, samples)``:
    ``exact_match``, ``format_ok``, ``mean_nfe`` (diffusion forwards per row), ``planner_forwards`` (AR forwards per row),
    ``mean_plan_len``, ``wall_s``, ``num_examples``."""
    sp = SpecialTokens.of(tok)
    policy = policy or cfg.decode.policy or "llada"
    policy, heads = policy_and_heads(policy, policy_args if policy_args is not None
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
        out = diffusion_generate(model, prompt, pv, gen_len=gen_len, policy=policy, heads=heads,
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
    metrics = {"plan_tokens": plan_tokens, "placement": placement, "policy": policy.name,
               "exact_match": hits / max(total, 1), "format_ok": fmt / max(total, 1),
               "mean_nfe": nfe / max(total, 1), "mean_plan_len": plan_len / max(total, 1),
               "planner_forwards": ar_fwd / max(total, 1), "wall_s": wall, "num_examples": total}
    return metrics, samples


@BENCHES.register("plan_conditioning", PlanConditioningArgs)
def plan_conditioning_bench(cfg, run_dir: str | Path, args: PlanConditioningArgs) -> dict:
    """Exact match of the diffusion LM at ``model.init_from`` for every plan length × placement of ``args`` (the
    ``k = 0`` baseline once: it does not depend on the placement); writes ``results.json``, the table and
    ``exact_match_vs_plan.png``."""
    from jaxtok.data import make_task_from_config
    from jaxtok.metrics import write_results
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import load_tokenizer_for

    planner_path = args.planner or cfg.decode.draft_init_from
    if not cfg.model.init_from or not planner_path:
        raise ConfigError("bench 'plan_conditioning' needs model.init_from=<diffusion run> and "
                          "bench.args.planner or decode.draft_init_from=<AR run>")
    model, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype, diffusion=True)
    planner, _ = load_any(planner_path, key="bench.args.planner / decode.draft_init_from", dtype=cfg.model.dtype)
    tok = load_tokenizer_for(cfg)
    task = make_task_from_config(cfg.data)
    ks = list(args.plan_tokens) if args.plan_tokens is not None else [0, cfg.decode.draft_len]
    table = []
    for placement in args.placements:
        for k in ks:
            if k == 0 and placement != args.placements[0]:
                continue  # the baseline does not depend on the placement
            m, samples = evaluate_plan(cfg, model, planner, tok, task, plan_tokens=k, placement=placement,
                                       num_examples=args.num_examples)
            table.append(m)
            print(json.dumps(m), flush=True)
            print("  e.g.", json.dumps(samples[:2]), flush=True)

    results = {"bench": "plan_conditioning", "init_from": cfg.model.init_from, "planner": planner_path,
               "policy": cfg.decode.policy or "llada", "policy_args": dict(cfg.decode.policy_args),
               "budget": cfg.decode.max_new_tokens, "rows": table, "device": jax.devices()[0].device_kind}
    write_results(run_dir, results, table, title="plan conditioning: exact match with vs without an AR plan",
                  plots={"exact_match_vs_plan": functools.partial(draw_exact_match_vs_plan, table,
                                                                  args.placements)})
    return {"rows": table}
