"""Collect the testbed RL comparison (issue 14 item 6) from run directories into one json and a markdown table.

    python scripts/rl_testbed.py --start runs/testbed/student \
        --run dr_grpo=runs/testbed/rl_dr_grpo_s0 --run dapo=runs/testbed/rl_dapo_s0 ... \
        --reference grpo=runs/testbed/pilot_grpo_b1024_lr6e-4_w10 \
        --cmd dr_grpo="nice -n 19 jaxtok train configs/testbed/rl_dr_grpo.yaml run.name=rl_dr_grpo_s0" ... \
        --loadavg runs/logs/loadavg.log --out docs/results/rl_testbed

A small reader of its own (scripts/proving_ground.py was being edited by someone else), with the same conventions:
per run, the held-out greedy exact match (``eval/exact_match`` on the testbed's 1200 prompts) at every eval step in
``metrics.jsonl``; the latest one and its step; complete when it reached the config's ``train.steps``, else
incomplete (the latest checkpoint step under ``checkpoints/`` says where a resume starts); the gain over the start
model (``--start``'s ``summary.json``) in points with the binomial standard error of one accuracy on n prompts;
wall minutes per process segment from its first to its last metrics row (the rows between ``event: resume``
rows; the gap between segments is not training; start-up, compilation and the steps before the first logged row are
not in it); step time = mean wall seconds per optimizer step over the logged training intervals, leaving out the first
interval of each segment (compilation) and intervals that hold a held-out eval; the rollout's training reward
(``rollout/exact_match``) averaged over 25-step windows; the mean 1-minute load average of the machine over the
run's segments when ``--loadavg`` (lines ``ISO-time l1 l5 l15``) is given. Nothing is interpreted here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from pathlib import Path

import yaml
from proving_ground import _segments as segments  # one reader of resumed runs' metrics.jsonl


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_seconds(recs: list[dict]) -> float | None:
    secs, steps = 0.0, 0
    for seg in segments(recs):
        rows = [(i, r) for i, r in enumerate(seg) if "loss" in r and "event" not in r]
        for k, ((i0, a), (i1, b)) in enumerate(zip(rows, rows[1:])):
            if k == 0 or b["step"] <= a["step"] or any("eval/exact_match" in seg[j] for j in range(i0 + 1, i1)):
                continue
            secs += b["time"] - a["time"]
            steps += b["step"] - a["step"]
    return secs / steps if steps else None


def mean_load(loadavg: Path | None, windows: list[tuple[float, float]]) -> tuple[float | None, int]:
    if loadavg is None or not loadavg.exists():
        return None, 0
    vals = []
    for line in loadavg.read_text().splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        try:
            t = dt.datetime.fromisoformat(parts[0]).replace(tzinfo=dt.timezone.utc).timestamp()
        except ValueError:
            continue
        if any(t0 <= t <= t1 for t0, t1 in windows):
            vals.append(float(parts[1]))
    return (round(sum(vals) / len(vals), 2) if vals else None), len(vals)


def summarize(run: Path, start_acc: float, loadavg: Path | None) -> dict:
    recs = records(run)
    cfg_path = run / "config.yaml"
    target = yaml.safe_load(cfg_path.read_text())["train"]["steps"] if cfg_path.exists() else None
    evals = [(r["step"], r["eval/exact_match"], r.get("eval/num_examples")) for r in recs if "eval/exact_match" in r]
    train_steps = [r["step"] for r in recs if "loss" in r and "event" not in r]
    last_step = max(train_steps + [s for s, _, _ in evals], default=0)
    ckpt_dir = run / "checkpoints"
    ckpts = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.exists() else []
    segs = segments(recs)
    walls = [s[-1]["time"] - s[0]["time"] for s in segs if len(s) > 1]
    out: dict = {"run_dir": str(run), "started": bool(recs), "target_steps": target, "last_logged_step": last_step,
                 "complete": bool(target and evals and evals[-1][0] >= target), "checkpoints": ckpts,
                 "curve": {str(s): round(a, 4) for s, a, _ in evals}}
    if evals:
        s, a, n = evals[-1]
        n = n or 1200
        out.update({"latest_eval_step": s, "latest_acc": round(a, 4), "n_eval": n,
                    "latest_acc_se": round(math.sqrt(a * (1 - a) / n), 4),
                    "gain_pp": round(100 * (a - start_acc), 1)})
    st = step_seconds(recs)
    out["step_s"] = round(st, 2) if st else None
    out["wall_min_segments"] = [round(w / 60, 1) for w in walls]
    out["wall_min"] = round(sum(walls) / 60, 1) if walls else None
    if segs:
        out["load1_mean"], out["load1_samples"] = mean_load(loadavg, [(seg[0]["time"], seg[-1]["time"]) for seg in segs])
        out["first_row_utc"] = dt.datetime.fromtimestamp(segs[0][0]["time"], dt.timezone.utc).strftime("%H:%M:%S")
        out["last_row_utc"] = dt.datetime.fromtimestamp(segs[-1][-1]["time"], dt.timezone.utc).strftime("%H:%M:%S")
    rw: dict[int, list[float]] = {}
    for r in recs:
        if "rollout/exact_match" in r:
            rw.setdefault((r["step"] - 1) // 25, []).append(r["rollout/exact_match"])
    out["train_reward_per_25"] = [round(sum(v) / len(v), 3) for _, v in sorted(rw.items())]
    for key in ("clip_frac", "kept_rows", "ratio_max", "ratio_min"):
        vals = [r[key] for r in recs if key in r and "event" not in r]
        if vals:
            out[f"{key}_range"] = [round(min(vals), 6), round(max(vals), 6)]
    return out


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", required=True, help="start model run dir (its summary.json)")
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR, one per variant (seed 0)")
    ap.add_argument("--reference", action="append", default=[], help="NAME=RUN_DIR shown beside the variants")
    ap.add_argument("--cmd", action="append", default=[], help="NAME=COMMAND that made the run")
    ap.add_argument("--loadavg", type=Path, default=None)
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.json and PREFIX.table.md")
    args = ap.parse_args(argv)
    start = json.loads((Path(args.start) / "summary.json").read_text())
    start_acc = start["eval/exact_match"]
    cmds = _pairs(args.cmd)
    res = {"start": {"run_dir": args.start, "acc": round(start_acc, 4),
                     "n_eval": start.get("eval/num_examples")},
           "seed": 0, "notes": args.note, "runs": {}, "reference": {}}
    for group, items in (("runs", args.run), ("reference", args.reference)):
        for name, path in _pairs(items).items():
            res[group][name] = {**summarize(Path(path), start_acc, args.loadavg), "command": cmds.get(name)}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    steps = sorted({int(s) for g in ("runs", "reference") for r in res[g].values() for s in r["curve"]})
    lines = ["| run | status | " + " | ".join(map(str, steps)) + " | latest (SE) | gain | s/step | wall min |",
             "|---|---|" + "---|" * len(steps) + "---|---|---|---|"]
    for g in ("reference", "runs"):
        for name, r in res[g].items():
            status = ("complete" if r["complete"] else "not started" if not r["last_logged_step"]
                      else f"incomplete (step {r['last_logged_step']}/{r['target_steps']})")
            cells = [f"{r['curve'][str(s)]:.3f}" if str(s) in r["curve"] else "" for s in steps]
            latest = f"{r['latest_acc']:.3f} ({r['latest_acc_se']:.3f})" if "latest_acc" in r else "–"
            gain = f"{r['gain_pp']:+.1f}" if "gain_pp" in r else "–"
            lines.append(f"| {name} | {status} | " + " | ".join(cells) +
                         f" | {latest} | {gain} | {r['step_s'] or '–'} | {r['wall_min'] or '–'} |")
    out.with_suffix(".table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
