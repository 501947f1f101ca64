"""RL comparison bench (issue #5, ``train_methods.md`` §6-7): policy-gradient loss modes and ReasonMaxxer trained from
one SFT student, read back from their per-step metrics into curves.

``bench.name: rl_compare`` trains every ``variant`` × ``seed`` (each variant is an experiment config such as
``configs/rl/grpo.yaml`` plus overrides; ``common`` overrides and the bench config's ``model.init_from`` apply to all
of them, so equal rollout budgets are set in one place) and reports:

* held-out greedy exact match against the optimizer step (``eval/exact_match`` records of ``metrics.jsonl``, step 0
  from the start model's evaluation), mean and spread over seeds;
* the clip rate by response position (:func:`clip_by_position`): policy-gradient runs log ``clip_frac_pos{i}`` with
  one bucket per token column (the bench sets ``num_position_buckets`` to the rollout length ``prompt_len +
  max_new_tokens``, so bucket ``t`` is response token ``t``); averaged over the optimizer steps that reuse a rollout
  batch (the first step on a fresh batch has ratio 1 and clips nothing);
* CPPO's rejections split into token-threshold and prefix-budget ones (:func:`cppo_rejections`), overall and over
  the first and second half of training;
* training FLOPs (:func:`run_flops`, model FLOPs of :func:`jaxtok.models.flops_per_token`): rollout sampling and the
  behaviour log-prob forward per rollout batch, 3x forward per optimizer step and one forward of the frozen
  reference when the objective uses it; evaluation is not counted. Accuracy gain per FLOP = (final − start held-out
  exact match) / training FLOPs.

Runs live in ``<run.cache_dir>/rl_runs/<variant>-s<seed>-<key>`` where ``key`` hashes the resolved run config
(:func:`jaxtok.recipe.stage_key`), so a finished run (``summary.json`` present) is reused by any later bench that asks
for the same config, and a changed config trains a new one. ``publish: docs/results/rl`` also writes
``rl.json``, ``rl.md`` and ``rl_<plot>.png`` there, with ``command`` at the top of the markdown.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from jaxtok.registry import BENCHES, ConfigError

from .plots import rl_plots, save_plots

__all__ = ["RLCompareArgs", "eval_curve", "reuse_steps", "clip_by_position", "cppo_rejections", "run_flops",
           "flops_curve", "position_coverage", "first_last_quarter", "mean_sd", "rl_compare_bench"]

EVAL_KEY = "eval/exact_match"


@dataclasses.dataclass(frozen=True)
class RLCompareArgs:
    """``variants``: ``{name: {config: path, overrides: [key=value, ...]}}`` (paths relative to the working
    directory); ``seeds``: ``train.seed`` of every variant's runs; ``common``: overrides applied to every variant
    before its own; ``baseline``: a directory holding the start model's ``eval.json`` (a recipe ``eval`` stage),
    "" = evaluate the start model here; ``reference``: the variant that gains per FLOP are compared against;
    ``min_coverage``: positions shown in the clip curve are those reached by at least this share of the reference
    completions (a position most rows never reach would average in steps where it had no token);
    ``publish``: path prefix for the docs copy ("" = none); ``command``: the command line written above it."""

    variants: dict = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    common: tuple[str, ...] = ()
    baseline: str = ""
    reference: str = "grpo"
    min_coverage: float = 0.25
    publish: str = ""
    command: str = ""

    def __post_init__(self):
        if not self.variants:
            raise ConfigError("bench.args.variants: give at least one {name: {config: ..., overrides: [...]}}")
        for name, spec in self.variants.items():
            if not isinstance(spec, Mapping) or "config" not in spec or set(spec) - {"config", "overrides"}:
                raise ConfigError(f"bench.args.variants.{name}={spec!r}: expected {{config: path, overrides: [...]}}")
            ov = spec.get("overrides") or []
            if not isinstance(ov, (list, tuple)) or not all(isinstance(o, str) and "=" in o for o in ov):
                raise ConfigError(f"bench.args.variants.{name}.overrides={ov!r}: a list of 'key=value' strings")
        if not self.seeds:
            raise ConfigError("bench.args.seeds: at least one")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ConfigError(f"bench.args.min_coverage={self.min_coverage!r} must be in [0, 1]")


# ----------------------------------------------------------------------------------------------------------------
# reading per-step metrics (pure functions of metrics.jsonl records)


def eval_curve(records: Sequence[Mapping], key: str = EVAL_KEY) -> dict[int, float]:
    """``{step: value}`` of the records carrying ``key`` (the last record wins for a repeated step)."""
    return {int(r["step"]): float(r[key]) for r in records if r.get(key) is not None}


def reuse_steps(steps: Sequence[int], inner_epochs: int) -> list[int]:
    """The optimizer steps that reuse a rollout batch: ``(step − 1) mod μ ≠ 0`` (step 1 samples a fresh batch)."""
    if inner_epochs < 1:
        raise ValueError(f"inner_epochs={inner_epochs!r} must be ≥ 1")
    return [s for s in steps if (s - 1) % inner_epochs != 0]


def _train_records(records: Sequence[Mapping], key: str) -> dict[int, Mapping]:
    return {int(r["step"]): r for r in records if key in r}


def clip_by_position(records: Sequence[Mapping], inner_epochs: int) -> Optional[np.ndarray]:
    """Mean clip fraction per position bucket ``[nb]`` over the logged steps that reuse a rollout batch (a step's
    value is its token-weighted fraction); None when the run logs no ``clip_frac_pos*`` or has no such step."""
    by_step = _train_records(records, "clip_frac_pos0")
    if not by_step:
        return None
    nb = 1 + max(int(k[len("clip_frac_pos"):]) for r in by_step.values() for k in r if k.startswith("clip_frac_pos"))
    steps = reuse_steps(sorted(by_step), inner_epochs)
    if not steps:
        return None
    return np.array([[float(by_step[s].get(f"clip_frac_pos{i}", 0.0)) for i in range(nb)] for s in steps]).mean(0)


def cppo_rejections(records: Sequence[Mapping], inner_epochs: int) -> Optional[dict]:
    """CPPO rejections over the steps that reuse a rollout batch: token-threshold and prefix-budget fractions of
    tokens (means over steps) and the budget share ``Σ budget / Σ (token + budget)``, overall and for the first and
    second half of those steps, with the budget fraction per half (the paper: budget rejections concentrate early).
    None for non-CPPO runs."""
    by_step = _train_records(records, "cppo_budget_reject_frac")
    steps = reuse_steps(sorted(by_step), inner_epochs)
    if not steps:
        return None

    def part(ss):
        tok = np.array([by_step[s]["cppo_token_reject_frac"] for s in ss], float)
        bud = np.array([by_step[s]["cppo_budget_reject_frac"] for s in ss], float)
        total = tok.sum() + bud.sum()
        return {"token_reject_frac": float(tok.mean()), "budget_reject_frac": float(bud.mean()),
                "budget_share": float(bud.sum() / total) if total > 0 else 0.0}

    half = len(steps) // 2
    out = part(steps)
    first, second = (part(steps[:half]) if half else out), part(steps[half:])
    for name, p in (("first_half", first), ("second_half", second)):
        out[f"budget_reject_frac_{name}"] = p["budget_reject_frac"]
        out[f"budget_share_{name}"] = p["budget_share"]
    return out


def position_coverage(lengths: Sequence[int], num_positions: int) -> np.ndarray:
    """Share of completions (token lengths ``lengths``) that reach each response position ``0..num_positions-1``."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return np.zeros(num_positions)
    return np.array([(lengths > t).mean() for t in range(num_positions)])


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def run_flops(forward_per_token: float, rows: int, seq_len: int, steps: int, inner_epochs: int,
              reference_forward: bool) -> dict:
    """Training model FLOPs of one rollout run (module docstring). Per rollout batch of ``rows × seq_len`` tokens:
    sampling (counted as one forward over every column, prompt prefill and the static ``max_new_tokens`` decode) and
    the behaviour log-prob forward; per optimizer step: 3x forward (forward + backward) plus one reference forward
    when ``reference_forward``. Returns ``{rollout, update, total}``."""
    if min(rows, seq_len, inner_epochs) < 1 or steps < 0:
        raise ValueError("rows, seq_len, inner_epochs ≥ 1 and steps ≥ 0")
    tokens = rows * seq_len
    batches = math.ceil(steps / inner_epochs)
    rollout = batches * 2 * tokens * forward_per_token
    update = steps * (3 + int(reference_forward)) * tokens * forward_per_token
    return {"rollout": float(rollout), "update": float(update), "total": float(rollout + update)}


