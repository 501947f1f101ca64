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
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _flops(run: Path, teacher: str | None = None) -> float:
    from jaxtok.config import load_config
    from jaxtok.models import flops_per_token, presets
    from jaxtok.tasks import load_tokenizer

    cfg = load_config(run / "config.yaml")
    V = load_tokenizer(run / "tokenizer.json").get_vocab_size()

    def fwd(path_or_preset, seq):
        if path_or_preset in presets.PRESETS:
            mc = presets.get(path_or_preset, vocab_size=V)
        else:
            mc = presets.get(load_config(Path(path_or_preset) / "config.yaml").model.preset, vocab_size=V)
        return flops_per_token(mc, seq).forward

    init = cfg.model.init_from
    student_preset = load_config(Path(init) / "config.yaml").model.preset if init else cfg.model.preset
    rows, steps = cfg.data.batch_size, cfg.train.steps
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


def arm_summary(runs: list[Path], start_acc: float, n_eval: int, teacher: str | None = None) -> dict:
    finals, curves, walls = [], [], []
    steps = None
    for run in runs:
        recs = _records(run)
        ev = {r["step"]: r["eval/exact_match"] for r in recs if "eval/exact_match" in r}
        last = max(ev)
        finals.append(ev[last])
        curves.append({str(k): v for k, v in sorted(ev.items())})
        times = [r["time"] for r in recs if "time" in r]
        walls.append(times[-1] - times[0] if len(times) > 1 else None)
        steps = last
    m = float(np.mean(finals))
    if len(finals) >= 2:
        half = T95[len(finals) - 1] * float(np.std(finals, ddof=1)) / math.sqrt(len(finals))
        how = f"Student t over {len(finals)} seeds"
    else:
        half = 1.96 * math.sqrt(m * (1 - m) / n_eval)
        how = f"binomial, one seed, {n_eval} held-out prompts"
    return {"start_acc": start_acc, "final_acc_mean": m, "final_acc_ci95": [m - half, m + half], "ci95_method": how,
            "final_acc_per_seed": finals, "gain_pp": 100 * (m - start_acc), "seeds": len(finals), "steps": steps,
            "train_flops": _flops(runs[0], teacher), "wall_s_per_seed": walls, "curves": curves,
            "run_dirs": [str(r) for r in runs]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", required=True, help="run directory of the start model (its summary.json)")
    ap.add_argument("--arm", action="append", required=True, help="NAME=RUN_DIR[,RUN_DIR...]")
    ap.add_argument("--teacher", default=None, help="teacher run directory: counts its sampling of SFT-sample data")
    ap.add_argument("--cmd", action="append", default=[], help="NAME=command (the command behind the arm)")
    ap.add_argument("--note", action="append", default=[], help="NAME=text (a note for the arm's row)")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    a = ap.parse_args(argv)
    summ = json.loads((Path(a.start) / "summary.json").read_text())
    start_acc, n_eval = summ["eval/exact_match"], int(summ["eval/num_examples"])
    cmds = dict(c.split("=", 1) for c in a.cmd)
    notes = dict(c.split("=", 1) for c in a.note)
    arms = {}
    for spec in a.arm:
        name, dirs = spec.split("=", 1)
        arms[name] = arm_summary([Path(d) for d in dirs.split(",")], start_acc, n_eval, a.teacher)
        arms[name]["command"] = cmds.get(name)
        if name in notes:
            arms[name]["note"] = notes[name]
    out = {"start_model": a.start, "start_acc": start_acc, "num_eval": n_eval, "arms": arms}
    Path(a.out + ".json").write_text(json.dumps(out, indent=2))
    lines = ["| arm | seeds | steps | start | final (mean) | 95% interval | gain (pp) | train TFLOPs | wall s/seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in arms.items():
        w = [x for x in r["wall_s_per_seed"] if x is not None]
        lines.append(f"| {name} | {r['seeds']} | {r['steps']} | {r['start_acc']:.3f} | {r['final_acc_mean']:.3f} | "
                     f"[{r['final_acc_ci95'][0]:.3f}, {r['final_acc_ci95'][1]:.3f}] | {r['gain_pp']:+.1f} | "
                     f"{r['train_flops'] / 1e12:.3f} | {np.mean(w):.0f} |" if w else "")
    lines.append("")
    for name, r in arms.items():
        lines.append(f"* `{name}`: `{r['command']}`" + (f" — {r['note']}" if r.get("note") else ""))
        for run, curve in zip(r["run_dirs"], r["curves"]):
            lines.append(f"  * {run}: " + ", ".join(f"{k}: {v:.3f}" for k, v in curve.items()))
    Path(a.out + ".table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
