"""Collect the proving-ground arms (issue 14 item 2) from their run directories into one json and a markdown table.

    python scripts/proving_ground.py --start runs/testbed/student \
        --arm grpo=runs/testbed/pg/grpo_s0,runs/testbed/pg/grpo_s1 --arm opd=... --arm sft_teacher_samples=... \
        --cmd grpo="nice -n 5 jaxtok train configs/testbed/grpo.yaml train.seed={seed} run.name=grpo_s{seed}" ... \
        --out docs/results/proving_ground

Per arm: the start model's held-out greedy exact match (``--start``'s summary), the final held-out exact match per
seed (``eval/exact_match`` at the last step of ``metrics.jsonl``), its mean, a 95% interval (Student t over seeds
when there are >= 2, else the binomial interval of the one run's held-out accuracy), the gain in points, the
accuracy curve, steps, wall time and training FLOPs (MaxText-style counts of ``jaxtok.models.flops_per_token``:
rollout = sampling + behaviour log-prob forwards, update = 3x forward per optimizer step, plus one teacher
forward per step for OPD; SFT = 3x forward per step, plus one teacher forward per sampled record for
SFT on teacher samples when --teacher is given).

A run extended by a resume (``event: resume`` rows in ``metrics.jsonl``) counts its wall time per segment (the gap
between the segments is not training). ``--at NAME=STEP`` reads an arm at an earlier eval step (e.g. the 150-step
numbers of runs later extended to 250): the final accuracy, curve, wall time and FLOPs stop at that step. Step time
(``step_s``): the mean wall seconds per optimizer step over the logged training intervals, leaving out the first
interval of each segment (it holds the compilation) and the intervals that hold a held-out eval. ``--train-metric``
averages logged training keys (e.g. ``selected_frac``, ``q1``..``q4``) over a run's logged steps, then over seeds;
``--memory FILE`` adds a json's ``{arm: {temp_mb, peak_mb}}`` (the XLA memory analysis of the arm's compiled train
step, ``jaxtok.bench.train.variant_step_memory``) to the arm.

TRL arms (``scripts/trl_compare.py train`` for GRPO, ``scripts/trl_opd.py train`` for on-policy distillation): a
run directory holding ``trl_run.json`` instead of ``metrics.jsonl``. Its held-out curve is the run's torch greedy
eval (verified equal to jaxtok's eval on the same 1200 prompts), its steps the last eval step (a run stopped early
counts up to its last eval), its step time the mean of the logged per-step seconds after the first step (no evals
inside them), its wall time the sum of those seconds (training only, evals excluded). ``--mirror TRL_ARM=JAXTOK_ARM``
is required for such an arm: its ``train_flops`` are the jaxtok arm's formula (same model, rows per step and tokens;
checked) evaluated at the TRL arm's steps, so the two are equal by construction at equal steps. ``--overlay
TITLE=JAXTOK_ARM,TRL_ARM`` (repeatable) draws held-out accuracy against step for both (jaxtok: each seed and the
mean; TRL: each seed) to ``<out>_trl.png``.

``--keep PREV.json`` updates an earlier output: arms not named by ``--arm`` are carried over as recorded (marked
``kept_from``; their run directories may be gone), named ones are recomputed in place. A TRL arm that mirrors a
carried-over arm names the config its FLOPs formula comes from: ``--mirror trl_grpo=grpo:configs/testbed/grpo.yaml``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def is_trl_run(run: Path) -> bool:
    """A TRL run directory: ``trl_run.json`` and no ``metrics.jsonl``."""
    return (run / "trl_run.json").is_file() and not (run / "metrics.jsonl").is_file()


def trl_run_summary(d: dict, at: int | None = None) -> dict:
    """Curve (eval step -> held-out exact match, without the step-0 start eval, as jaxtok's logs), last eval step,
    step seconds and rows per step of a ``trl_run.json`` dict, read up to eval step ``at`` if given."""
    ev = {int(p["step"]): float(p["eval/exact_match"]) for p in d["curve"]
          if p["step"] > 0 and (at is None or p["step"] <= at)}
    if not ev:
        raise UsageError(f"TRL run {d.get('name')}: no held-out eval after step 0" + (f" up to step {at}" if at else ""))
    last = max(ev)
    secs = [float(x) for x in d["step_seconds"][:last]]
    cfg = d.get("config", {})
    rows = d.get("rows_per_step") or int(cfg["per_device_train_batch_size"]) * int(cfg.get("gradient_accumulation_steps", 1))
    return {"curve": dict(sorted(ev.items())), "steps": last, "wall_s": float(sum(secs)),
            "step_s": float(np.mean(secs[1:])) if len(secs) > 1 else None, "rows_per_step": int(rows)}


def _records(run: Path, at: int | None = None) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if at is not None:
        recs = [r for r in recs if r.get("step", 0) <= at and r.get("event") != "resume"]
    return recs


def _segments(recs: list[dict]) -> list[list[dict]]:
    """The logged rows split at ``event: resume`` rows (one segment per process that trained the run)."""
    segs = [[]]
    for r in recs:
        if r.get("event") == "resume":
            segs.append([])
        elif "time" in r:
            segs[-1].append(r)
    return [s for s in segs if s]


def _wall(recs: list[dict]) -> tuple[float | None, list[float]]:
    walls = [s[-1]["time"] - s[0]["time"] for s in _segments(recs) if len(s) > 1]
    return (float(sum(walls)) if walls else None), walls


def _step_s(recs: list[dict]) -> float | None:
    """Mean seconds per optimizer step over the logged training intervals, without each segment's first interval
    (compilation) and without intervals that hold an eval row."""
    secs, steps = 0.0, 0
    for seg in _segments(recs):
        train_rows = [(i, r) for i, r in enumerate(seg) if "loss" in r and "event" not in r]
        for k, ((i0, a), (i1, b)) in enumerate(zip(train_rows, train_rows[1:])):
            if k == 0 or any("eval/exact_match" in seg[j] for j in range(i0 + 1, i1)) or b["step"] <= a["step"]:
                continue
            secs += b["time"] - a["time"]
            steps += b["step"] - a["step"]
    return secs / steps if steps else None


def _flops(run: Path, teacher: str | None = None, at: int | None = None) -> float:
    """Training FLOPs of a jaxtok run directory, or of a config file (``.yaml``) run as written: the tokenizer is then
    the one of its ``model.init_from`` run."""
    from jaxtok.config import load_config
    from jaxtok.models import flops_per_token, presets
    from jaxtok.tasks import load_tokenizer

    cfg = load_config(run if run.suffix == ".yaml" else run / "config.yaml")
    tok_dir = Path(cfg.model.init_from) if run.suffix == ".yaml" else run
    V = load_tokenizer(tok_dir / "tokenizer.json").get_vocab_size()

    def fwd(path_or_preset, seq):
        if path_or_preset in presets.PRESETS:
            mc = presets.get(path_or_preset, vocab_size=V)
        else:
            mc = presets.get(load_config(Path(path_or_preset) / "config.yaml").model.preset, vocab_size=V)
        return flops_per_token(mc, seq).forward

    init = cfg.model.init_from
    student_preset = load_config(Path(init) / "config.yaml").model.preset if init else cfg.model.preset
    rows, steps = cfg.data.batch_size, (at if at is not None else cfg.train.steps)
    if cfg.objective.name == "sft":
        seq = cfg.data.seq_len
        total = 3.0 * steps * rows * seq * fwd(student_preset, seq)
        if cfg.data.task == "arith_samples" and teacher:  # the teacher's sampling of the SFT data (one forward each)
            total += cfg.data.num_train * (cfg.data.prompt_len + cfg.decode.max_new_tokens) * fwd(teacher, seq)
        return float(total)
    seq = cfg.data.prompt_len + cfg.rollout.max_new_tokens
    f = fwd(student_preset, seq)
    batches = math.ceil(steps / cfg.rollout.inner_epochs)
    total = batches * 2 * rows * seq * f + steps * 3 * rows * seq * f
    if cfg.rollout.teacher_init_from:
        total += batches * rows * seq * fwd(cfg.rollout.teacher_init_from, seq)
    if cfg.rollout.reference not in (None, "none") and cfg.objective.args.get("kl_coef", 0):
        total += steps * rows * seq * f
    return float(total)


def _trl_arm(runs: list[Path], at: int | None, mirror_run: Path | None, teacher: str | None) -> dict:
    """The per-run fields of an arm made of TRL runs (see the module doc); FLOPs by the mirrored jaxtok arm's
    formula at the TRL arm's steps, after checking that the rows per step match."""
    if mirror_run is None:
        raise UsageError(f"TRL runs {[str(r) for r in runs]}: give --mirror ARM=JAXTOK_ARM or ARM=CONFIG.yaml (the "
                         "arm or config whose FLOPs formula applies)")
    summ = [trl_run_summary(json.loads((r / "trl_run.json").read_text()), at) for r in runs]
    from jaxtok.config import load_config

    rows = load_config(mirror_run if mirror_run.suffix == ".yaml" else mirror_run / "config.yaml").data.batch_size
    for r, s_ in zip(runs, summ):
        if s_["rows_per_step"] != rows:
            raise UsageError(f"{r}: {s_['rows_per_step']} rows per step, the mirrored jaxtok run {mirror_run} has {rows}")
    steps = min(s_["steps"] for s_ in summ)  # the flops at the shortest run's steps (all equal when complete)
    return {"finals": [s_["curve"][max(s_["curve"])] for s_ in summ],
            "curves": [{str(k): v for k, v in s_["curve"].items()} for s_ in summ],
            "walls": [s_["wall_s"] for s_ in summ], "segs": [[s_["wall_s"]] for s_ in summ],
            "step_s": [s_["step_s"] for s_ in summ], "steps": steps, "steps_per_seed": [s_["steps"] for s_ in summ],
            "flops": _flops(mirror_run, teacher, steps), "rows_per_step": rows}


def arm_summary(runs: list[Path], start_acc: float, n_eval: int, teacher: str | None = None, at: int | None = None,
                train_metrics: tuple[str, ...] = (), mirror_run: Path | None = None) -> dict:
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file() and not is_trl_run(r)]
    if missing:
        raise UsageError(f"{missing}: neither metrics.jsonl (jaxtok) nor trl_run.json (TRL)")
    if any(is_trl_run(r) for r in runs):
        if not all(is_trl_run(r) for r in runs):
            raise UsageError(f"arm mixes TRL and jaxtok run directories: {[str(r) for r in runs]}")
        t = _trl_arm(runs, at, mirror_run, teacher)
        return _finish(t["finals"], start_acc, n_eval, steps=t["steps"], flops=t["flops"], walls=t["walls"],
                       segs=t["segs"], step_s=t["step_s"], tm={k: [None] * len(runs) for k in train_metrics},
                       curves=t["curves"], runs=runs,
                       extra={"library": "trl", "steps_per_seed": t["steps_per_seed"],
                              "rows_per_step": t["rows_per_step"],
                              "flops_note": f"the jaxtok formula of {mirror_run} (same model, rows per step and "
                                            f"tokens) at {t['steps']} steps: equal to jaxtok's by construction",
                              "wall_note": "sum of logged step seconds (training only; evals excluded)"})
    finals, curves, walls, segs, step_s = [], [], [], [], []
    tm = {k: [] for k in train_metrics}
    steps = None
    for run in runs:
        recs = _records(run, at)
        ev = {r["step"]: r["eval/exact_match"] for r in recs if "eval/exact_match" in r}
        last = max(ev)
        finals.append(ev[last])
        curves.append({str(k): v for k, v in sorted(ev.items())})
        total, parts = _wall(recs)
        walls.append(total)
        segs.append(parts)
        step_s.append(_step_s(recs))
        for k in train_metrics:
            vals = [r[k] for r in recs if k in r and "event" not in r]
            tm[k].append(float(np.mean(vals)) if vals else None)
        steps = last
    return _finish(finals, start_acc, n_eval, steps=steps, flops=_flops(runs[0], teacher, at), walls=walls, segs=segs,
                   step_s=step_s, tm=tm, curves=curves, runs=runs)