def flops_curve(steps: Sequence[int], **kw) -> list[float]:
    """Cumulative training FLOPs after each of ``steps`` (:func:`run_flops` with ``steps=s``)."""
    return [run_flops(steps=int(s), **kw)["total"] for s in steps]


def mean_sd(values: Sequence[float]) -> tuple[Optional[float], float]:
    """``(mean, population sd)`` of the non-None values; ``(None, 0)`` when there are none."""
    v = np.array([x for x in values if x is not None], float)
    if v.size == 0:
        return None, 0.0
    return float(v.mean()), float(v.std())


# ----------------------------------------------------------------------------------------------------------------
# running


def _variant_config(args: RLCompareArgs, name: str, seed: int, init_from: str, seq_len: Optional[int] = None):
    """The run plan of variant ``name`` with ``seed`` from ``init_from`` (validated once, input paths checked)."""
    from jaxtok.config import check_paths, load_config, validate_names

    spec = args.variants[name]
    path = Path(spec["config"])
    if not path.is_file():
        raise ConfigError(f"bench.args.variants.{name}.config={spec['config']!r}: no such file (relative to the "
                          f"working directory {Path.cwd()})")
    ov = [*args.common, *(spec.get("overrides") or []), f"model.init_from={init_from}", f"train.seed={seed}",
          "run.progress=false"]
    cfg = load_config(path, ov)
    if cfg.objective.name == "policy_gradient" and "num_position_buckets" not in cfg.objective.args:
        buckets = cfg.data.prompt_len + cfg.rollout.max_new_tokens  # one bucket per token column
        cfg = load_config(path, [*ov, f"objective.args.num_position_buckets={buckets}"])
    plan = validate_names(cfg)
    check_paths(cfg)
    return plan


