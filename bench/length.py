"""``length_control`` benchmark: what a trained LenVM does for the decoder it was trained on (LenVM abstract:
length prediction from the prompt boundary, exact length matching, the performance/efficiency trade-off, accuracy
under a token budget).

The policy is ``model.init_from`` (the model whose sampled completions the LenVM was trained on), the value model
``args.value_init_from``; every arm decodes the same held-out prompts of ``cfg.data`` with the same keys:

- ``policy``: plain sampling; the prompt-boundary readout (:func:`jaxtok.decode.length_control.predict_length`)
  is scored against these lengths (MAE and correlation, beside the MAE of always predicting the mean length);
- ``top-K``: sampling restricted to the K candidates, the guide's ``s = 0`` reference;
- ``target L``: guided to length L (``mode=target``), against ``top-K`` at the same L;
- ``tilt s``: ``p'(c) ∝ p(c)·exp(−s·n_c)``, mean length and accuracy as s moves;
- ``budget B``: ``max_new_tokens = B`` truncation (the token-budget baseline) against guided ``mode=budget``.

Writes results.json, results.md (one row per arm) and plots (length error per target, length/accuracy vs tilt).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from jaxtok.data import make_task_from_config, pad_prompt_batch, prompt_dataset
from jaxtok.metrics import write_results
from jaxtok.models.hf import load_any
from jaxtok.models.value import LengthValueModel
from jaxtok.registry import BENCHES, ConfigError
from jaxtok.tasks.tokenizer import load_tokenizer_for
from jaxtok.tasks.tokenizer import SpecialTokens, decode

from jaxtok.decode.generate import generate
from jaxtok.decode.length_control import LengthGuide, length_error_sums, predict_length


@dataclasses.dataclass(frozen=True)
class LengthBenchArgs:
    value_init_from: str = "runs/rl_lenvm"
    num_prompts: int = 256
    batch_size: int = 128
    max_new_tokens: int = 20
    temperature: float = 1.0
    candidates: int = 16
    targets: tuple[int, ...] = (8, 12, 16)
    target_scales: tuple[float, ...] = (2.0, 8.0)
    tilt_scales: tuple[float, ...] = (-1.0, 0.0, 0.3, 1.0, 3.0)
    budgets: tuple[int, ...] = (10,)
    budget_scales: tuple[float, ...] = (2.0, 8.0)
    seed: int = 0

    def __post_init__(self):
        if self.num_prompts < 1 or self.batch_size < 1 or self.max_new_tokens < 1 or self.candidates < 1:
            raise ValueError("num_prompts, batch_size, max_new_tokens and candidates must be >= 1")
        if any(t < 1 for t in self.targets + self.budgets):
            raise ValueError(f"targets={self.targets}, budgets={self.budgets}: lengths >= 1")


def _batches(cfg, tok, args):
    """Fixed-shape prompt batches (the last padded with copies of its first row) and their examples."""
    task = make_task_from_config(cfg.data)
    ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=args.batch_size,
                           num_examples=args.num_prompts, overlong=cfg.data.overlong)
    out = []
    for batch in ds:
        b = batch["prompt"].shape[0]
        out.append((*pad_prompt_batch(batch, args.batch_size), b,
                    [task.example("eval", int(i)) for i in batch["index"][:b]]))
    return task, out


def _arm(policy, batches, task, tok, sp, args, *, max_new, top_k=0, guide=None, target=None) -> dict:
    """Decode every batch; per-row lengths, finished flags and rewards plus summary metrics."""
    lengths, done, correct, wall, compiled = [], [], [], 0.0, False
    key = jax.random.key(args.seed)
    for i, (prompt, valid, b, examples) in enumerate(batches):

        def call():
            return generate(policy, prompt, valid, max_new_tokens=max_new, temperature=args.temperature, top_k=top_k,
                            rng=jax.random.fold_in(key, i), stop_tokens=sp.eos_ids, pad_id=sp.pad, guide=guide)

        if not compiled:  # compile outside the timed region
            jax.block_until_ready(call().tokens)
            compiled = True
        t0 = time.perf_counter()
        out = call()
        tokens = np.asarray(jax.device_get(out.tokens))
        wall += time.perf_counter() - t0
        lengths.append(np.asarray(out.lengths)[:b])
        done.append(np.asarray(out.done)[:b])
        correct += [task.reward(decode(tok, tokens[r]), ex) >= 1.0 for r, ex in enumerate(examples)]
    lengths, done = np.concatenate(lengths), np.concatenate(done)
    row = {"exact_match": float(np.mean(correct)), "mean_length": float(lengths.mean()),
           "finished_share": float(done.mean()), "tokens_per_s": float(lengths.sum() / max(wall, 1e-9))}
    if target is not None:
        sums = length_error_sums(lengths, target)
        n = len(lengths)
        row.update(length_abs_err=sums["length_abs_err"] / n, exact_length_share=sums["exact_length"] / n,
                   over_share=sums["over_target"] / n)
    return {"row": row, "lengths": lengths, "done": done}


@BENCHES.register("length_control", LengthBenchArgs)
def length_bench(cfg, run_dir: str | Path, args: LengthBenchArgs) -> dict:
    """LenVM length prediction and control arms (module docstring) for ``cfg.model.init_from``."""
    if not cfg.model.init_from:
        raise ConfigError("bench length_control needs model.init_from=<run dir of the policy the LenVM models>")
    if not Path(args.value_init_from).exists():
        raise ConfigError(f"bench.args.value_init_from={args.value_init_from!r}: no such run directory (train one: "
                          f"jaxtok train configs/rl/lenvm.yaml)")
    policy, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype)
    vm, _ = load_any(args.value_init_from, key="bench.args.value_init_from")
    if not isinstance(vm, LengthValueModel):
        raise ConfigError(f"bench.args.value_init_from={args.value_init_from!r} is not a LenVM run")
    tok = load_tokenizer_for(cfg)
    sp = SpecialTokens.of(tok)
    task, batches = _batches(cfg, tok, args)
    K, N = args.candidates, args.max_new_tokens

    def guide(mode, scale, target=0):
        return LengthGuide.of(vm, mode=mode, scale=scale, target=target, candidates=K)

    rows, arms = [], {}

    def add(name, mode, scale, res, **extra):
        arms[name] = res
        rows.append({"arm": name, "mode": mode, "scale": scale, **extra, **res["row"]})

    add("policy", "-", None, _arm(policy, batches, task, tok, sp, args, max_new=N), max_new_tokens=N)
    add("top-K", "-", None, _arm(policy, batches, task, tok, sp, args, max_new=N, top_k=K), max_new_tokens=N)

    # prompt-boundary readout against the plain policy's finished completions
    pred = np.concatenate([np.asarray(predict_length(vm, p, v))[:b] for p, v, b, _ in batches])
    actual, fin = arms["policy"]["lengths"], arms["policy"]["done"]
    prediction = {"rows": int(fin.sum()), "mae": float(np.mean(np.abs(pred[fin] - actual[fin]))),
                  "mae_of_mean": float(np.mean(np.abs(actual[fin].mean() - actual[fin]))),
                  "corr": float(np.corrcoef(pred[fin], actual[fin])[0, 1]) if fin.sum() > 2 else None,
                  "mean_predicted": float(pred[fin].mean()), "mean_actual": float(actual[fin].mean())}

    for L in args.targets:
        base = _arm(policy, batches, task, tok, sp, args, max_new=N, top_k=K, target=L)
        add(f"top-K @ {L}", "-", None, base, target=L, max_new_tokens=N)
        for s in args.target_scales:
            add(f"target {L} s={s:g}", "target", s,
                _arm(policy, batches, task, tok, sp, args, max_new=N, guide=guide("target", s, L), target=L),
                target=L, max_new_tokens=N)
    for s in args.tilt_scales:
        add(f"tilt {s:g}", "tilt", s, _arm(policy, batches, task, tok, sp, args, max_new=N, guide=guide("tilt", s)),
            max_new_tokens=N)
    for B in args.budgets:
        add(f"truncate @ {B}", "-", None, _arm(policy, batches, task, tok, sp, args, max_new=B, top_k=K, target=B),
            target=B, max_new_tokens=B)
        for s in args.budget_scales:
            add(f"budget {B} s={s:g}", "budget", s,
                _arm(policy, batches, task, tok, sp, args, max_new=B, guide=guide("budget", s, B), target=B),
                target=B, max_new_tokens=B)

    overhead = arms["top-K"]["row"]["tokens_per_s"] / max(arms["tilt 0"]["row"]["tokens_per_s"], 1e-9) \
        if "tilt 0" in arms else None
    results = {"bench": "length_control", "policy": cfg.model.init_from, "value_model": args.value_init_from,
               "gamma": vm.gamma, "args": dataclasses.asdict(args), "prediction": prediction,
               "guided_slowdown": overhead, "device": jax.devices()[0].device_kind, "rows": rows}
    plots = length_plots(rows, args.target_scales)
    write_results(run_dir, results, rows, plots=plots,
                  title=f"LenVM length control ({cfg.model.init_from}, value model {args.value_init_from}); "
                        f"prompt-boundary length MAE {prediction['mae']:.2f} tokens (mean predictor "
                        f"{prediction['mae_of_mean']:.2f}), corr {prediction['corr']}")
    return {"prediction_mae": prediction["mae"], "guided_slowdown": overhead}


def length_plots(rows: list, target_scales) -> dict:
    """The bench's plots from its result ``rows``: ``length_error`` (mean |length − target| per target, top-K sampling
    against each guided scale, values on the bars) and ``tilt`` (mean length and exact match against the tilt s)."""
    base = [r for r in rows if r["arm"].startswith("top-K @ ")]
    tilt = [r for r in rows if r["mode"] == "tilt"]
    policy = next((r for r in rows if r["arm"] == "policy"), None)
    errors = {"top-K sampling (no guide)": [r["length_abs_err"] for r in base]}
    for s in target_scales:
        errors[f"LenVM target guide, s={s:g}"] = [r["length_abs_err"] for r in rows
                                                 if r["mode"] == "target" and r["scale"] == s]
    targets = [r["target"] for r in base]

    def length_error(ax):
        n, width = len(errors), 0.8 / len(errors)
        for i, (label, ys) in enumerate(errors.items()):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(ys))]
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
        ax.set_xticks(range(len(targets)), [f"{t}" for t in targets])
        ax.set_xlabel("target length L (tokens)")
        ax.set_ylabel("mean |length − L| (tokens)")
        ax.set_title("LenVM length control: distance from the target length L")
        ax.margins(y=0.12)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    def tilt_plot(ax):
        fig, spec = ax.figure, ax.get_subplotspec()
        ax.remove()
        left, right = (fig.add_subplot(g) for g in spec.subgridspec(1, 2, wspace=0.08))
        xs = [r["scale"] for r in tilt]
        for a, key, ylabel in ((left, "mean_length", "mean completion length (tokens)"),
                               (right, "exact_match", "held-out exact match (fraction of prompts)")):
            a.plot(xs, [r[key] for r in tilt], "o-", label="LenVM tilt guide")
            if policy is not None:
                a.axhline(policy[key], color="0.5", ls="--", lw=0.8, label="plain sampling (no guide)")
            a.set_xlabel("tilt s (log-odds per token; s > 0 favours short)")
            a.set_ylabel(ylabel)
            a.grid(alpha=0.3)
            a.legend(loc="lower left", frameon=False)
        left.set_title("length against tilt")
        right.set_title("accuracy against tilt")

    return {"length_error": length_error, "tilt": tilt_plot}


def replot_length_control(results_json: str | Path, prefix: str | Path, command: str) -> list:
    """Redraw :func:`length_plots` from a written results JSON into ``<prefix>_<plot>.png``, captioned with
    ``command`` (the command that made the results); no decoding. File names as published in docs/results:
    ``<prefix>_error.png``, ``<prefix>_tilt.png``."""
    import json

    from jaxtok.metrics import save_plot

    res = json.loads(Path(results_json).read_text())
    prefix = Path(prefix)
    return [save_plot(prefix.parent / f"{prefix.name}_{name.removeprefix('length_')}.png", draw, command=command)
            for name, draw in length_plots(res["rows"], res["args"]["target_scales"]).items()]