def _finish(finals, start_acc, n_eval, *, steps, flops, walls, segs, step_s, tm, curves, runs, extra=None) -> dict:
    """An arm's summary dict from its per-seed values: mean, 95% interval, gain, step time and FLOPs."""
    m = float(np.mean(finals))
    if len(finals) >= 2:
        half = T95[len(finals) - 1] * float(np.std(finals, ddof=1)) / math.sqrt(len(finals))
        how = f"Student t over {len(finals)} seeds"
    else:
        half = 1.96 * math.sqrt(m * (1 - m) / n_eval)
        how = f"binomial, one seed, {n_eval} held-out prompts"
    return {"start_acc": start_acc, "final_acc_mean": m, "final_acc_ci95": [m - half, m + half], "ci95_method": how,
            "final_acc_per_seed": finals, "gain_pp": 100 * (m - start_acc), "seeds": len(finals), "steps": steps,
            "train_flops": flops, "wall_s_per_seed": walls, "wall_s_segments": segs,
            "step_s_per_seed": step_s, "step_s_mean": _mean([x for x in step_s if x is not None]),
            "train_metrics": {k: {"per_seed": v, "mean": _mean([x for x in v if x is not None])} for k, v in tm.items()},
            "curves": curves, "run_dirs": [str(r) for r in runs], **(extra or {})}