def _uses_reference(cfg) -> bool:
    args = dict(cfg.objective.args)
    if cfg.objective.name == "reasonmaxxer":
        return True  # KL anchor and entropy gate read the frozen base
    return cfg.rollout.reference != "none" and float(args.get("kl_coef", 0.0)) > 0


def _train_run(plan, run_dir: Path) -> tuple[dict, float]:
    """Train the run plan into ``run_dir`` unless a finished run is there; ``(summary, wall seconds or nan)``."""
    from jaxtok.config import to_yaml
    from jaxtok.train.loop import train

    done = run_dir / "summary.json"
    if done.exists() and (run_dir / "wall_s.json").exists():
        return json.loads(done.read_text()), float(json.loads((run_dir / "wall_s.json").read_text()))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(plan.cfg))
    t0 = time.perf_counter()
    summary = train(plan, run_dir)
    wall = time.perf_counter() - t0
    (run_dir / "wall_s.json").write_text(json.dumps(wall))
    return summary, wall


def _start_accuracy(args: RLCompareArgs, cfg, run_dir: Path) -> float:
    if args.baseline:
        path = Path(args.baseline) / "eval.json"
        if not path.is_file():
            raise ConfigError(f"bench.args.baseline={args.baseline!r}: no eval.json there")
        return float(json.loads(path.read_text())[EVAL_KEY])
    from jaxtok.train.loop import evaluate

    return float(evaluate(cfg, run_dir / "start_eval")[EVAL_KEY])


