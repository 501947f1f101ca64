"""Dystruct against fixed generation lengths and a length readout (issue 18 item 4; decode/commit_policies.py).

    python scripts/dystruct.py configs/diffusion/dystruct.yaml model.init_from=<run dir> [key=value ...]

Held-out prompts of the config's task (``data.num_eval``), greedy, one diffusion loop for every arm:

- ``fixed N``: the Fast-dLLM threshold policy (``threshold``, block ``block_len``) at ``gen_len = N`` for every N of
  ``--fixed`` (default 8 12 16 24 32): the fixed-length decoder, too short or too long;
- ``readout``: ``dystruct`` with ``readout: true`` at the largest N: the first forward sees all N positions, the
  window is fixed at the end posterior's MAP + 1 + margin (the model's own length readout from the prompt; the
  repo's LenVM readout needs an AR value model of this policy, which does not exist for the diffusion LM);
- ``dystruct W/E``: the windowed policy at the largest N from ``init_window`` W, widening by at most E
  (``--windows`` W:E pairs); ``--compare-defer`` adds each with ``defer: false`` (commits in widening steps).

Columns: exact match, mean NFE, mean response length (through the terminator), ``seen_per_forward`` (generated
positions the model attended to per forward, mean over forwards), ``seen_total`` (Σ over a row's forwards),
``wasted`` (Σ_t max(0, W_t − L): positions beyond the response the model read), ``wall_s``. Caveat written into
the table: the jitted loop has static shapes, so hidden positions are still computed (as padding); ``seen``/
``wasted`` count what the model conditions on, and what a dynamic-shape implementation would not compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of model.init_from (default: last)")
    ap.add_argument("--fixed", type=int, nargs="+", default=[8, 12, 16, 24, 32])
    ap.add_argument("--windows", nargs="+", default=["8:8", "4:4", "12:8"], help="init_window:expand pairs")
    ap.add_argument("--compare-defer", action="store_true", help="also run every window with defer: false")
    ap.add_argument("--json", default="docs/results/dystruct.json")
    ap.add_argument("--md", default="docs/results/dystruct.table.md")
    ap.add_argument("--png", default="docs/results/dystruct.png")
    a = ap.parse_args(argv)

    from jaxtok.config import load_config
    from jaxtok.registry import ConfigError

    try:
        cfg = load_config(a.config, a.overrides)
        if not cfg.model.init_from:
            raise ConfigError("model.init_from: needs the run directory of a trained diffusion LM "
                              "(jaxtok train configs/zoo/diffusion.yaml)")
        windows = []
        for w in a.windows:
            try:
                iw, ex = (int(x) for x in w.split(":"))
            except ValueError:
                raise ConfigError(f"--windows {w!r}: expected init_window:expand, e.g. 8:8") from None
            windows.append((iw, ex))
        if any(n < 1 for n in a.fixed):
            raise ConfigError(f"--fixed {a.fixed}: generation lengths must be >= 1")
    except ConfigError as e:
        print(f"dystruct: config error: {e}", file=sys.stderr)
        return 2

    import jax

    from jaxtok.data import make_task_from_config, pad_prompt_batch, prompt_dataset
    from jaxtok.decode import commit_policies as cp
    from jaxtok.decode.diffusion import diffusion_generate, stop_ids_of
    from jaxtok.metrics import markdown_table, save_plot
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import SpecialTokens, decode, load_tokenizer_for

    t_start = time.perf_counter()
    model, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype, diffusion=True,
                        step=a.step)
    tok = load_tokenizer_for(cfg)
    task = make_task_from_config(cfg.data)
    sp = SpecialTokens.of(tok)
    bsz = cfg.decode.batch_size
    ds, dropped = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=bsz,
                                 num_examples=cfg.data.num_eval)
    batches = list(ds)
    base_args = dict(cfg.decode.policy_args)
    block_len = int(base_args.get("block_len", 8))
    threshold = float(base_args.get("threshold", 0.9))
    nmax = max(a.fixed)
    arms = [(f"fixed {n}", "threshold", n, {"block_len": block_len, "threshold": threshold}) for n in a.fixed]
    arms.append(("readout", "dystruct", nmax, dict(base_args, readout=True)))
    for iw, ex in windows:
        arms.append((f"dystruct {iw}/{ex}", "dystruct", nmax, dict(base_args, init_window=iw, expand=ex)))
    if a.compare_defer:  # the same windows committing from the narrow view in widening steps
        for iw, ex in windows:
            arms.append((f"dystruct {iw}/{ex} no defer", "dystruct", nmax,
                         dict(base_args, init_window=iw, expand=ex, defer=False)))

    rows, samples = [], {}
    for label, policy, n, pa in arms:
        kw = dict(gen_len=n, policy=policy, policy_args=pa, stop_tokens=stop_ids_of(tok), pad_id=sp.pad)
        jax.block_until_ready(diffusion_generate(model, *pad_prompt_batch(batches[0], bsz), **kw).tokens)  # compile
        hits = total = 0
        nfe, length, seen, wasted, wall = [], [], [], [], 0.0
        for batch in batches:
            prompt, valid = pad_prompt_batch(batch, bsz)
            t0 = time.perf_counter()
            out = jax.device_get(diffusion_generate(model, prompt, valid, **kw))
            wall += time.perf_counter() - t0
            r = batch["prompt"].shape[0]
            lengths = np.asarray(out.lengths)[:r]
            f = np.asarray(out.nfe)[:r]
            if policy == "dystruct":
                s_tot = np.asarray(out.policy_state["visible_sum"])[:r]
                w = np.asarray(cp.window_waste(out.policy_state["steps_at"], out.lengths))[:r]
            else:
                s_tot, w = f * n, f * (n - lengths)
            nfe += f.tolist()
            length += lengths.tolist()
            seen += s_tot.tolist()
            wasted += w.tolist()
            toks = np.asarray(out.tokens)
            for i in range(r):
                ex = task.example("eval", int(batch["index"][i]))
                text = decode(tok, toks[i])
                hits += task.reward(text, ex) >= 1.0
                total += 1
                if len(samples.setdefault(label, [])) < 4:
                    samples[label].append({"prompt": ex.prompt, "completion": text, "answer": ex.answer})
        total_all = total + dropped.count
        rows.append({"arm": label, "policy": policy, "gen_len": n, "exact_match": hits / max(total_all, 1),
                     "mean_nfe": float(np.mean(nfe)), "mean_length": float(np.mean(length)),
                     "seen_per_forward": float(np.sum(seen) / max(np.sum(nfe), 1)),
                     "seen_total": float(np.mean(seen)), "wasted": float(np.mean(wasted)), "wall_s": wall,
                     "num_examples": total_all})
        print(json.dumps(rows[-1]), flush=True)

    command = "python scripts/dystruct.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"init_from": cfg.model.init_from, "step": a.step, "task": cfg.data.task, "policy_args": base_args, "rows": rows,
           "samples": samples, "device": jax.devices()[0].device_kind, "wall_s": time.perf_counter() - t_start,
           "command": command}
    Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    cols = ["arm", "gen_len", "exact_match", "mean_nfe", "mean_length", "seen_per_forward", "seen_total", "wasted",
            "wall_s"]
    Path(a.md).write_text(f"<!-- written by: {command} -->\n\n" + markdown_table(rows, cols))

    def draw(ax):
        for r in rows:
            m = "o" if r["policy"] == "threshold" else ("s" if r["arm"] == "readout" else "D")
            ax.scatter(r["wasted"], r["exact_match"], marker=m, s=60, label=f"{r['arm']} ({r['mean_nfe']:.1f} NFE)")
        ax.set_xlabel("positions seen beyond the response per row (Σ over forwards)")
        ax.set_ylabel("held-out exact match")
        ax.set_title("fixed gen_len vs length readout vs Dystruct window")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    save_plot(a.png, draw, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
