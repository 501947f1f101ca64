"""CJ-GRPO on the testbed's diffusion student (issue 14 item 6): student properties and the report.

The two arms are plain ``jaxtok train`` runs: ``configs/testbed/rl_cj_grpo.yaml`` and its skip-step baseline
``configs/testbed/rl_cj_grpo_onestep.yaml`` (objective ``cj_grpo`` with ``trajectory: one_step``: every generated
token scored from the fully masked completion x_0; its rollout log gives ``rollout/logp_traj_mean`` and
``rollout/logp_onestep_mean``, whose gap is the skip-step mismatch the paper names). Two subcommands:

``props --config CFG --run RUN_DIR [--step N ...]``
    Held-out properties of a diffusion checkpoint under the config's decode policy: greedy exact match (the
    training eval's prompts), T=1 sample success, unbiased pass@k from n samples per prompt and the share of
    prompts whose n samples are mixed (a GRPO group carries signal only then).

``report --json OUT.json --md-table OUT.table.md --png OUT.png [--ladder SFT_RUN_DIR] [--arm NAME=DIR,DIR ...] NAME=RUN_DIR ...``
    Held-out exact-match curves and the logged diagnostics of RL runs (``metrics.jsonl``), as a table, json, plot.
    ``--arm`` names the seeds of one arm: its final accuracy per seed, mean, 95 % interval (Student t over seeds;
    binomial for one) and gain; with two arms of equal seed count, their per-seed (paired) difference too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from proving_ground import T95  # scripts/: one t-table
from testbed_props import correct_rows, pass_at_k  # scripts/: one pass@k and one scoring loop

# ----------------------------------------------------------------------------------------------------------------
# student properties


def _diffusion_correct(model, task, tok, prompt, valid, index, *, cfg, temperature, seed, batch_size):
    """[N] bool: is the diffusion completion (the config's decode policy) of each prompt row right."""
    from jaxtok.decode.diffusion import diffusion_generate
    from jaxtok.tasks.tokenizer import SpecialTokens

    sp = SpecialTokens.of(tok)

    def decode_fn(p, v, key):
        res = diffusion_generate(model, p, v, gen_len=cfg.decode.max_new_tokens, policy=cfg.decode.policy,
                                 policy_args=dict(cfg.decode.policy_args), temperature=temperature, rng=key,
                                 pad_id=sp.pad)
        return res.tokens, res.valid

    return correct_rows(decode_fn, task, tok, prompt, valid, index, seed=seed, batch_size=batch_size)


def measure(run_dir, cfg, *, step, n: int, ks, seed: int, batch_size: int) -> dict:
    """Greedy / T=1 properties of one checkpoint on ``cfg.data.num_eval`` held-out prompts."""
    from jaxtok.data import make_task_from_config, prompt_dataset
    from jaxtok.tasks import load_tokenizer
    from jaxtok.train.loop import load_model

    t0 = time.time()
    model, _ = load_model(run_dir, step=step)
    tok = load_tokenizer(Path(run_dir) / "tokenizer.json")
    task = make_task_from_config(cfg.data)
    N = cfg.data.num_eval
    ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=N, num_examples=N,
                           overlong=cfg.data.overlong)
    batch = next(iter(ds))
    prompt, valid, index = (np.asarray(batch[k]) for k in ("prompt", "prompt_valid", "index"))
    kw = dict(cfg=cfg, batch_size=batch_size)
    greedy = _diffusion_correct(model, task, tok, prompt, valid, index, temperature=0.0, seed=seed, **kw)
    rep = [np.repeat(a, n, 0) for a in (prompt, valid, index)]
    samp = _diffusion_correct(model, task, tok, *rep, temperature=1.0, seed=seed + 1, **kw).reshape(N, n)
    c = samp.sum(1)
    q = c / n
    p = float(greedy.mean())
    return {"run_dir": str(run_dir), "step": step, "num_prompts": int(N), "greedy_exact_match": p,
            "greedy_se": math.sqrt(p * (1 - p) / N), "samples_per_prompt": n, "sample_success_T1": float(samp.mean()),
            "pass_at_k": {str(k): float(np.mean([pass_at_k(n, int(ci), k) for ci in c])) for k in ks},
            "group_all_wrong": float(np.mean(c == 0)), "group_all_right": float(np.mean(c == n)),
            "expected_mixed_group_share": {str(g): float(np.mean(1 - q ** g - (1 - q) ** g)) for g in (4, 6, 8)},
            "seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------------------------------
# report

DIAGNOSTICS = ("rollout/reward_mean", "clip_frac", "ratio_mean", "kl", "steps_used", "rollout/steps_mean",
               "rollout/length_mean", "rollout/logp_traj_mean", "rollout/logp_onestep_mean", "grad_norm")


def read_metrics(run_dir) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: list[dict]) -> dict:
    """Held-out curve ``[(step, exact_match)]`` and the mean of each logged diagnostic over the first and the last
    quarter of the logged steps."""
    curve = [(r["step"], r["eval/exact_match"]) for r in records if "eval/exact_match" in r]
    out = {"curve": curve, "diagnostics": {}}
    for key in DIAGNOSTICS:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if not pts:
            continue
        q = max(1, len(pts) // 4)
        out["diagnostics"][key] = {"first_quarter": float(np.mean([v for _, v in pts[:q]])),
                                   "last_quarter": float(np.mean([v for _, v in pts[-q:]]))}
    return out


def plot(runs: dict, path: str, ladder=None) -> None:
    """Held-out exact match and sampled reward per step, one line per run; with ``ladder`` (the student's SFT
    records) a third panel with its held-out curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3 if ladder else 2, figsize=(16 if ladder else 11, 4))
    for name, recs in runs.items():
        curve = [(r["step"], r["eval/exact_match"]) for r in recs if "eval/exact_match" in r]
        if curve:
            ax[0].plot(*zip(*curve), marker="o", label=name)
        rew = [(r["step"], r["rollout/reward_mean"]) for r in recs if r.get("rollout/reward_mean") is not None]
        if rew:
            ax[1].plot(*zip(*rew), alpha=0.7, label=name)
    ax[0].set(xlabel="optimizer step", ylabel="held-out exact match (ASS greedy, 1200 prompts)")
    ax[1].set(xlabel="optimizer step", ylabel="rollout reward (T=1, train prompts)")
    if ladder:
        ax[2].plot(*zip(*[(r["step"], r["eval/exact_match"]) for r in ladder if "eval/exact_match" in r]),
                   marker="o", label="diffusion student (mdlm SFT)")
        ax[2].axhspan(0.2, 0.5, alpha=0.1, label="headroom band")
        ax[2].set(xlabel="SFT step", ylabel="held-out exact match (ASS greedy)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def _interval(xs: list[float], n_eval: int) -> list[float]:
    """95 % interval of a mean over seeds: Student t for two or more, else the one run's binomial interval."""
    m = float(np.mean(xs))
    if len(xs) >= 2:
        half = T95[len(xs) - 1] * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))
    else:
        half = 1.96 * math.sqrt(m * (1 - m) / n_eval)
    return [m - half, m + half]