def _reference_completions(cfg) -> tuple[list[int], list[str]]:
    """Token lengths of the reference completions (SFT loss tokens) of the held-out split, and the first one's tokens
    as text (labels the positions of the clip table)."""
    from jaxtok.data import make_task_from_config, sft_dataset
    from jaxtok.tasks.tokenizer import decode
    from jaxtok.train.loop import load_tokenizer_for

    tok = load_tokenizer_for(cfg)
    ds, _ = sft_dataset(make_task_from_config(cfg.data), "eval", tok, seq_len=cfg.data.seq_len,
                        batch_size=cfg.data.batch_size, num_examples=max(cfg.data.num_eval, cfg.data.batch_size),
                        seed=0, shuffle=False, num_epochs=1, overlong=cfg.data.overlong)
    lengths, example = [], []
    for batch in ds:
        mask = np.asarray(batch["loss_mask"])
        lengths += [int(n) for n in mask.sum(axis=1)]
        if not example:
            example = [decode(tok, [int(i)], stop_at_eos=False) or "<eos>"
                       for i in np.asarray(batch["tokens"])[0][mask[0]]]
    return lengths, example


@BENCHES.register("rl_compare", RLCompareArgs)
def rl_compare_bench(cfg, run_dir: str | Path, args: RLCompareArgs) -> dict:
    """Train and compare the RL variants of ``args`` from ``cfg.model.init_from`` (module docstring)."""
    from jaxtok.metrics import read_jsonl, write_results
    from jaxtok.models import flops_per_token
    from jaxtok.recipe import stage_key
    from jaxtok.train.loop import load_model

    run_dir = Path(run_dir)
    if not cfg.model.init_from:
        raise ConfigError("model.init_from: the SFT student every RL variant starts from is required")
    if args.reference not in args.variants:
        raise ConfigError(f"bench.args.reference={args.reference!r}: not one of the variants {list(args.variants)}")
    configs = {(v, s): _variant_config(args, v, s, cfg.model.init_from) for v in args.variants for s in args.seeds}
    pool = Path(cfg.run.cache_dir) / "rl_runs"
    start_acc = _start_accuracy(args, cfg, run_dir)
    student, _ = load_model(cfg.model.init_from)
    model_cfg = student.cfg
    del student

    runs = []
    for (variant, seed), vplan in configs.items():
        vcfg = vplan.cfg
        out = pool / f"{variant}-s{seed}-{stage_key(vcfg, 'train', [])}"
        print(f"[rl_compare] {variant} seed {seed}: {out}", flush=True)
        summary, wall = _train_run(vplan, out)
        records = read_jsonl(out / "metrics.jsonl")
        T = vcfg.data.prompt_len + vcfg.rollout.max_new_tokens
        fkw = dict(forward_per_token=flops_per_token(model_cfg, T).forward, rows=vcfg.data.batch_size, seq_len=T,
                   inner_epochs=vcfg.rollout.inner_epochs, reference_forward=_uses_reference(vcfg))
        curve = {0: start_acc, **eval_curve(records)}
        runs.append({"variant": variant, "seed": seed, "dir": str(out), "wall_s": wall,
                     "steps": vcfg.train.steps, "final": summary.get(EVAL_KEY), "curve": curve,
                     "flops": run_flops(steps=vcfg.train.steps, **fkw),
                     "flops_curve": dict(zip(curve, flops_curve(list(curve), **fkw))),
                     "clip_by_position": clip_by_position(records, vcfg.rollout.inner_epochs),
                     "cppo": cppo_rejections(records, vcfg.rollout.inner_epochs),
                     "clip_frac": _mean_over_reuse(records, "clip_frac", vcfg.rollout.inner_epochs),
                     "rollout_em": first_last_quarter(records, "rollout/exact_match", vcfg.rollout.inner_epochs),
                     "decision_frac": _mean_over_reuse(records, "decision_frac", None),
                     "kept_rows": _mean_over_reuse(records, "kept_rows", None)})

    any_cfg = next(iter(configs.values())).cfg
    T = any_cfg.data.prompt_len + any_cfg.rollout.max_new_tokens
    lengths, example = _reference_completions(any_cfg)
    coverage = position_coverage(lengths, T)
    shown = [t for t in range(T) if coverage[t] >= args.min_coverage]
    table, clip_curves, acc_curves, flop_curves, cppo = _tabulate(args, runs, start_acc)
    for v, c in clip_curves.items():
        clip_curves[v] = [c[t] for t in shown]
    results = {"bench": "rl_compare", "start_model": cfg.model.init_from, "start_exact_match": start_acc,
               "seeds": list(args.seeds), "variants": {k: dict(v) for k, v in args.variants.items()},
               "common": list(args.common), "table": table, "accuracy_curves": acc_curves,
               "flops_curves": flop_curves, "clip_positions": shown,
               "position_coverage": [float(coverage[t]) for t in shown], "clip_by_position": clip_curves,
               "example_completion": [example[t] if t < len(example) else "" for t in shown],
               "cppo": cppo, "runs": [_plain_run(r) for r in runs], "command": args.command}
    plots = rl_plots(acc_curves, clip_curves, shown, flop_curves, start_acc, args.reference)
    title = f"RL comparison from {cfg.model.init_from} (held-out greedy exact match; seeds {list(args.seeds)})"
    write_results(run_dir, results, table, title=title, plots=plots)
    md = _markdown(results, table, title)
    (run_dir / "results.md").write_text(md)
    if args.publish:
        _publish(Path(args.publish), run_dir, results, md, plots)
    ref = next(r for r in table if r["variant"] == args.reference)
    return {"start_exact_match": start_acc, f"{args.reference}/final": ref["final"],
            "best_variant": max(table, key=lambda r: r["final"] or -1)["variant"]}


