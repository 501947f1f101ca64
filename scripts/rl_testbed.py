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
run's segments when ``--loadavg`` (lines ``ISO-time l1 l5 l15``, or ``ISO-time <uptime output>``) is given.

The mu = 2 arm (``--mu2 NAME=DIR[,DIR...]``, one directory per seed; ``configs/testbed/rl_mu2_*.yaml``, two optimizer
steps per rollout batch): per seed the same summary plus the mechanism statistics per inner step k = 1..mu
(``(step - 1) % rollout.inner_epochs + 1``; on k = 1 the policy is the sampler, so every ratio is 1 by
construction): mean / max ``clip_frac`` (for CPPO: the fraction of tokens its trust-region mask rejects), mean
``dual_clip_frac``, the extreme and mean ``ratio_min`` / ``ratio_max``, mean ``approx_kl`` and the mode's own
entries (``cppo_*``), the clip fraction per valid-position bucket (``clip_frac_pos*``), the inner-step-mu clip
fraction, entropy, gradient norm and CPPO rejections per 25-step window, and the median
seconds of a step that samples (k = 1) and of one that reuses the batch (k = 2). Over seeds: the mean final accuracy,
its standard error over seeds and a 95 % Student-t interval when there are >= 2 seeds, else the binomial SE of the
one run (then it is one run, not a mean). ``--reference NAME=DIR0,DIR1,...`` likewise: seed 0's row plus the seeds'
mean. ``--plot`` draws the held-out curves of both arms and the mu = 2 clip fractions. Nothing is interpreted here.

Methods with their own structure (``--method NAME=DIR[,DIR...]``, seeds 0, 1, ...; APPO, ReasonMaxxer, REFINE:
``configs/testbed/rl_{appo,reasonmaxxer,refine}.yaml``; ``--cmd method_NAME=...``): per seed the same summary, the
held-out accuracy at steps 150 and 250 (and its latest eval step) beside the GRPO means of both arms (``--reference grpo`` and ``--mu2 grpo``)
at the same steps, and the method's own logged diagnostics (``DIAGNOSTIC_KEYS`` that the run logged): the mean over
the rows of each inner step k and, for k = mu, the mean per 25-step window.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import yaml
from proving_ground import T95
from proving_ground import _segments as segments  # one reader of resumed runs' metrics.jsonl

DIAGNOSTIC_KEYS = (
    # APPO: loss weight (tokens of initial rows only), future-KL factor f, tree rollout, PPO clip
    "count", "appo_future_factor_mean", "appo_dropped_seqs", "clip_frac", "dual_clip_frac", "approx_kl", "kl_loss",
    "adv_abs_mean", "rollout/branch_point_mean", "rollout/branch_reward_mean", "rollout/branch_adv_abs_mean",
    # ReasonMaxxer: entropy-gated decision tokens and the KL anchor
    "decision_frac", "decision_tokens", "pos_decision_tokens", "anchor_tokens", "decision_loss", "kl_anchor",
    # REFINE: NTP and chunk-rollout GRPO terms, rollout reward and match against the true continuation
    "ntp_loss", "pg_loss", "rollout/reward_mean", "rollout/token_match", "rollout/start_mean", "rollout/length_mean",
    # all: rollout reward, policy entropy, gradient norm
    "rollout/exact_match", "entropy", "grad_norm")
COMPARE_STEPS = ("150", "250")
MECHANISM_KEYS = ("clip_frac", "dual_clip_frac", "ratio_min", "ratio_max", "ratio_mean", "approx_kl",
                  "cppo_token_reject_frac", "cppo_budget_reject_frac", "cppo_mask_mean")


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
            l1 = float(line.split("load average:")[1].split(",")[0]) if "load average:" in line else float(parts[1])
        except (ValueError, IndexError):
            continue
        if any(t0 <= t <= t1 for t0, t1 in windows):
            vals.append(l1)
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
    mu = int(yaml.safe_load(cfg_path.read_text())["rollout"]["inner_epochs"]) if cfg_path.exists() else 1
    out["inner_epochs"] = mu
    out["mechanism"] = mechanism(recs, mu)
    return out


def _r(x, nd=6):
    return None if x is None else round(float(x), nd)


