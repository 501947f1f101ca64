"""``diffusion`` benchmark: held-out accuracy against NFE and wall-clock for a list of commit policies
(:mod:`jaxtok.decode.commit_policies`) on one trained masked-diffusion model."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Optional

import jax

from jaxtok.decode.diffusion import policy_and_heads
from jaxtok.decode.evaluate import evaluate_policy
from jaxtok.registry import BENCHES, ConfigError

from .plots import draw_accuracy_vs_nfe


DEFAULT_BENCH_RUNS = (
    {"label": "llada 1 tok/step", "policy": "llada", "args": {}},
    {"label": "threshold 0.9", "policy": "threshold", "args": {"threshold": 0.9}},
    {"label": "threshold 0.7", "policy": "threshold", "args": {"threshold": 0.7}},
    {"label": "factor 1", "policy": "factor", "args": {"factor": 1.0}},
    {"label": "prophet", "policy": "prophet", "args": {"gaps": [7.5, 5.0, 2.5]}},
    {"label": "adablock", "policy": "adablock", "args": {"threshold": 0.9}},
    {"label": "eoser", "policy": "eoser", "args": {}},
    {"label": "ass", "policy": "ass", "args": {}},
    {"label": "ete", "policy": "ete", "args": {"threshold": 0.9}},
    {"label": "bacd", "policy": "bacd", "args": {}},
)


@dataclasses.dataclass(frozen=True)
class DiffusionBenchArgs:
    """``runs``: ``{label, policy, args}`` entries (default :data:`DEFAULT_BENCH_RUNS`); ``num_examples``: held-out
    prompts per run (default ``data.num_eval``)."""

    runs: tuple = DEFAULT_BENCH_RUNS
    num_examples: Optional[int] = None


@BENCHES.register("diffusion", DiffusionBenchArgs)
def diffusion_bench(cfg, run_dir, args: DiffusionBenchArgs) -> dict:
    """Accuracy against NFE and wall-clock for each run of ``args.runs`` on the model at ``model.init_from``
    (decode_methods.md (b): NFE per token and accuracy vs one token per step); writes ``results.json``, the table and
    ``accuracy_vs_nfe.png``."""
    from jaxtok.data import make_task_from_config
    from jaxtok.metrics import write_results
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import load_tokenizer_for

    if not cfg.model.init_from:
        raise ConfigError("bench 'diffusion' needs model.init_from=<run dir of a trained diffusion model>")
    model, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype, diffusion=True)
    tok = load_tokenizer_for(cfg)
    task = make_task_from_config(cfg.data)
    table = []
    for run in args.runs:
        if set(run) - {"label", "policy", "args"} or "policy" not in run:
            raise ConfigError(f"bench.args.runs: entry {run!r} needs 'policy' and may have 'label', 'args'")
        policy, heads = policy_and_heads(run["policy"], dict(run.get("args") or {}))
        m, _ = evaluate_policy(cfg, model, tok, task, policy=policy, heads=heads,
                               num_examples=args.num_examples)
        table.append({"run": run.get("label", run["policy"]), **{k: v for k, v in m.items() if k != "policy"}})
    base = table[0]
    for row in table:
        row["nfe_speedup"] = base["mean_nfe"] / max(row["mean_nfe"], 1e-9)
        row["wall_speedup"] = base["wall_s"] / max(row["wall_s"], 1e-9)

    results = {"bench": "diffusion", "init_from": cfg.model.init_from, "gen_len": cfg.decode.max_new_tokens,
               "device": jax.devices()[0].device_kind, "rows": table}
    write_results(run_dir, results, table, title="diffusion policies: accuracy vs NFE",
                  plots={"accuracy_vs_nfe": functools.partial(draw_accuracy_vs_nfe, table)})
    return results


def replot_accuracy_vs_nfe(results_json, png, command: str):
    """Redraw :func:`jaxtok.bench.plots.draw_accuracy_vs_nfe` from a written ``results.json`` (``rows``) into
    ``png``, captioned with ``command`` (the command that made the results); no decoding."""
    from jaxtok.metrics import save_plot

    rows = json.loads(Path(results_json).read_text())["rows"]
    return save_plot(png, functools.partial(draw_accuracy_vs_nfe, rows), command=command)