def first_last_quarter(records: Sequence[Mapping], key: str, inner_epochs: int) -> tuple[Optional[float], ...]:
    """Means of a per-rollout-batch metric ``key`` over the first and the last quarter of the rollout batches (the
    logged steps that sample a fresh batch; all logged steps when none of those is logged)."""
    by_step = _train_records(records, key)
    fresh = [s for s in sorted(by_step) if (s - 1) % inner_epochs == 0] or sorted(by_step)
    if not fresh:
        return None, None
    vals = [float(by_step[s][key]) for s in fresh]
    k = max(len(vals) // 4, 1)
    return float(np.mean(vals[:k])), float(np.mean(vals[-k:]))


def _mean_over_reuse(records, key, inner_epochs: Optional[int]):
    """Mean of ``key`` over the logged steps that reuse a rollout batch (``inner_epochs=None``: all steps)."""
    by_step = _train_records(records, key)
    steps = sorted(by_step) if inner_epochs is None else reuse_steps(sorted(by_step), inner_epochs)
    return float(np.mean([by_step[s][key] for s in steps])) if steps else None


def _plain_run(r: dict) -> dict:
    out = dict(r)
    out["curve"] = {str(k): v for k, v in r["curve"].items()}
    out["flops_curve"] = {str(k): v for k, v in r["flops_curve"].items()}
    if r["clip_by_position"] is not None:
        out["clip_by_position"] = [float(x) for x in r["clip_by_position"]]
    return out


def _tabulate(args: RLCompareArgs, runs: list, start_acc: float):
    table, clip_curves, acc_curves, flop_curves, cppo = [], {}, {}, {}, {}
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        final, final_sd = mean_sd([r["final"] for r in mine])
        flops = float(np.mean([r["flops"]["total"] for r in mine]))
        gain = None if final is None else final - start_acc
        clip, _ = mean_sd([r["clip_frac"] for r in mine])
        row = {"variant": variant, "seeds": len(mine), "steps": mine[0]["steps"], "final": final, "final_sd": final_sd,
               "gain_pp": None if gain is None else 100 * gain, "train_tflops": flops / 1e12,
               "gain_pp_per_tflop": None if gain is None else 100 * gain / (flops / 1e12),
               "clip_frac": clip, "rollout_em_first_q": mean_sd([r["rollout_em"][0] for r in mine])[0],
               "rollout_em_last_q": mean_sd([r["rollout_em"][1] for r in mine])[0],
               "wall_s": mean_sd([r["wall_s"] for r in mine])[0]}
        dec = mean_sd([r["decision_frac"] for r in mine])[0]
        if dec is not None:
            row["decision_frac"] = dec
        table.append(row)
        steps = sorted(set().union(*[r["curve"] for r in mine]))
        acc_curves[variant] = {"step": steps,
                               "mean": [mean_sd([r["curve"].get(s) for r in mine])[0] for s in steps],
                               "sd": [mean_sd([r["curve"].get(s) for r in mine])[1] for s in steps]}
        flop_curves[variant] = [float(np.mean([r["flops_curve"][s] for r in mine if s in r["flops_curve"]]))
                                for s in steps]
        clips = [r["clip_by_position"] for r in mine if r["clip_by_position"] is not None]
        if clips:
            clip_curves[variant] = [float(x) for x in np.mean(clips, axis=0)]
        rej = [r["cppo"] for r in mine if r["cppo"]]
        if rej:
            cppo[variant] = {k: mean_sd([x[k] for x in rej])[0] for k in rej[0]}
    return table, clip_curves, acc_curves, flop_curves, cppo


def replot(results_json: str | Path, prefix: str | Path, command: Optional[str] = None,
           reference: str = RLCompareArgs.reference) -> list:
    """Redraw the bench's plots (:func:`jaxtok.bench.plots.rl_plots`) from a written results JSON (e.g.
    ``docs/results/rl.json``) into ``<prefix>_<plot>.png``, captioned with ``command`` (default: the JSON's
    ``command``); no training."""
    res = json.loads(Path(results_json).read_text())
    plots = rl_plots(res["accuracy_curves"], res["clip_by_position"], res["clip_positions"], res["flops_curves"],
                     res["start_exact_match"], reference)
    return save_plots(plots, prefix, res.get("command") if command is None else command)


def _markdown(results: dict, table: list, title: str) -> str:
    from jaxtok.metrics import markdown_table

    lines = [f"# {title}", ""]
    if results["command"]:
        lines += ["```", results["command"], "```", ""]
    lines += [f"Start model `{results['start_model']}`: held-out exact match {results['start_exact_match']:.4f}.", "",
              markdown_table(table), ""]
    if results["clip_by_position"]:
        pos = results["clip_positions"]
        rows = [{"variant": v, **{f"t={t + 1}": c[i] for i, t in enumerate(pos)}}
                for v, c in results["clip_by_position"].items()]
        cover = {"variant": "(coverage)", **{f"t={t + 1}": x for t, x in zip(pos, results["position_coverage"])}}
        ex = {"variant": "(example)", **{f"t={t + 1}": f"`{x}`" for t, x in zip(pos, results["example_completion"])}}
        lines += ["Clip (CPPO: mask-rejection) rate by response position, steps that reuse a rollout batch "
                  "(coverage: share of reference completions reaching the position; example: one reference "
                  "completion):", "", markdown_table([*rows, cover, ex]), ""]
    if results["cppo"]:
        lines += ["CPPO rejections (fractions of response tokens; budget share = prefix-budget / all rejections):",
                  "", markdown_table([{"variant": v, **x} for v, x in results["cppo"].items()]), ""]
    return "\n".join(lines)


def _publish(prefix: Path, run_dir: Path, results: dict, md: str, plots: dict) -> None:
    """``<prefix>.json``, ``<prefix>.md`` (plot links appended) and ``<prefix>_<plot>.png`` (copies of the run's)."""
    import shutil

    prefix.parent.mkdir(parents=True, exist_ok=True)
    links = []
    for name in plots:
        dst = prefix.parent / f"{prefix.name}_{name}.png"
        shutil.copyfile(run_dir / f"{name}.png", dst)
        links.append(f"![{name}]({dst.name})")
    prefix.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    prefix.with_suffix(".md").write_text(md + "\n" + "\n".join(links) + "\n")