def seed_arms(arms: dict[str, list[str]], runs: dict[str, list[dict]], at: int | None = None) -> dict:
    """Per arm (``name -> [run name per seed]``): start, final held-out exact match per seed (its last eval, or its
    eval at step ``at``), mean, 95 % interval and gain in points; with exactly two arms of equal seed count, the
    per-seed difference of the second minus the first (seeds paired by position) with its t-interval."""
    out = {}
    for name, members in arms.items():
        curves = [[(r["step"], r["eval/exact_match"]) for r in runs[m] if "eval/exact_match" in r
                   and (at is None or r["step"] <= at)] for m in members]
        short = [m for m, c in zip(members, curves) if at is not None and c[-1][0] != at]
        if short:
            raise ValueError(f"--at {at}: no eval at that step in {short}")
        n_eval = int(next(r["eval/num_examples"] for r in runs[members[0]] if "eval/num_examples" in r))
        finals = [c[-1][1] for c in curves]
        start = float(np.mean([c[0][1] for c in curves]))
        out[name] = {"runs": members, "seeds": len(members), "steps": [c[-1][0] for c in curves], "start_acc": start,
                     "final_acc_per_seed": finals, "final_acc_mean": float(np.mean(finals)),
                     "final_acc_ci95": _interval(finals, n_eval), "gain_pp": 100 * (float(np.mean(finals)) - start)}
    names = list(out)
    if len(names) == 2 and out[names[0]]["seeds"] == out[names[1]]["seeds"] >= 2:
        a, b = (out[n]["final_acc_per_seed"] for n in names)
        d = [100 * (y - x) for x, y in zip(a, b)]
        half = T95[len(d) - 1] * float(np.std(d, ddof=1)) / math.sqrt(len(d))
        out["paired"] = {"diff": f"{names[1]} - {names[0]}", "diff_pp_per_seed": d, "diff_pp_mean": float(np.mean(d)),
                         "diff_pp_ci95": [float(np.mean(d)) - half, float(np.mean(d)) + half]}
    return out


