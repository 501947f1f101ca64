"""Scaling laws for speculative decoding on the tiny zoo (issue 18 item 3; Yan et al. 2025, arXiv:2505.07858).

A ladder of AR drafts (``drafts`` in the config: ModelConfig overrides of the zoo draft preset) is trained on the
zoo task (``jaxtok train <draft_config>``, checkpoints every ``checkpoint_every`` steps, cached: a finished run
directory is not trained again); the target is the zoo teacher (trained from ``target_config`` when missing). For
every draft checkpoint and every γ of ``gammas``, greedy speculative decoding of the held-out prompts gives the mean
accepted length, turned into a per-draft acceptance α (:func:`jaxtok.decode.spec_cost.alpha_from_accepted`).
Fits as the paper's Theorems 1.1/1.2: α against ln(training tokens) per draft, α against ln(draft non-embedding
parameters) at the last checkpoint, and jointly. At the last checkpoint of every draft, each γ is also timed
against greedy AR of the target (interleaved passes, the fastest counts) and the draft/target forward cost ratio c
is measured; the fitted α and c give the model's best γ (``σ(α, γ)/(1 + γ c)``), compared with the measured best.

    python scripts/spec_scaling.py configs/scripts/spec_scaling.yaml   # -> docs/results/spec_scaling.{json,md,png}

An unknown config key or a bad value exits with code 2 naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxtok.config import load_config
from jaxtok.data import make_task_from_config
from jaxtok.decode import generate, speculative_generate
from jaxtok.sampling import GREEDY
from jaxtok.decode import spec_scaling as sl
from jaxtok.bench.speculative import _prompt_batches, forward_costs, timed_against
from jaxtok.metrics import default_command, markdown_table, save_plot, script_args
from jaxtok.models.flops import num_params
from jaxtok.models.hf import load_any
from jaxtok.tasks.tokenizer import SpecialTokens, load_tokenizer_for


@dataclasses.dataclass(frozen=True)
class ScalingArgs:
    """``target``: the target's run directory, trained by ``target_config`` if it has no checkpoint; ``drafts``:
    ``[{name, overrides}]`` trained by ``draft_config`` into ``<out_dir>/<name>`` for ``train_steps`` steps with
    a checkpoint every ``checkpoint_every`` (plus ``train_overrides``, dotted ``key=value`` strings);
    ``gammas``; ``batch_size`` decode rows per call; ``num_examples`` held-out prompts; ``repeats`` timed
    passes; ``cost_repeats``; ``out`` the results path stem."""

    target: str = "runs/zoo/teacher"
    target_config: str = "configs/zoo/teacher.yaml"
    draft_config: str = "configs/zoo/draft.yaml"
    drafts: tuple = ()
    train_overrides: tuple = ()
    batch_size: int = 128
    train_steps: int = 1500
    checkpoint_every: int = 250
    out_dir: str = "runs/scaling"
    gammas: tuple = (1, 2, 4, 8)
    num_examples: int = 256
    repeats: int = 2
    cost_repeats: int = 10
    out: str = "docs/results/spec_scaling"

    def __post_init__(self):
        if not self.drafts:
            raise ValueError("drafts: give at least two [{name, overrides}]")
        for i, d in enumerate(self.drafts):
            if not isinstance(d, dict) or set(d) - {"name", "overrides"} or "name" not in d:
                raise ValueError(f"drafts[{i}]={d!r}: allowed keys name (required), overrides")
        if len({d["name"] for d in self.drafts}) != len(self.drafts):
            raise ValueError("drafts: names must be distinct")
        for name in ("train_steps", "checkpoint_every", "num_examples", "repeats", "cost_repeats", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if not self.gammas or any(int(g) < 1 for g in self.gammas):
            raise ValueError(f"gammas={self.gammas!r}: positive integers")


def steps_of(run_dir: Path) -> list[int]:
    ck = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.is_dir() else []


def train_if_missing(config: str, run_dir: Path, extra: list[str]) -> float:
    """``jaxtok train config run.out_dir=... run.name=... <extra>`` unless ``run_dir`` has checkpoints; seconds."""
    if steps_of(run_dir):
        return 0.0
    cmd = ["jaxtok", "train", config, f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", *extra]
    print("train:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def sd_counts(outs, meta) -> dict:
    """Sums over the real rows of every batch: accepted, drafted, rounds, emitted tokens."""
    acc = drafted = rounds = toks = 0
    for o, (_, b) in zip(outs, meta):
        acc += int(np.sum(np.asarray(o.accepted)[:b]))
        drafted += int(np.sum(np.asarray(o.drafted)[:b]))
        rounds += int(np.sum(np.asarray(o.rounds)[:b]))
        toks += int(np.sum(np.asarray(o.lengths)[:b]))
    return {"accepted": acc, "drafted": drafted, "rounds": rounds, "tokens": toks}


def main(argv: list[str]) -> int:
    a = script_args(ScalingArgs, argv, "spec_scaling", need_path=True)
    if a is None:
        return 2
    command = default_command()
    t0 = time.perf_counter()
    train_s = {"target": train_if_missing(a.target_config, Path(a.target), [])}
    for d in a.drafts:
        ov = [f"model.overrides.{k}={v}" for k, v in (d.get("overrides") or {}).items()]
        train_s[d["name"]] = train_if_missing(
            a.draft_config, Path(a.out_dir) / d["name"],
            [*a.train_overrides, *ov, f"train.steps={a.train_steps}", f"train.checkpoint_every={a.checkpoint_every}",
             f"train.keep_checkpoints={a.train_steps // a.checkpoint_every + 1}"])
    cfg = load_config(a.draft_config, [f"model.init_from={a.target}", f"decode.batch_size={a.batch_size}"])
    tok = load_tokenizer_for(cfg)
    sp = SpecialTokens.of(tok)
    task = make_task_from_config(cfg.data)
    batches, meta = _prompt_batches(task, "eval", tok, cfg, a.num_examples)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    n_new = cfg.decode.max_new_tokens
    key = jax.random.key(0)
    target, _ = load_any(a.target, key="target")
    ar = lambda p, v: generate(target, p, v, max_new_tokens=n_new, sampling=GREEDY,  # noqa: E731
                               stop_tokens=sp.eos_ids, pad_id=sp.pad, rng=key, return_logprobs=False)
    print(f"setup {time.perf_counter() - t0:.0f}s (training {train_s})", flush=True)

    rows, timing, costs = [], [], {}
    for d in a.drafts:
        run = Path(a.out_dir) / d["name"]
        steps = steps_of(run)
        for step in steps:
            draft, _ = load_any(run, key=d["name"], step=step)
            params = num_params(draft.cfg, include_embedding=False)
            last = step == steps[-1]
            for g in a.gammas:
                sd = lambda p, v: speculative_generate(target, draft, p, v, max_new_tokens=n_new,  # noqa: E731
                                                       draft_len=int(g), sampling=GREEDY, stop_tokens=sp.eos_ids,
                                                       pad_id=sp.pad, rng=key)
                if last:
                    outs, best, best_ref, _ = timed_against(sd, ar, batches, a.repeats)
                else:
                    outs = [jax.block_until_ready(sd(p, v)) for p, v in batches]
                c = sd_counts(outs, meta)
                mal = c["accepted"] / max(c["rounds"], 1)
                row = {"draft": d["name"], "params": params, "step": step, "train_tokens": step * tokens_per_step,
                       "gamma": int(g), "mean_accepted": mal, "alpha": sl.alpha_from_accepted(mal, int(g)),
                       "acceptance_rate": c["accepted"] / max(c["drafted"], 1),
                       "tokens_per_round": (c["tokens"] - sum(b for _, b in meta)) / max(c["rounds"], 1)}
                rows.append(row)
                if last:
                    timing.append({"draft": d["name"], "params": params, "gamma": int(g), "alpha": row["alpha"],
                                   "speedup": best_ref / best, "sd_s": best, "ar_s": best_ref})
                print(f"{d['name']} step {step} γ={g}: α={row['alpha']:.3f} mal={mal:.2f}"
                      + (f" speedup {timing[-1]['speedup']:.2f}" if last else ""), flush=True)
            if last:
                fc = forward_costs(target, draft, None, cfg.decode.batch_size, cfg.data.prompt_len + n_new + 10, 4,
                                   a.cost_repeats)
                costs[d["name"]] = {**fc, "c": fc["draft_step"] / fc["target_step"]}

    # fits: α pooled over γ per (draft, step)
    pooled = {}
    for r in rows:
        pooled.setdefault((r["draft"], r["step"]), []).append(r)
    pts = [{"draft": k[0], "step": k[1], "params": v[0]["params"], "train_tokens": v[0]["train_tokens"],
            "alpha": float(np.mean([r["alpha"] for r in v]))} for k, v in pooled.items()]
    finals = [max((p for p in pts if p["draft"] == d["name"]), key=lambda p: p["step"]) for d in a.drafts]
    fits = {"alpha_vs_params": sl.fit_log_linear([p["params"] for p in finals], [p["alpha"] for p in finals]),
            "alpha_vs_tokens": {d["name"]: sl.fit_log_linear(
                [p["train_tokens"] for p in pts if p["draft"] == d["name"]],
                [p["alpha"] for p in pts if p["draft"] == d["name"]]) for d in a.drafts},
            "joint": sl.fit_log_linear_2d([p["params"] for p in pts], [p["train_tokens"] for p in pts],
                                          [p["alpha"] for p in pts])}
    choice = []
    for d in a.drafts:
        tr = [t for t in timing if t["draft"] == d["name"]]
        fin = next(p for p in finals if p["draft"] == d["name"])
        alpha_fit = sl.predict_log_linear(fits["alpha_vs_params"], fin["params"])
        cc = costs[d["name"]]["c"]
        choice.append({"draft": d["name"], "params": fin["params"], "alpha": fin["alpha"], "alpha_fit": alpha_fit,
                       "c": cc, "model_best_gamma": sl.best_gamma(alpha_fit, cc, a.gammas),
                       "model_best_speedup": sl.speedup_model(alpha_fit, sl.best_gamma(alpha_fit, cc, a.gammas), cc),
                       "measured_best_gamma": max(tr, key=lambda t: t["speedup"])["gamma"],
                       "measured_best_speedup": max(t["speedup"] for t in tr)})
    results = {"command": command, "args": dataclasses.asdict(a), "tokens_per_step": tokens_per_step,
               "training_s": train_s, "rows": rows, "pooled": pts, "timing": timing, "costs": costs, "fits": fits,
               "gamma_choice": choice, "wall_s": time.perf_counter() - t0}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")

    def draw(ax):
        gs = ax.get_subplotspec().subgridspec(1, 3, wspace=0.3)
        fig = ax.figure
        ax.remove()
        ax1, ax2, ax3 = (fig.add_subplot(gs[0, i]) for i in range(3))
        for i, d in enumerate(a.drafts):
            ps = [p for p in pts if p["draft"] == d["name"]]
            xs = [p["train_tokens"] for p in ps]
            ax1.plot(xs, [p["alpha"] for p in ps], "o", color=f"C{i}", label=d["name"])
            f = fits["alpha_vs_tokens"][d["name"]]
            xx = np.geomspace(min(xs), max(xs), 20)
            ax1.plot(xx, [sl.predict_log_linear(f, x) for x in xx], "-", color=f"C{i}", lw=0.8)
        ax1.set_xscale("log"), ax1.set_xlabel("draft training tokens"), ax1.set_ylabel("acceptance α")
        ax1.set_title("α vs training tokens (Thm 1.1 form)", fontsize=9), ax1.legend(fontsize=7)
        xs = [p["params"] for p in finals]
        ax2.plot(xs, [p["alpha"] for p in finals], "o")
        xx = np.geomspace(min(xs), max(xs), 20)
        f = fits["alpha_vs_params"]
        ax2.plot(xx, [sl.predict_log_linear(f, x) for x in xx], "-",
                 label=f"α = {f['a']:.3f} + {f['b']:.3f} ln N  (r²={f['r2']:.2f})")
        ax2.set_xscale("log"), ax2.set_xlabel("draft non-embedding parameters N"), ax2.set_ylabel("acceptance α")
        ax2.set_title("α vs draft capacity (Thm 1.2 form), last checkpoints", fontsize=9), ax2.legend(fontsize=7)
        for i, d in enumerate(a.drafts):
            tr = [t for t in timing if t["draft"] == d["name"]]
            ax3.plot([t["gamma"] for t in tr], [t["speedup"] for t in tr], "o-", color=f"C{i}", label=d["name"])
            ch = next(c for c in choice if c["draft"] == d["name"])
            ax3.plot([g for g in a.gammas], [sl.speedup_model(ch["alpha_fit"], int(g), ch["c"]) for g in a.gammas],
                     "--", color=f"C{i}", lw=0.8)
        ax3.axhline(1.0, color="0.5", lw=0.8)
        ax3.set_xscale("log", base=2), ax3.set_xlabel("γ"), ax3.set_ylabel("wall speedup over AR (dashed: model)")
        ax3.set_title("speedup vs γ, last checkpoints", fontsize=9), ax3.legend(fontsize=7)

    save_plot(out.with_suffix(".png"), draw, command=command, size=(15.0, 5.5))
    out.with_name(out.name + ".tables.md").write_text(
        "## pooled α\n\n" + markdown_table(pts) + "\n## timing\n\n" + markdown_table(timing)
        + "\n## γ choice\n\n" + markdown_table(choice) + "\n## rows\n\n" + markdown_table(rows))
    print(f"done in {time.perf_counter() - t0:.0f}s -> {out}.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
