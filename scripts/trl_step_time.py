"""Step time of jaxtok against TRL on the proving-ground settings, side by side and interleaved (issue 14, item 3).

The proving ground's GRPO (``configs/testbed/grpo.yaml``: 128 prompts x 8 completions, 1024 rows per step) and
on-policy distillation (``configs/testbed/opd.yaml``: 64 prompts x 1 completion) steps, each run by

* jaxtok with its rollout batch cut to the longest row (``rollout.width_buckets`` = the config's, 4 by default),
* jaxtok with the full ``data.prompt_len + max_new_tokens`` width (``rollout.width_buckets=1``),
* jaxtok taking the behaviour log-probs from the sampler, without the scoring forward
  (``rollout.behaviour_logprobs=sampler``: what TRL does with one optimizer step per generation batch),
* TRL (``scripts/trl_compare.py train`` / ``scripts/trl_opd.py train``: ``GRPOTrainer`` / ``DistillationTrainer``
  mirroring the config, in the TRL venv),

one short run after another, all arms once per repeat, ``--repeats`` times (interleaved, so a change of machine load
hits every arm alike). A run's step time is the median of its logged per-step seconds without the first step
(compilation, or TRL's first step); evaluations are off. One step = sampling, scoring, rewards and one optimizer
step, as in the proving-ground runs.

    # after python scripts/trl_compare.py prepare --steps 250 and python scripts/trl_opd.py prepare --steps 200
    python scripts/trl_step_time.py --repeats 3 --out docs/results/trl_step_time

writes ``<out>.json`` (every run: arm, repeat, step seconds, load average before it; per arm the median over repeats;
per repeat the TRL / jaxtok ratios), ``<out>.table.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JAXTOK_ARMS = {"jaxtok": [], "jaxtok_full_width": ["rollout.width_buckets=1"],
               "jaxtok_sampler_logprobs": ["rollout.behaviour_logprobs=sampler"]}


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


def _median_after_first(xs: list[float]) -> float:
    if len(xs) < 3:
        raise RuntimeError(f"too few logged steps ({len(xs)}) to time")
    return float(statistics.median(xs[1:]))


def jaxtok_run(config: str, steps: int, overrides: list[str], work: Path, name: str) -> list[float]:
    """Per-step seconds of one ``jaxtok train`` run (``step_time_s`` of every logged step, log_every 1)."""
    run = work / name
    subprocess.run(["rm", "-rf", str(run)], check=True)
    cmd = ["jaxtok", "train", config, f"train.steps={steps}", "train.eval_every=0", "train.log_every=1",
           "train.checkpoint_every=0", f"run.out_dir={work}", f"run.name={name}", *overrides]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [float(r["step_time_s"]) for r in recs if "step_time_s" in r]


def trl_run(script: str, steps: int, python: str, threads: int, work: Path, name: str) -> list[float]:
    """Per-step seconds of one TRL run (``trl_run.json``'s ``step_seconds``)."""
    run = work / name
    subprocess.run(["rm", "-rf", str(run)], check=True)
    cmd = [python, f"scripts/{script}", "train", "--steps", str(steps), "--eval-every", "0", "--threads",
           str(threads), "--name", str(run)]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [float(x) for x in json.loads((run / "trl_run.json").read_text())["step_seconds"]]


SETTINGS = {  # name -> (jaxtok config, TRL script)
    "grpo": ("configs/testbed/grpo.yaml", "trl_compare.py"),
    "opd": ("configs/testbed/opd.yaml", "trl_opd.py"),
}


def measure(a) -> dict:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for rep in range(a.repeats):
        for setting in a.settings:
            config, script = SETTINGS[setting]
            steps = a.steps[setting]
            arms = [(arm, lambda o=o, arm=arm: jaxtok_run(config, steps, o, work, f"{setting}_{arm}"))
                    for arm, o in JAXTOK_ARMS.items()]
            arms.append(("trl", lambda: trl_run(script, steps, a.trl_python, a.threads, work, f"{setting}_trl")))
            if rep % 2:  # alternate the order between repeats
                arms = arms[::-1]
            for arm, fn in arms:
                load = os.getloadavg()[0]
                t0 = time.time()
                secs = fn()
                runs.append({"setting": setting, "arm": arm, "repeat": rep, "steps": steps, "load_before": load,
                             "started": t0, "step_s_median": _median_after_first(secs), "step_seconds": secs})
                print(f"repeat {rep} {setting:5s} {arm:18s} {runs[-1]['step_s_median']:.3f} s/step (load {load:.1f})",
                      flush=True)
    return summarize(runs, a)


def summarize(runs: list[dict], a) -> dict:
    out = {"command": "python scripts/trl_step_time.py " + " ".join(shlex.quote(x) for x in a.argv),
           "threads_trl": a.threads, "cpus": os.cpu_count(), "runs": runs, "settings": {}}
    for setting in sorted({r["setting"] for r in runs}):
        rs = [r for r in runs if r["setting"] == setting]
        arms = sorted({r["arm"] for r in rs})
        med = {arm: statistics.median(r["step_s_median"] for r in rs if r["arm"] == arm) for arm in arms}
        ratios = {}
        for arm in arms:
            if arm == "trl":
                continue
            per_rep = []
            for rep in sorted({r["repeat"] for r in rs}):
                pair = {r["arm"]: r["step_s_median"] for r in rs if r["repeat"] == rep}
                if arm in pair and "trl" in pair:
                    per_rep.append(pair["trl"] / pair[arm])
            ratios[f"trl_over_{arm}"] = {"per_repeat": per_rep, "median": statistics.median(per_rep) if per_rep else None}
        out["settings"][setting] = {"step_s_median": med, "ratios": ratios}
    return out


def table(res: dict) -> str:
    lines = ["| setting | arm | step s (median over repeats) | per repeat | TRL / arm (per repeat) |",
             "|---|---|---|---|---|"]
    for setting, s in res["settings"].items():
        for arm, m in s["step_s_median"].items():
            reps = [r["step_s_median"] for r in res["runs"] if r["setting"] == setting and r["arm"] == arm]
            rat = s["ratios"].get(f"trl_over_{arm}")
            rtxt = "—" if rat is None else f"**{rat['median']:.2f}x** ({', '.join(f'{x:.2f}' for x in rat['per_repeat'])})"
            lines.append(f"| {setting} | {arm} | {m:.3f} | {', '.join(f'{x:.3f}' for x in reps)} | {rtxt} |")
    loads = [r["load_before"] for r in res["runs"]]
    lines.append("")
    lines.append(f"Load average before the runs: {min(loads):.1f}-{max(loads):.1f} on {res['cpus']} CPUs; "
                 f"TRL torch threads {res['threads_trl']}. Made by: `{res['command']}`")
    return "\n".join(lines) + "\n"


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(res["settings"])
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False, layout="constrained")
    for ax, setting in zip(axes[0], settings):
        arms = list(res["settings"][setting]["step_s_median"])
        for i, arm in enumerate(arms):
            reps = [r["step_s_median"] for r in res["runs"] if r["setting"] == setting and r["arm"] == arm]
            ax.bar(i, res["settings"][setting]["step_s_median"][arm], color="tab:red" if arm == "trl" else "tab:blue",
                   alpha=0.7)
            ax.plot([i] * len(reps), reps, "ko", ms=3)
        ax.set_xticks(range(len(arms)), [a.replace("jaxtok_", "jaxtok\n") for a in arms], fontsize=8)
        ax.set_ylabel("seconds per step (median; dots: repeats)")
        ax.set_title(f"{setting}: one step on the testbed")
    fig.supxlabel(f"made by: {res['command']}", fontsize=7, color="0.3")
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--setting", action="append", dest="settings", choices=sorted(SETTINGS),
                   help="repeatable; default: all")
    p.add_argument("--grpo-steps", type=int, default=20)
    p.add_argument("--opd-steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="TRL's torch threads")
    p.add_argument("--trl-python", default="/work/trl-venv/bin/python")
    p.add_argument("--work", default=str(REPO / "runs/trl_step_time"))
    p.add_argument("--out", default="docs/results/trl_step_time")
    a = p.parse_args(argv)
    a.argv = argv
    a.settings = a.settings or sorted(SETTINGS)
    a.steps = {"grpo": a.grpo_steps, "opd": a.opd_steps}
    try:
        if a.repeats < 1 or min(a.steps.values()) < 3:
            raise UsageError("--repeats >= 1 and --grpo-steps / --opd-steps >= 3")
        if not Path(a.trl_python).is_file():
            raise UsageError(f"--trl-python {a.trl_python}: no such file (the TRL venv: see scripts/trl_compare.py)")
        missing = [f for f in ("runs/trl_compare/data/train_prompts_p128.jsonl",
                               "runs/trl_compare/trl_opd_data/train_prompts.jsonl") if not (REPO / f).is_file()]
        if missing:
            raise UsageError(f"{missing}: run scripts/trl_compare.py prepare / scripts/trl_opd.py prepare first")
    except UsageError as e:
        print(f"trl_step_time: {e}", file=sys.stderr)
        return 2
    res = measure(a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".table.md").write_text(table(res))
    plot(res, out.with_suffix(".png"))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