def report(named: list[str], out_json: str, out_md: str, out_png: str, ladder_dir=None,
           arms: dict[str, list[str]] | None = None, at: list[int] | None = None) -> dict:
    """Write the json, markdown table and plot of the runs ``NAME=RUN_DIR`` and of the seeds of each arm
    (``arms``: ``NAME -> [RUN_DIR per seed]``, runs named ``NAME_s<i>``), and the student ladder's curve."""
    runs = {}
    for spec in named:
        name, path = spec.split("=", 1)
        runs[name] = read_metrics(path)
    members = {}
    for arm, dirs in (arms or {}).items():
        members[arm] = [f"{arm}_s{i}" for i in range(len(dirs))]
        for m, d in zip(members[arm], dirs):
            runs[m] = read_metrics(d)
    summary = {name: summarize(recs) for name, recs in runs.items()}
    lines = ["| run | start | best (step) | last (step) | " + " | ".join(f"{k} first→last ¼" for k in DIAGNOSTICS)
             + " |", "|---" * (4 + len(DIAGNOSTICS)) + "|"]
    for name, s in summary.items():
        c = s["curve"]
        best = max(c, key=lambda t: t[1]) if c else None
        cells = [name, _fmt(c[0][1]) if c else "–", f"{best[1]:.4f} ({best[0]})" if best else "–",
                 f"{c[-1][1]:.4f} ({c[-1][0]})" if c else "–"]
        for k in DIAGNOSTICS:
            d = s["diagnostics"].get(k)
            cells.append(f"{_fmt(d['first_quarter'])} → {_fmt(d['last_quarter'])}" if d else "–")
        lines.append("| " + " | ".join(cells) + " |")
    aggs = {str(t): seed_arms(members, runs, t) for t in (at or [None])} if members else {}
    for t, agg in aggs.items():
        lines += ["", "| arm | step | seeds | start | per seed | mean | 95 % interval | gain (pp) |", "|---" * 8 + "|"]
        for arm in members:
            r = agg[arm]
            lines.append(f"| {arm} | {t if t != 'None' else 'last'} | {r['seeds']} | {r['start_acc']:.4f} | "
                         + " / ".join(f"{x:.4f}" for x in r["final_acc_per_seed"])
                         + f" | {r['final_acc_mean']:.4f} | [{r['final_acc_ci95'][0]:.4f}, {r['final_acc_ci95'][1]:.4f}] | "
                         f"{r['gain_pp']:+.1f} |")
        if "paired" in agg:
            pr = agg["paired"]
            lines.append(f"\n{pr['diff']} per seed: " + " / ".join(f"{x:+.1f}" for x in pr["diff_pp_per_seed"])
                         + f" pp, mean {pr['diff_pp_mean']:+.1f}, 95 % t-interval [{pr['diff_pp_ci95'][0]:+.1f}, "
                         f"{pr['diff_pp_ci95'][1]:+.1f}]")
    Path(out_md).write_text("\n".join(lines) + "\n")
    ladder = read_metrics(ladder_dir) if ladder_dir else None
    out = {"command": "python " + " ".join(sys.argv), "runs": summary}
    if aggs:
        out["arms"] = aggs if at else aggs["None"]
        out["arms_at"] = "eval step -> arms" if at else "each run's last eval"
    if ladder:
        out["student_ladder"] = [(r["step"], r["eval/exact_match"]) for r in ladder if "eval/exact_match" in r]
    Path(out_json).write_text(json.dumps(out, indent=2))
    plot(runs, out_png, ladder)
    return summary


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("props", help="greedy / T=1 properties of diffusion checkpoints")
    pp.add_argument("--config", required=True)
    pp.add_argument("--run", required=True)
    pp.add_argument("--step", type=int, action="append", help="checkpoint step (repeatable; default latest)")
    pp.add_argument("--n", type=int, default=8)
    pp.add_argument("--k", default="1,2,4,6,8")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--batch-size", type=int, default=1200)
    pp.add_argument("--out", default=None)
    pp.add_argument("overrides", nargs="*")
    rp = sub.add_parser("report", help="tables, json and plot of RL runs")
    rp.add_argument("--json", required=True)
    rp.add_argument("--md-table", required=True)
    rp.add_argument("--png", required=True)
    rp.add_argument("--ladder", default=None, help="RUN_DIR of the student's SFT run (its held-out curve)")
    rp.add_argument("--arm", action="append", default=[], help="NAME=RUN_DIR,RUN_DIR,... (the seeds of one arm)")
    rp.add_argument("--at", type=int, action="append", default=None,
                    help="read the arms at this eval step (repeatable; default each run's last eval)")
    rp.add_argument("runs", nargs="*", help="NAME=RUN_DIR")
    a = ap.parse_args(argv)
    if a.cmd == "report":
        dirs = [s.split("=", 1)[1] if "=" in s else "" for s in a.runs]
        arms = {s.split("=", 1)[0]: s.split("=", 1)[1].split(",") for s in a.arm if "=" in s}
        bad = [s for s, d in zip(a.runs, dirs) if not d or not (Path(d) / "metrics.jsonl").is_file()]
        bad += [s for s in a.arm if "=" not in s]
        bad += [d for ds in arms.values() for d in ds if not (Path(d) / "metrics.jsonl").is_file()]
        if bad or not (a.runs or arms):
            print(f"report: expected NAME=RUN_DIR (or --arm NAME=RUN_DIR,...) with a metrics.jsonl, got "
                  f"{bad or 'nothing'}", file=sys.stderr)
            return 2
        if a.ladder and not (Path(a.ladder) / "metrics.jsonl").is_file():
            print(f"report: --ladder {a.ladder} has no metrics.jsonl", file=sys.stderr)
            return 2
        try:
            report(a.runs, a.json, a.md_table, a.png, a.ladder, arms, a.at)
        except ValueError as e:
            print(f"report: {e}", file=sys.stderr)
            return 2
        return 0
    from jaxtok.config import load_config
    from jaxtok.registry import ConfigError

    try:
        cfg = load_config(a.config, a.overrides)
        ks = [int(k) for k in a.k.split(",")]
        if any(k < 1 or k > a.n for k in ks):
            raise ConfigError(f"--k {a.k}: every k must be in [1, --n={a.n}]")
        res = {"command": "python " + " ".join(["scripts/cj_grpo_testbed.py"] + argv), "checkpoints": []}
        for step in a.step or [None]:
            m = measure(a.run, cfg, step=step, n=a.n, ks=ks, seed=a.seed, batch_size=a.batch_size)
            print(json.dumps(m), flush=True)
            res["checkpoints"].append(m)
    except (ConfigError, ValueError) as e:
        print(f"props: {e}", file=sys.stderr)
        return 2
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