def _mean(xs) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def plot_overlay(arms: dict, overlays: list[tuple[str, str, str]], png: Path, command: str) -> None:
    """Held-out greedy exact match against the optimizer step, one panel per ``(title, jaxtok_arm, trl_arm)``:
    jaxtok's seeds (thin) and their mean (thick, with the seeds' min-max band), TRL's seeds dashed; each arm's start
    model at step 0; ``made by: <command>`` under the panels."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(overlays), figsize=(7.5 * len(overlays), 5.8), dpi=100, squeeze=False,
                             layout="constrained")
    for ax, (title, jname, tname) in zip(axes[0], overlays):
        j, t = arms[jname], arms[tname]
        start_acc = j["start_acc"]
        series = [[(0, start_acc)] + [(int(k), v) for k, v in c.items()] for c in j["curves"]]
        common = sorted(set.intersection(*[{x for x, _ in s_} for s_ in series]))
        ys = np.array([[dict(s_)[x] for x in common] for s_ in series])
        for n, s_ in enumerate(series):
            ax.plot(*zip(*s_), "-", color="tab:blue", lw=0.8, alpha=0.45, label="jaxtok, each seed" if n == 0 else None)
        ax.fill_between(common, ys.min(0), ys.max(0), color="tab:blue", alpha=0.12)
        ax.plot(common, ys.mean(0), "-o", color="tab:blue", lw=2.2, ms=4,
                label=f"jaxtok `{jname}`, mean of {len(series)} seeds (band: min-max)")
        for n, c in enumerate(t["curves"]):
            xs, vs = zip(*([(0, t["start_acc"])] + [(int(k), v) for k, v in c.items()]))
            ax.plot(xs, vs, "--s", color="tab:red", lw=1.6, ms=4, alpha=1.0 if n == 0 else 0.6,
                    label=f"TRL `{tname}`, seed {n}")
        ax.axhline(start_acc, color="grey", lw=0.8, ls=":", label=f"start model {start_acc:.3f}")
        if abs(t["start_acc"] - start_acc) > 1e-9:
            ax.axhline(t["start_acc"], color="tab:red", lw=0.8, ls=":", label=f"TRL's start model {t['start_acc']:.3f}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out greedy exact match (1200 prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.supxlabel("\n".join(textwrap.wrap(f"made by: {command}", 125 * len(overlays), subsequent_indent="    ")), fontsize=7,
                  color="0.3", x=0.01, ha="left", family="monospace")
    fig.savefig(png)
    plt.close(fig)


def _pairs(specs: list[str], flag: str) -> dict:
    """``NAME=VALUE`` command-line items as a dict (a missing ``=``: UsageError)."""
    bad = [x for x in specs if "=" not in x]
    if bad:
        raise UsageError(f"{flag} {bad[0]!r}: expected NAME=VALUE")
    return dict(x.split("=", 1) for x in specs)


def main(argv=None):
    try:
        return _main(argv)
    except UsageError as e:
        print(f"proving_ground: {e}", file=sys.stderr)
        raise SystemExit(2)


def _main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", required=True, help="run directory of the start model (its summary.json)")
    ap.add_argument("--arm", action="append", required=True, help="NAME=RUN_DIR[,RUN_DIR...]")
    ap.add_argument("--teacher", default=None, help="teacher run directory: counts its sampling of SFT-sample data")
    ap.add_argument("--cmd", action="append", default=[], help="NAME=command (the command behind the arm)")
    ap.add_argument("--note", action="append", default=[], help="NAME=text (a note for the arm's row)")
    ap.add_argument("--at", action="append", default=[], help="NAME=STEP: read the arm's runs at that eval step")
    ap.add_argument("--train-metric", action="append", default=[], help="a logged training key to average per arm")
    ap.add_argument("--paired-with", default=None,
                    help="NAME of a reference arm: per-seed differences (same seed index) of every arm's final accuracy "
                         "against it, with a t-interval over the seeds")
    ap.add_argument("--memory", default=None, help="json {arm: {temp_mb, peak_mb}} of each arm's compiled step")
    ap.add_argument("--memory-config", action="append", default=[],
                    help="NAME=CONFIG: compile the arm's train step from CONFIG (train.seed=0) and add its XLA memory "
                         "analysis (jaxtok.bench.train.variant_step_memory, the TIP bench's `memory: true`)")
    ap.add_argument("--mirror", action="append", default=[],
                    help="TRL_ARM=JAXTOK_ARM[:CONFIG.yaml]: the jaxtok arm a TRL arm mirrors (its FLOPs formula; rows "
                         "checked); the formula comes from the arm's first run directory, or from CONFIG.yaml when "
                         "given (needed when the jaxtok arm is carried over by --keep)")
    ap.add_argument("--keep", default=None,
                    help="a previous output json: its arms not named by --arm are carried over as recorded (their "
                         "run directories need not exist any more); named arms are recomputed in place")
    ap.add_argument("--overlay", action="append", default=[],
                    help="TITLE=JAXTOK_ARM,TRL_ARM: a panel of <out>_trl.png (held-out accuracy vs step)")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .table.md are written)")
    a = ap.parse_args(argv)
    summ = json.loads((Path(a.start) / "summary.json").read_text())
    start_acc, n_eval = summ["eval/exact_match"], int(summ["eval/num_examples"])
    cmds, notes = _pairs(a.cmd, "--cmd"), _pairs(a.note, "--note")
    at = {k: int(v) for k, v in _pairs(a.at, "--at").items()}
    arm_dirs = {name: [Path(d) for d in dirs.split(",")] for name, dirs in _pairs(a.arm, "--arm").items()}
    kept = {}
    if a.keep:
        if not Path(a.keep).is_file():
            raise UsageError(f"--keep {a.keep}: no such file")
        kept = {n: {**r, "kept_from": r.get("kept_from", a.keep)}
                for n, r in json.loads(Path(a.keep).read_text())["arms"].items() if n not in arm_dirs}
    known = [*kept, *arm_dirs]
    mirror, mirror_src = {}, {}
    for trl_arm, spec in _pairs(a.mirror, "--mirror").items():
        jname, _, config = spec.partition(":")
        if jname not in known:
            raise UsageError(f"--mirror: no arm named {jname!r} (arms: {', '.join(known)})")
        if not config and jname not in arm_dirs:
            raise UsageError(f"--mirror {trl_arm}={spec}: {jname!r} is carried over by --keep (no run directory): "
                             f"give its config, {trl_arm}={jname}:CONFIG.yaml")
        if config and not Path(config).is_file():
            raise UsageError(f"--mirror {trl_arm}={spec}: no such config file {config!r}")
        mirror[trl_arm], mirror_src[trl_arm] = jname, Path(config) if config else arm_dirs[jname][0]
    overlays = []
    for title, names in _pairs(a.overlay, "--overlay").items():
        pair = names.split(",")
        if len(pair) != 2 or any(n not in known for n in pair):
            raise UsageError(f"--overlay {title}={names}: expected two arm names JAXTOK_ARM,TRL_ARM "
                             f"(arms: {', '.join(known)})")
        overlays.append((title, *pair))
    memory = json.loads(Path(a.memory).read_text()) if a.memory else {}
    for spec in a.memory_config:
        from jaxtok.config import load_config, validate_names
        from jaxtok.bench.train import variant_step_memory

        name, path = spec.split("=", 1)
        plan = validate_names(load_config(path, ["train.seed=0", "run.progress=false"]))
        memory[name] = {**variant_step_memory(plan), "config": path}
    fresh = {}
    for name, dirs in arm_dirs.items():
        fresh[name] = arm_summary(dirs, start_acc, n_eval, a.teacher, at.get(name), tuple(a.train_metric),
                                  mirror_src.get(name))
    order = list(json.loads(Path(a.keep).read_text())["arms"]) if a.keep else []
    arms = {n: kept.get(n) or fresh[n] for n in [*order, *[n for n in fresh if n not in order]]}
    for name in fresh:
        if name in mirror:
            arms[name]["mirrors"] = mirror[name]
        arms[name]["command"] = cmds.get(name)
        if name in notes:
            arms[name]["note"] = notes[name]
        if name in memory:
            arms[name]["step_memory_mb"] = memory[name]
    if a.paired_with:
        ref = arms[a.paired_with]["final_acc_per_seed"]
        for name, r in arms.items():
            if name == a.paired_with:
                continue
            d = [x - y for x, y in zip(r["final_acc_per_seed"], ref)]
            m = float(np.mean(d))
            half = T95[len(d) - 1] * float(np.std(d, ddof=1)) / math.sqrt(len(d)) if len(d) >= 2 else None
            r["paired_vs"] = {"arm": a.paired_with, "diff_pp_per_seed": [100 * x for x in d], "diff_pp_mean": 100 * m,
                              "diff_pp_ci95": [100 * (m - half), 100 * (m + half)] if half is not None else None}
    out = {"start_model": a.start, "start_acc": start_acc, "num_eval": n_eval, "arms": arms}
    Path(a.out + ".json").write_text(json.dumps(out, indent=2))
    tms = list(a.train_metric)
    lines = ["| arm | seeds | steps | start | final (mean) | per seed | 95% interval | gain (pp) | train TFLOPs | "
             "wall s/seed | step s | step temp / peak MiB |" + "".join(f" {k} |" for k in tms),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(tms)]
    fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    for name, r in arms.items():
        w = [x for x in r["wall_s_per_seed"] if x is not None]
        mem = r.get("step_memory_mb") or {}
        mem_s = f"{mem['temp_mb']:.2f} / {mem['peak_mb']:.2f}" if mem.get("temp_mb") is not None else ""
        lines.append(f"| {name} | {r['seeds']} | {r['steps']} | {r['start_acc']:.3f} | {r['final_acc_mean']:.3f} | "
                     + " / ".join(f"{x:.3f}" for x in r["final_acc_per_seed"]) + " | "
                     f"[{r['final_acc_ci95'][0]:.3f}, {r['final_acc_ci95'][1]:.3f}] | {r['gain_pp']:+.1f} | "
                     f"{r['train_flops'] / 1e12:.3f} | {fmt(np.mean(w) if w else None, '.0f')} | "
                     f"{fmt(r['step_s_mean'], '.2f')} | {mem_s} |"
                     + "".join(f" {fmt(r['train_metrics'][k]['mean'], '.3f')} |" for k in tms))
    if any(r.get("paired_vs") for r in arms.values()):
        lines.append("")
    for name, r in arms.items():
        pv = r.get("paired_vs")
        if pv:
            ci = pv["diff_pp_ci95"]
            lines.append(f"* `{name}` − `{pv['arm']}` per seed: " + " / ".join(f"{x:+.1f}" for x in pv["diff_pp_per_seed"])
                         + f" pp, mean {pv['diff_pp_mean']:+.1f} pp"
                         + (f", 95% t-interval [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""))
    lines.append("")
    for name, r in arms.items():
        lines.append(f"* `{name}`: `{r['command']}`" + (f" — {r['note']}" if r.get("note") else ""))
        for run, curve in zip(r["run_dirs"], r["curves"]):
            lines.append(f"  * {run}: " + ", ".join(f"{k}: {v:.3f}" for k, v in curve.items()))
    Path(a.out + ".table.md").write_text("\n".join(lines) + "\n")
    if overlays:
        runs = "; ".join(f"{n}: {','.join(arms[n]['run_dirs'])}" for _, j, t in overlays for n in (j, t))
        plot_overlay(arms, overlays, Path(a.out + "_trl.png"),
                     f"python scripts/proving_ground.py ... --out {a.out} (full command beside the results page); {runs}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