def mechanism(recs: list[dict], mu: int) -> dict:
    """Ratio / clip statistics of the logged training rows per inner step k = (step - 1) % mu + 1, the inner-step-mu
    clip fraction, entropy and gradient norm per 25-step window, and median step seconds per inner step."""
    rows = [r for r in recs if "loss" in r and "event" not in r]
    out: dict = {}
    for k in range(1, mu + 1):
        sel = [r for r in rows if (r["step"] - 1) % mu + 1 == k]
        if not sel:
            continue
        d: dict = {"rows": len(sel)}
        for key in MECHANISM_KEYS:
            vals = [r[key] for r in sel if r.get(key) is not None]
            if not vals:
                continue
            d[f"{key}_mean"] = _r(np.mean(vals))
            if key in ("clip_frac", "dual_clip_frac", "ratio_max", "approx_kl", "cppo_token_reject_frac",
                       "cppo_budget_reject_frac"):
                d[f"{key}_max"] = _r(max(vals))
            if key in ("ratio_min", "cppo_mask_mean"):
                d[f"{key}_min"] = _r(min(vals))
        pos = sorted((int(key[len("clip_frac_pos"):]), key) for key in sel[0] if key.startswith("clip_frac_pos"))
        if pos:  # per valid-position bucket (jaxtok.policy._position_buckets over the padded length)
            d["clip_frac_by_position"] = [_r(np.mean([r.get(key, 0.0) for r in sel])) for _, key in pos]
        times = [r["step_time_s"] for r in sel if r.get("step_time_s") is not None and "compile_s" not in r]
        d["step_s_median"] = _r(np.median(times), 3) if times else None
        out[f"inner{k}"] = d
    for key in ("clip_frac", "entropy", "grad_norm", "approx_kl", "cppo_token_reject_frac", "cppo_budget_reject_frac"):
        if not any(r.get(key) is not None for r in rows):
            continue
        win: dict[int, list[float]] = {}
        for r in rows:
            if (r["step"] - 1) % mu + 1 == mu and r.get(key) is not None:
                win.setdefault((r["step"] - 1) // 25, []).append(r[key])
        out[f"{key}_inner{mu}_per_25"] = [_r(np.mean(v), 5) for _, v in sorted(win.items())]
    return out


def diagnostics(recs: list[dict], mu: int) -> dict:
    """Mean of each logged ``DIAGNOSTIC_KEYS`` entry over the training rows of each inner step k, and for k = mu its
    mean per 25-step window (the rows where the policy has moved furthest from the sampler)."""
    rows = [r for r in recs if "loss" in r and "event" not in r]
    out: dict = {}
    for key in DIAGNOSTIC_KEYS:
        if not any(r.get(key) is not None for r in rows):
            continue
        d: dict = {}
        for k in range(1, mu + 1):
            vals = [r[key] for r in rows if (r["step"] - 1) % mu + 1 == k and r.get(key) is not None]
            if vals:
                d[f"inner{k}_mean"] = _r(np.mean(vals))
        win: dict[int, list[float]] = {}
        for r in rows:
            if (r["step"] - 1) % mu + 1 == mu and r.get(key) is not None:
                win.setdefault((r["step"] - 1) // 25, []).append(r[key])
        d[f"inner{mu}_per_25"] = [_r(np.mean(v), 5) for _, v in sorted(win.items())]
        out[key] = d
    return out


def arm(dirs: list[Path], start_acc: float, loadavg: Path | None, cmd: str | None) -> dict:
    """Per-seed summaries and, over the seeds that reached their last eval, the mean final held-out accuracy with
    its SE over seeds and a 95 % Student-t interval (>= 2 seeds), else the one run's binomial SE."""
    seeds = [{**summarize(d, start_acc, loadavg), "command": (cmd or "").replace("{seed}", str(i)) or None}
             for i, d in enumerate(dirs)]
    done = [s for s in seeds if s["complete"]]
    out: dict = {"seeds": seeds, "n_complete": len(done)}
    finals = [s["latest_acc"] for s in done]
    if len(finals) >= 2:
        m, sd = float(np.mean(finals)), float(np.std(finals, ddof=1))
        se = sd / math.sqrt(len(finals))
        out.update(final_mean=round(m, 4), final_se=round(se, 4), final_ci95=[round(m - T95[len(finals) - 1] * se, 4),
                   round(m + T95[len(finals) - 1] * se, 4)], se_method=f"over {len(finals)} seeds (Student t)")
    elif finals:
        out.update(final_mean=finals[0], final_se=done[0]["latest_acc_se"], final_ci95=None,
                   se_method="one run: binomial SE of one accuracy")
    if finals:
        out["gain_pp"] = round(100 * (out["final_mean"] - start_acc), 1)
        curves = [s["curve"] for s in done]
        common = sorted(set.intersection(*(set(c) for c in curves)), key=int)
        out["mean_curve"] = {k: round(float(np.mean([c[k] for c in curves])), 4) for k in common}
    return out


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def _status(r: dict) -> str:
    return ("complete" if r["complete"] else "not started" if not r["last_logged_step"]
            else f"incomplete (step {r['last_logged_step']}/{r['target_steps']})")


def _fmt(x, spec=".3f", dash="–"):
    return dash if x is None else format(x, spec)


def curve_table(rows: list[tuple[str, dict]]) -> list[str]:
    steps = sorted({int(s) for _, r in rows for s in r["curve"]})
    lines = ["| run | status | " + " | ".join(map(str, steps)) + " | latest (SE) | gain | s/step | wall min | load |",
             "|---|---|" + "---|" * len(steps) + "---|---|---|---|---|"]
    for name, r in rows:
        cells = [f"{r['curve'][str(s)]:.3f}" if str(s) in r["curve"] else "" for s in steps]
        latest = f"{r['latest_acc']:.3f} ({r['latest_acc_se']:.3f})" if "latest_acc" in r else "–"
        gain = f"{r['gain_pp']:+.1f}" if "gain_pp" in r else "–"
        lines.append(f"| {name} | {_status(r)} | " + " | ".join(cells) + f" | {latest} | {gain} | "
                     f"{r['step_s'] or '–'} | {r['wall_min'] or '–'} | {_fmt(r.get('load1_mean'), '.2f')} |")
    return lines


def mechanism_table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = ["| run | clip_frac k=1 | clip_frac k=2 mean (max) | dual_clip k=2 | ratio_min k=2 (lowest) | "
             "ratio_max k=2 mean (highest) | approx_kl k=2 | CPPO token / budget reject k=2 | "
             "s/step k=1 / k=2 (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        m1, m2 = r["mechanism"].get("inner1", {}), r["mechanism"].get("inner2", {})
        if not m2:
            continue
        cppo = (f"{m2['cppo_token_reject_frac_mean']:.4f} / {m2['cppo_budget_reject_frac_mean']:.4f}"
                if "cppo_token_reject_frac_mean" in m2 else "–")
        lines.append(
            f"| {name} | {_fmt(m1.get('clip_frac_max'), '.4f')} | {_fmt(m2.get('clip_frac_mean'), '.4f')} "
            f"({_fmt(m2.get('clip_frac_max'), '.4f')}) | {_fmt(m2.get('dual_clip_frac_mean'), '.5f')} | "
            f"{_fmt(m2.get('ratio_min_mean'), '.3f')} ({_fmt(m2.get('ratio_min_min'), '.3f')}) | "
            f"{_fmt(m2.get('ratio_max_mean'), '.3f')} ({_fmt(m2.get('ratio_max_max'), '.3f')}) | "
            f"{_fmt(m2.get('approx_kl_mean'), '.5f')} | {cppo} | "
            f"{_fmt(m1.get('step_s_median'), '.2f')} / {_fmt(m2.get('step_s_median'), '.2f')} |")
    return lines


def arm_table(res: dict) -> list[str]:
    lines = ["| variant | mu=1 seed 0 final | mu=2 seeds complete | mu=2 final mean (SE) | 95 % interval | "
             "gain vs start | SE method |", "|---|---|---|---|---|---|---|"]
    mu1 = {**res["runs"], **res["reference"]}
    for name, a in res["mu2"].items():
        ref = mu1.get(name, {})
        lines.append(f"| {name} | {_fmt(ref.get('latest_acc'))} | {a['n_complete']}/{len(a['seeds'])} | "
                     f"{_fmt(a.get('final_mean'))} ({_fmt(a.get('final_se'))}) | "
                     f"{'[%.3f, %.3f]' % tuple(a['final_ci95']) if a.get('final_ci95') else '–'} | "
                     f"{_fmt(a.get('gain_pp'), '+.1f')} pp | {a.get('se_method', '–')} |")
    for name, a in res.get("reference_seeds", {}).items():
        lines.append(f"| {name} (mu=1, reference) | {_fmt(a['seeds'][0].get('latest_acc'))} | "
                     f"{a['n_complete']}/{len(a['seeds'])} | {_fmt(a.get('final_mean'))} ({_fmt(a.get('final_se'))}) | "
                     f"{'[%.3f, %.3f]' % tuple(a['final_ci95']) if a.get('final_ci95') else '–'} | "
                     f"{_fmt(a.get('gain_pp'), '+.1f')} pp | {a.get('se_method', '–')} |")
    return lines


def _grpo_means(res: dict) -> dict[str, dict]:
    """The GRPO mean curves the methods are read against: mu = 1 (``--reference grpo`` seeds) and mu = 2."""
    out = {}
    if "grpo" in res.get("reference_seeds", {}):
        out["GRPO mu=1"] = res["reference_seeds"]["grpo"].get("mean_curve", {})
    if "grpo" in res["mu2"]:
        out["GRPO mu=2"] = res["mu2"]["grpo"].get("mean_curve", {})
    return out


def compare_table(res: dict) -> list[str]:
    """Per method seed, one row per step of ``COMPARE_STEPS`` it reached and its latest eval step: held-out accuracy
    and its difference (points) from each GRPO mean at the same optimizer step."""
    refs = _grpo_means(res)
    lines = ["| run | mu | step | acc | " + " | ".join(f"{ref} mean (diff)" for ref in refs) + " |",
             "|---|---|---|---|" + "---|" * len(refs)]
    for name, a in res["methods"].items():
        for i, r in enumerate(a["seeds"]):
            latest = str(r.get("latest_eval_step", ""))
            for s in sorted({s for s in (*COMPARE_STEPS, latest) if s in r["curve"]}, key=int):
                m = r["curve"][s]
                cells = [f"{_fmt(c.get(s))} ({100 * (m - c[s]):+.1f})" if s in c else "–" for c in refs.values()]
                lines.append(f"| {name} s{i} | {r['inner_epochs']} | {s} | {m:.3f} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_table(res: dict) -> list[str]:
    """Per method seed and logged diagnostic: mean per inner step, first and last 25-step window (k = mu)."""
    lines = ["| run | diagnostic | mean k=1 | mean k=mu | first 25 steps (k=mu) | last 25 steps (k=mu) |",
             "|---|---|---|---|---|---|"]
    for name, a in res["methods"].items():
        for i, r in enumerate(a["seeds"]):
            mu = r["inner_epochs"]
            for key, d in r["diagnostics"].items():
                win = d.get(f"inner{mu}_per_25") or [None]
                lines.append(f"| {name} s{i} | {key} | {_fmt(d.get('inner1_mean'), '.5g')} | "
                             f"{_fmt(d.get(f'inner{mu}_mean'), '.5g')} | {_fmt(win[0], '.5g')} | {_fmt(win[-1], '.5g')} |")
    return lines


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(22, 6), dpi=100)
    names = list(dict.fromkeys([*res["reference"], *res["runs"], *res["mu2"]]))
    colour = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    start = res["start"]["acc"]
    for n, r in {**res["reference"], **res["runs"]}.items():
        xs = [0] + sorted(map(int, r["curve"]))
        ax.plot(xs, [start] + [r["curve"][str(x)] for x in xs[1:]], "--", color=colour[n], alpha=0.6,
                label=f"{n}, mu=1 (seed 0)")
    for n, a in res["mu2"].items():
        for i, r in enumerate(a["seeds"]):
            if not r["curve"]:
                continue
            xs = [0] + sorted(map(int, r["curve"]))
            ax.plot(xs, [start] + [r["curve"][str(x)] for x in xs[1:]], "-o", ms=3, color=colour[n],
                    alpha=1.0 if i == 0 else 0.5, label=f"{n}, mu=2 (seed {i})")
            m = r["mechanism"].get("clip_frac_inner2_per_25") or []
            if m:
                bx.plot([25 * j + 12.5 for j in range(len(m))], m, "-o", ms=3, color=colour[n],
                        alpha=1.0 if i == 0 else 0.5, label=f"{n} (seed {i})")
    ax.axhline(start, color="grey", lw=0.8)
    ax.set(xlabel="optimizer step", ylabel="held-out greedy exact match (1200 prompts)",
           title="testbed RL: mu=1 (dashed, 1 rollout batch per step) vs mu=2 (solid, 2 steps per batch)")
    ax.legend(fontsize=7, ncol=2)
    bx.set_yscale("log")
    bx.set(xlabel="optimizer step (25-step windows)", ylabel="clip fraction on the 2nd inner step (tokens)",
           title="mu=2: fraction of tokens clipped / masked when the batch is reused")
    bx.legend(fontsize=7)
    for n, curve in _grpo_means(res).items():
        xs = [0] + sorted(map(int, curve))
        cx.plot(xs, [start] + [curve[str(x)] for x in xs[1:]], "--" if "mu=1" in n else ":", color="black",
                label=f"{n} (mean of seeds)")
    for j, (n, a) in enumerate(res["methods"].items()):
        for i, r in enumerate(a["seeds"]):
            xs = [0] + sorted(map(int, r["curve"]))
            cx.plot(xs, [start] + [r["curve"][str(x)] for x in xs[1:]], "-o", ms=3, color=plt.cm.Set1(j),
                    alpha=1.0 if i == 0 else 0.5, label=f"{n} (seed {i}, mu={r['inner_epochs']})")
    cx.axhline(start, color="grey", lw=0.8)
    cx.set(xlabel="optimizer step", ylabel="held-out greedy exact match (1200 prompts)",
           title="APPO / ReasonMaxxer / REFINE against the GRPO means")
    cx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _dirs(items: list[str]) -> dict[str, list[Path]]:
    return {k: [Path(x) for x in v.split(",")] for k, v in _pairs(items).items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", required=True, help="start model run dir (its summary.json)")
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR, one per variant (mu=1, seed 0)")
    ap.add_argument("--reference", action="append", default=[],
                    help="NAME=RUN_DIR[,RUN_DIR...] (seeds 0, 1, ...) shown beside the variants")
    ap.add_argument("--mu2", action="append", default=[], help="NAME=RUN_DIR[,RUN_DIR...]: the mu=2 arm, seeds 0, 1, ...")
    ap.add_argument("--method", action="append", default=[],
                    help="NAME=RUN_DIR[,RUN_DIR...]: a method with its own structure (APPO, ReasonMaxxer, REFINE), seeds 0, 1, ...")
    ap.add_argument("--cmd", action="append", default=[], help="NAME=COMMAND that made the run ({seed}: its seed)")
    ap.add_argument("--loadavg", type=Path, default=None)
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--plot", action="store_true", help="also write PREFIX.png")
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.json and PREFIX.table.md")
    args = ap.parse_args(argv)
    start = json.loads((Path(args.start) / "summary.json").read_text())
    start_acc = start["eval/exact_match"]
    cmds = _pairs(args.cmd)
    res = {"start": {"run_dir": args.start, "acc": round(start_acc, 4),
                     "n_eval": start.get("eval/num_examples")},
           "seed": 0, "notes": args.note, "runs": {}, "reference": {}, "reference_seeds": {}, "mu2": {}, "methods": {}}
    for name, path in _pairs(args.run).items():
        res["runs"][name] = {**summarize(Path(path), start_acc, args.loadavg), "command": cmds.get(name)}
    for name, dirs in _dirs(args.reference).items():
        res["reference"][name] = {**summarize(dirs[0], start_acc, args.loadavg), "command": cmds.get(name)}
        if len(dirs) > 1:
            res["reference_seeds"][name] = arm(dirs, start_acc, args.loadavg, None)
    for name, dirs in _dirs(args.mu2).items():
        res["mu2"][name] = arm(dirs, start_acc, args.loadavg, cmds.get(f"mu2_{name}"))
    for name, dirs in _dirs(args.method).items():
        res["methods"][name] = arm(dirs, start_acc, args.loadavg, cmds.get(f"method_{name}"))
        for seed_dir, seed in zip(dirs, res["methods"][name]["seeds"]):
            seed["diagnostics"] = diagnostics(records(seed_dir), seed["inner_epochs"])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    mu1_rows = [*res["reference"].items(), *res["runs"].items()]
    mu2_rows = [(f"{n} s{i}", r) for n, a in res["mu2"].items() for i, r in enumerate(a["seeds"])]
    lines = ["mu=1 (one optimizer step per rollout batch), held-out greedy exact match:", "", *curve_table(mu1_rows)]
    if mu2_rows:
        lines += ["", "mu=2 (two optimizer steps per rollout batch), held-out greedy exact match:", "",
                  *curve_table(mu2_rows), "", "Final accuracy per variant:", "", *arm_table(res), "",
                  "mu=2 mechanism statistics per inner step k (k=1 samples, k=2 reuses the batch):", "",
                  *mechanism_table(mu2_rows)]
    method_rows = [(f"{n} s{i}", r) for n, a in res["methods"].items() for i, r in enumerate(a["seeds"])]
    if method_rows:
        lines += ["", "Methods with their own structure (APPO, ReasonMaxxer, REFINE), held-out greedy exact match:", "",
                  *curve_table(method_rows), "", "Against the GRPO means at the same optimizer step (points):", "",
                  *compare_table(res), "", "Method diagnostics (logged per step; k = inner step):", "",
                  *diagnostics_table(res)]
    out.with_suffix(".table.md").write_text("\n".join(lines) + "\n")
    if args.plot:
        plot(res, out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
