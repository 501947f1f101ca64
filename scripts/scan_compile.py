"""Compile time and compiled memory of a train step and a forward, unrolled vs ``scan_layers``, remat none vs full.

Compile only: the model and train state are abstract (``nnx.eval_shape`` / :func:`jaxtok.train.step.abstract_state`,
nothing allocated) and each program is ``jit(...).lower(abstract args).compile()``, never run. Per variant:
``lower_s`` (trace + StableHLO), ``compile_s`` (XLA, wall), ``compile_cpu_s`` (the process's CPU time while
compiling: less sensitive to other load on a shared machine), and the compiled program's ``memory_analysis()``:
``temp``
(XLA scratch: activations kept for the backward pass, gradients in flight), ``args``, ``out``, ``alias`` (donated
state reused for the output) and ``peak = args + out + temp - alias``. The train step is
:func:`jaxtok.train.step.make_train_step` with SFT loss and AdamW (the state donated, as in training); the forward is
the same SFT loss without gradient. Variants are compiled ``--repeats`` times, interleaved (the machine is shared
and noisy); the table shows the median and the ratio to the unrolled, no-remat variant.

    python scripts/scan_compile.py --preset qwen3-0.6b --batch 1 --seq 2048 --repeats 2 \\
        --out docs/results/scan_compile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtok.metrics import default_command, markdown_table
from jaxtok.models import Decoder, presets
from jaxtok.train.objectives.sft import sft_loss
from jaxtok.train.step import abstract_state, make_train_step

VARIANTS = [  # (program, scan_layers, remat)
    ("train", False, "none"), ("train", True, "none"), ("train", False, "full"), ("train", True, "full"),
    ("forward", False, "none"), ("forward", True, "none"),
]


def _abstract_batch(batch: int, seq: int) -> dict:
    s = jax.ShapeDtypeStruct
    return {"tokens": s((batch, seq), jnp.int32), "positions": s((batch, seq), jnp.int32),
            "valid": s((batch, seq), jnp.bool_), "loss_mask": s((batch, seq), jnp.bool_)}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = 2.0**30
    out = {"temp_gib": m.temp_size_in_bytes / gib, "args_gib": m.argument_size_in_bytes / gib,
           "out_gib": m.output_size_in_bytes / gib, "alias_gib": m.alias_size_in_bytes / gib}
    out["peak_gib"] = out["args_gib"] + out["out_gib"] + out["temp_gib"] - out["alias_gib"]
    return out


def compile_once(cfg, program: str, batch: int, seq: int) -> dict:
    """Lower and compile one program of ``cfg`` on abstract inputs; times and memory analysis."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    batch_abs = _abstract_batch(batch, seq)
    t0 = time.perf_counter()
    if program == "train":
        opt = optax.adamw(1e-4)
        step = make_train_step(model, opt, sft_loss)
        lowered = step.lower(abstract_state(model, opt), batch_abs)
    else:
        graphdef, params = nnx.split(model, nnx.Param)

        def forward(p, b):
            s, c, _ = sft_loss(nnx.merge(graphdef, p), b, None)
            return s / c

        lowered = jax.jit(forward).lower(params, batch_abs)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    dots = len(re.findall(r" dot\(", compiled.as_text()))  # matmuls in the optimised HLO (recomputation shows)
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "compile_cpu_s": c2 - c1, "dots": dots, **_memory(compiled)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers")
    ap.add_argument("--hidden", type=int, default=None, help="override hidden_size (intermediate = 3x, heads kept)")
    ap.add_argument("--vocab", type=int, default=None, help="override vocab_size")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated program names to run (train,forward)")
    ap.add_argument("--out", default="docs/results/scan_compile", help="writes OUT.json and OUT.md")
    a = ap.parse_args()

    over = {}
    if a.layers:
        over["num_layers"] = a.layers
    if a.vocab:
        over["vocab_size"] = a.vocab
    if a.hidden:
        over.update(hidden_size=a.hidden, intermediate_size=3 * a.hidden)
    base = presets.get(a.preset, **over)
    variants = [v for v in VARIANTS if a.only is None or v[0] in a.only.split(",")]
    runs: dict = {v: [] for v in variants}
    t_start = time.perf_counter()
    for r in range(a.repeats):  # interleaved: every variant once per round
        for v in variants:
            program, scan, remat = v
            cfg = dataclasses.replace(base, scan_layers=scan, remat=remat)
            res = compile_once(cfg, program, a.batch, a.seq)
            runs[v].append(res)
            print(f"round {r} {program:7s} scan={scan!s:5s} remat={remat:4s} lower {res['lower_s']:.1f} s "
                  f"compile {res['compile_s']:.1f} s peak {res.get('peak_gib', float('nan')):.2f} GiB", flush=True)
    rows = []
    ref = {}
    for v in variants:
        program, scan, remat = v
        med = {k: statistics.median(x[k] for x in runs[v]) for k in runs[v][0]}
        if not scan and remat == "none":
            ref[program] = med
        r0 = ref.get(program, med)
        rows.append({"program": program, "scan_layers": scan, "remat": remat,
                     "lower_s": round(med["lower_s"], 2), "compile_s": round(med["compile_s"], 2),
                     "compile / unrolled": round(med["compile_s"] / r0["compile_s"], 3),
                     "compile_cpu_s": round(med["compile_cpu_s"], 2),
                     "cpu / unrolled": round(med["compile_cpu_s"] / r0["compile_cpu_s"], 3),
                     "dots": int(med["dots"]),
                     "temp_gib": round(med.get("temp_gib", float("nan")), 3),
                     "peak_gib": round(med.get("peak_gib", float("nan")), 3),
                     "peak / unrolled": round(med.get("peak_gib", float("nan")) / r0.get("peak_gib", float("nan")), 3),
                     "compile_s all": [round(x["compile_s"], 2) for x in runs[v]]})
    results = {"command": default_command(), "backend": jax.default_backend(), "devices": len(jax.devices()),
               "jax": jax.__version__, "preset": a.preset, "overrides": over,
               "model": {k: getattr(base, k) for k in ("num_layers", "hidden_size", "intermediate_size",
                                                        "num_heads", "num_kv_heads", "head_dim", "vocab_size")},
               "batch": a.batch, "seq": a.seq, "repeats": a.repeats, "wall_s": round(time.perf_counter() - t_start, 1),
               "rows": rows,
               "runs": [{"program": v[0], "scan_layers": v[1], "remat": v[2], "runs": runs[v]} for v in variants]}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["model"]
    md = (f"# scan_layers / remat: compile time and compiled memory\n\n"
          f"`{results['command']}`\n\n"
          f"{a.preset} shapes ({m['num_layers']} layers, hidden {m['hidden_size']}, mlp {m['intermediate_size']}, "
          f"{m['num_heads']}/{m['num_kv_heads']} heads x {m['head_dim']}, vocab {m['vocab_size']}), batch {a.batch} "
          f"x seq {a.seq}, float32, backend {results['backend']} (jax {results['jax']}), compile only "
          f"(abstract params, nothing run); median of {a.repeats} interleaved rounds, total {results['wall_s']} s.\n\n"
          + markdown_table(rows))
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
