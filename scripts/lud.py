"""LUD (lexical unit decoding, decode_methods.md §A8) against AR and speculative decoding on the testbed.

On the same held-out prompts (``--config``'s task, ``data.num_eval`` of them, greedy, ``decode.max_new_tokens``)
every row runs through :func:`jaxtok.decode.evaluate.evaluate` (the one decode-and-score loop):

- ``base AR``: the base model (``--base``, the testbed teacher) decoded greedily;
- ``lud AR``: the LUD-fine-tuned model (``--lud``) decoded greedily (is next-token quality kept?);
- ``lud k=.. α=..``: LUD decoding of the fine-tuned model (tokens per forward, exact match);
- ``base lud k=4 α=0.9``: LUD decoding of the UNTUNED base model (control: what the fine-tuning adds);
- ``spec ...``: lossless greedy speculative decoding of the fine-tuned model with the testbed student as drafter
  and with the n-gram (prompt lookup) drafter (tokens per target forward).

Timing (:func:`time_methods`, the ``--timed`` methods and ``lud AR``): ``--repeats`` rounds after an untimed
compile round; in each, every method decodes the same batches (interleaved, one process), at ``--batch-size`` (all
held-out prompts: throughput regime) and at batch 1 (the first ``--latency-prompts`` prompts: the latency regime
LUD's paper measures). Wall-clock and process CPU time (all threads; less sensitive to other jobs on a shared
machine) are divided by the same round's ``lud AR`` time; medians of those ratios are reported. The load average
is recorded beside the numbers.

Writes ``<out>.json`` and ``<out>.md`` (table) and ``<out>.png`` (exact match vs tokens per forward).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _load(path):
    from jaxtok.train.loop import load_model

    return load_model(path)[0]


def build_methods(models: dict, tok, max_new_tokens: int, grid) -> dict:
    """``name -> (step, kind)`` for every compared decoder."""
    from jaxtok.decode.evaluate import ar_step, lud_step, speculative_step
    from jaxtok.decode.lud import LUDArgs
    from jaxtok.decode.speculative import ModelDrafter, NgramDrafter
    from jaxtok.decode.draft_policies import Fixed

    n = max_new_tokens
    out = {"base AR": (ar_step(models["base"], tok, max_new_tokens=n), "ar"),
           "lud AR": (ar_step(models["lud"], tok, max_new_tokens=n), "ar")}
    for k, alpha, g in grid:
        name = f"lud k={k} α={alpha:g}" + (f" rep={g}" if g else "")
        out[name] = (lud_step(models["lud"], tok, args=LUDArgs(k=k, threshold=alpha, repeat_ngram=g),
                              max_new_tokens=n), "lud")
    out["base lud k=4 α=0.9"] = (lud_step(models["base"], tok, args=LUDArgs(k=4, threshold=0.9), max_new_tokens=n),
                                 "lud")
    vocab = models["lud"].cfg.vocab_size
    if "student" in models:
        out["spec student γ=4"] = (speculative_step(models["lud"], ModelDrafter.of(models["student"]), Fixed(), tok,
                                                    draft_len=4, max_new_tokens=n), "spec")
    out["spec ngram γ=4"] = (speculative_step(models["lud"], NgramDrafter(vocab_size=vocab, max_ngram=3), Fixed(),
                                              tok, draft_len=4, max_new_tokens=n), "spec")
    return out


def per_forward(m: dict) -> float:
    """Tokens per (target) forward per row of one :func:`evaluate` result (AR: 1)."""
    if "tokens_per_forward" in m:
        return m["tokens_per_forward"]
    if "tokens_per_target_forward" in m:
        return m["tokens_per_target_forward"]
    return 1.0


def batches(task, tok, cfg, batch_size: int, num: int) -> list:
    """The held-out prompt batches ``[(prompt, valid)]`` :func:`evaluate` decodes (short last batch padded)."""
    from jaxtok.data import pad_prompt_batch, prompt_dataset

    ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=batch_size,
                           num_examples=num, overlong=cfg.data.overlong)
    return [pad_prompt_batch(b, batch_size) for b in ds]


def time_methods(methods: dict, regimes: dict, repeats: int) -> dict:
    """Interleaved timing in this process: ``repeats`` rounds; in each, every method decodes every batch of every
    regime (``block_until_ready`` on the tokens). Returns ``{regime: {method: {"wall": [...], "cpu": [...]}}}``:
    wall-clock and process CPU seconds (all threads) per round. A first untimed pass compiles each shape."""
    key = jax.random.key(0)
    out = {r: {m: {"wall": [], "cpu": []} for m in methods} for r in regimes}
    for rep in range(repeats + 1):
        for regime, bs in regimes.items():
            for name, (step, _) in methods.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for i, (p, v) in enumerate(bs):
                    jax.block_until_ready(step(p, v, jax.random.fold_in(key, i))[0])
                if rep:  # round 0 compiles
                    out[regime][name]["wall"].append(time.perf_counter() - t0)
                    out[regime][name]["cpu"].append(time.process_time() - c0)
    return out


def divergence(model, task, tok, cfg, settings, max_new_tokens: int) -> list:
    """Where LUD's greedy output first differs from the same model's greedy AR output, on the held-out prompts:
    rows differing, wrong rows, and the region of the first differing token — ``echo`` (the copy of the prompt
    before ``=``), ``answer`` (the computed result, before ``>``) or ``copy`` (the result repeated after ``>``)."""
    from jaxtok.decode.generate import generate
    from jaxtok.decode.lud import LUDArgs, lud_generate
    from jaxtok.sampling import GREEDY
    from jaxtok.tasks.tokenizer import SpecialTokens, decode

    sp = SpecialTokens.of(tok)
    from jaxtok.data import prompt_dataset

    ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=cfg.data.num_eval,
                           num_examples=cfg.data.num_eval, overlong=cfg.data.overlong)
    batch = next(iter(ds))
    p, v, index = batch["prompt"], batch["prompt_valid"], batch["index"]
    kw = dict(max_new_tokens=max_new_tokens, sampling=GREEDY, stop_tokens=sp.eos_ids, pad_id=sp.pad,
              rng=jax.random.key(0))
    ar = np.asarray(generate(model, p, v, **kw).tokens)
    rows = []
    for k, alpha, g in settings:
        out = np.asarray(lud_generate(model, p, v, args=LUDArgs(k=k, threshold=alpha, repeat_ngram=g,
                                                                 placeholder_id=sp.mask), **kw).tokens)
        regions = {"echo": 0, "answer": 0, "copy": 0}
        wrong = differ = 0
        for r in range(len(p)):
            ex = task.example("eval", int(index[r]))
            wrong += task.reward(decode(tok, out[r]), ex) < 1.0
            d = np.nonzero(out[r] != ar[r])[0]
            if len(d):
                differ += 1
                before = decode(tok, ar[r][:d[0]])
                regions["echo" if "=" not in before else "answer" if ">" not in before else "copy"] += 1
        rows.append({"k": k, "threshold": alpha, "repeat_ngram": g, "rows": len(p), "wrong": int(wrong),
                     "differ_from_ar": differ, "first_difference_region": regions})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/testbed/base.yaml")
    ap.add_argument("--base", default="runs/testbed/teacher")
    ap.add_argument("--lud", default="runs/testbed/lud")
    ap.add_argument("--student", default="runs/testbed/student")
    ap.add_argument("--grid", default="2:0.9,4:0.5,4:0.9,4:0.99,8:0.9,8:0.99,4:0,8:0,8:0.9:1",
                    help="k:alpha[:repeat_ngram] LUD settings")
    ap.add_argument("--batch-size", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds (0: no timing)")
    ap.add_argument("--latency-prompts", type=int, default=64, help="prompts of the batch-1 timing regime")
    ap.add_argument("--timed", default="lud k=4 α=0.9,lud k=4 α=0.99,lud k=8 α=0.99,spec student γ=4,"
                                       "spec ngram γ=4,base AR",
                    help="methods timed beside 'lud AR' (comma-separated names)")
    ap.add_argument("--divergence", action="store_true",
                    help="only the first-difference analysis of LUD vs AR (--grid settings) -> <out>.json")
    ap.add_argument("--out", default="docs/results/lud")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    grid = [tuple(float(x) if i == 1 else int(x) for i, x in enumerate(s.split(":"))) for s in a.grid.split(",")]
    grid = [(g[0], g[1], g[2] if len(g) > 2 else 0) for g in grid]

    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config
    from jaxtok.decode.evaluate import evaluate
    from jaxtok.tasks import load_tokenizer

    cfg = load_config(a.config, a.overrides)
    task = make_task_from_config(cfg.data)
    tok = load_tokenizer(Path(a.lud) / "tokenizer.json")
    models = {"base": _load(a.base), "lud": _load(a.lud)}
    if a.student:
        models["student"] = _load(a.student)
    if a.divergence:
        rows = divergence(models["lud"], task, tok, cfg, grid, cfg.decode.max_new_tokens)
        cmd = "python " + " ".join(["scripts/lud.py"] + (argv if argv is not None else sys.argv[1:]))
        Path(a.out + ".json").write_text(json.dumps({"command": cmd, "model": a.lud, "rows": rows}, indent=1))
        return
    methods = build_methods(models, tok, cfg.decode.max_new_tokens, grid)
    timed = ["lud AR"] + [m for m in a.timed.split(",") if m and m != "lud AR"]
    unknown = sorted(set(timed) - set(methods))
    if unknown:
        ap.error(f"--timed: unknown {unknown}; known: {list(methods)}")
    t_start = time.time()
    loads = [os.getloadavg()]
    results = {}
    for name, (step, kind) in methods.items():  # accuracy and forwards on the whole held-out set
        m, samples = evaluate(step, task, tok, prompt_len=cfg.data.prompt_len, batch_size=a.batch_size,
                              num_examples=cfg.data.num_eval, overlong=cfg.data.overlong,
                              key=jax.random.key(cfg.train.seed), num_samples=4)
        r = {"kind": kind, **{k: m[k] for k in ("exact_match", "format_ok", "generated_tokens", "num_examples")}}
        r["tokens_per_forward"] = per_forward(m)
        r.update({k: m[k] for k in ("mean_accepted_span", "accepted_span_hist", "mean_accepted_length",
                                    "acceptance_rate") if k in m})
        r["samples"] = samples
        results[name] = r
        print(f"{name}: em={r['exact_match']:.4f} tpf={r['tokens_per_forward']:.3f}", flush=True)
    loads.append(os.getloadavg())
    timing = {}
    if a.repeats:
        regimes = {f"batch {a.batch_size}": batches(task, tok, cfg, a.batch_size, cfg.data.num_eval)}
        if a.latency_prompts:
            regimes["batch 1"] = batches(task, tok, cfg, 1, a.latency_prompts)
        timing = time_methods({k: methods[k] for k in timed}, regimes, a.repeats)
        loads.append(os.getloadavg())
        for regime, per in timing.items():
            ref = per["lud AR"]
            for name, t in per.items():
                for what in ("wall", "cpu"):
                    t[f"{what}_ratio_median"] = statistics.median(x / y for x, y in zip(t[what], ref[what]))
                    t[f"{what}_ratio_of_min"] = min(t[what]) / min(ref[what])
                results[name].setdefault("timing", {})[regime] = t
    cmd = "python " + " ".join(["scripts/lud.py"] + (argv if argv is not None else sys.argv[1:]))
    out = {"command": cmd, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
           "config": a.config, "models": {"base": a.base, "lud": a.lud, "student": a.student},
           "num_eval": cfg.data.num_eval, "batch_size": a.batch_size, "latency_prompts": a.latency_prompts,
           "repeats": a.repeats, "loadavg": loads, "seconds": time.time() - t_start, "regimes": list(timing),
           "lud_train_config": "configs/testbed/lud.yaml", "methods": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(out, indent=1, default=str))
    Path(a.out + ".table.md").write_text(table(out))
    plot(out, a.out + ".png")
    print(table(out))


def table(out: dict) -> str:
    """Markdown: accuracy and tokens per forward of every method; the timed ones also their wall / CPU-time ratios
    to ``lud AR`` per regime (median over rounds of the per-round ratio, CPU = process time of all threads)."""
    regimes = out.get("regimes", [])
    head = "| method | exact match | tokens / forward | mean accepted span |" + "".join(
        f" wall ratio ({r}) | CPU ratio ({r}) |" for r in regimes)
    rows = [head, "|" + "---|" * (4 + 2 * len(regimes))]
    for name, r in out["methods"].items():
        span = r.get("mean_accepted_span", r.get("mean_accepted_length"))
        cells = [name, f"{r['exact_match']:.4f}", f"{r['tokens_per_forward']:.3f}",
                 "" if span is None else f"{span:.2f}"]
        for reg in regimes:
            t = r.get("timing", {}).get(reg)
            cells += ["", ""] if t is None else [f"{t['wall_ratio_median']:.2f}", f"{t['cpu_ratio_median']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=110)
    colors = {"ar": "black", "lud": "tab:blue", "spec": "tab:orange"}
    for name, r in out["methods"].items():
        c = "tab:red" if name.startswith("base lud") else colors[r["kind"]]
        ax.scatter(r["tokens_per_forward"], r["exact_match"], color=c, s=50)
        ax.annotate(name, (r["tokens_per_forward"], r["exact_match"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    for kind, c in [("AR", "black"), ("LUD (fine-tuned)", "tab:blue"), ("LUD on the untuned base", "tab:red"),
                    ("speculative (lossless, greedy)", "tab:orange")]:
        ax.scatter([], [], color=c, label=kind)
    ax.set_xlabel("generated tokens per (target) forward, per row")
    ax.set_ylabel(f"held-out exact match ({out['num_eval']} prompts)")
    ax.set_title("LUD vs AR vs speculative decoding, testbed arithmetic (tiny_teacher, greedy)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
