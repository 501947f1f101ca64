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
  Both arms are scored the same way, :func:`finished_only`: a row counts as right only if it is right AND its EOS
  came within the B tokens (the guide aims at exactly that). Before, truncation also scored rows cut just before
  their EOS (full answer text, no EOS), crediting it answers of B + 1 tokens the guide was steered away from.

Writes results.json, results.md (one row per arm) and plots (length error per target, length/accuracy vs tilt).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtok.data import make_task_from_config, pad_prompt_batch, prompt_dataset
from jaxtok.metrics import write_results
from jaxtok.models.hf import load_any
from jaxtok.models.value import LengthValueModel
from jaxtok.registry import BENCHES, ConfigError
from jaxtok.tasks.tokenizer import load_tokenizer_for
from jaxtok.tasks.tokenizer import SpecialTokens

from jaxtok.decode.evaluate import evaluate
from jaxtok.decode.generate import generate
from jaxtok.sampling import SamplingParams
from jaxtok.decode.length_control import LengthGuide, length_error_sums, predict_length

from .plots import length_plots, save_plots


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


def finished_only(tokens, done, pad_id: int):
    """``[B, T]`` completion tokens with every row that did not finish (``done [B]`` False: no EOS within the
    budget) blanked to ``pad_id``, so it decodes to "" and scores 0: the budget arms' accounting (module
    docstring), the same for truncation and guidance."""
    return jnp.where(jnp.asarray(done, bool)[:, None], tokens, pad_id)


def _arm(policy, task, tok, cfg, args, *, max_new, top_k=0, guide=None, target=None, budget=False) -> dict:
    """Decode every prompt (:func:`jaxtok.decode.evaluate.evaluate` of an AR step); per-row lengths and finished
    flags plus summary metrics. With ``budget`` only rows that finished within ``max_new`` tokens can score
    (:func:`finished_only`); lengths and shares still count every generated token."""
    sp = SpecialTokens.of(tok)

    def step(prompt, valid, key):  # stats: the rows' lengths and finished flags (readout, shares)
        out = generate(policy, prompt, valid, max_new_tokens=max_new,
                       sampling=SamplingParams(temperature=args.temperature, top_k=top_k), rng=key,
                       stop_tokens=sp.eos_ids, pad_id=sp.pad, guide=guide)
        tokens = finished_only(out.tokens, out.done, sp.pad) if budget else out.tokens
        return tokens, out.valid, {"length": out.lengths, "done": out.done}

    m, _ = evaluate(step, task, tok, prompt_len=cfg.data.prompt_len, batch_size=args.batch_size,
                    num_examples=args.num_prompts, overlong=cfg.data.overlong, key=jax.random.key(args.seed),
                    num_samples=0, keep_rows=("length", "done"))
    lengths, done = m["per_row"]["length"], m["per_row"]["done"]
    row = {"exact_match": m["exact_match"] * m["num_examples"] / max(m["decoded"], 1),
           "mean_length": float(lengths.mean()), "finished_share": float(done.mean()),
           "tokens_per_s": float(lengths.sum() / max(m["wall_s"], 1e-9))}
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
    task, batches = _batches(cfg, tok, args)
    K, N = args.candidates, args.max_new_tokens

    def guide(mode, scale, target=0):
        return LengthGuide.of(vm, mode=mode, scale=scale, target=target, candidates=K)

    rows, arms = [], {}

    def add(name, mode, scale, res, **extra):
        arms[name] = res
        rows.append({"arm": name, "mode": mode, "scale": scale, **extra, **res["row"]})

    add("policy", "-", None, _arm(policy, task, tok, cfg, args, max_new=N), max_new_tokens=N)
    add("top-K", "-", None, _arm(policy, task, tok, cfg, args, max_new=N, top_k=K), max_new_tokens=N)

    # prompt-boundary readout against the plain policy's finished completions
    pred = np.concatenate([np.asarray(predict_length(vm, p, v))[:b] for p, v, b, _ in batches])
    actual, fin = arms["policy"]["lengths"], arms["policy"]["done"]
    prediction = {"rows": int(fin.sum()), "mae": float(np.mean(np.abs(pred[fin] - actual[fin]))),
                  "mae_of_mean": float(np.mean(np.abs(actual[fin].mean() - actual[fin]))),
                  "corr": float(np.corrcoef(pred[fin], actual[fin])[0, 1]) if fin.sum() > 2 else None,
                  "mean_predicted": float(pred[fin].mean()), "mean_actual": float(actual[fin].mean())}

    for L in args.targets:
        base = _arm(policy, task, tok, cfg, args, max_new=N, top_k=K, target=L)
        add(f"top-K @ {L}", "-", None, base, target=L, max_new_tokens=N)
        for s in args.target_scales:
            add(f"target {L} s={s:g}", "target", s,
                _arm(policy, task, tok, cfg, args, max_new=N, guide=guide("target", s, L), target=L),
                target=L, max_new_tokens=N)
    for s in args.tilt_scales:
        add(f"tilt {s:g}", "tilt", s, _arm(policy, task, tok, cfg, args, max_new=N, guide=guide("tilt", s)),
            max_new_tokens=N)
    for B in args.budgets:
        add(f"truncate @ {B}", "-", None,
            _arm(policy, task, tok, cfg, args, max_new=B, top_k=K, target=B, budget=True),
            target=B, max_new_tokens=B, scored="right and finished within B")
        for s in args.budget_scales:
            add(f"budget {B} s={s:g}", "budget", s,
                _arm(policy, task, tok, cfg, args, max_new=B, guide=guide("budget", s, B), target=B, budget=True),
                target=B, max_new_tokens=B, scored="right and finished within B")

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


def replot_length_control(results_json: str | Path, prefix: str | Path, command: str) -> list:
    """Redraw :func:`jaxtok.bench.plots.length_plots` from a written results JSON into ``<prefix>_<plot>.png``,
    captioned with ``command`` (the command that made the results); no decoding. File names as published in
    docs/results: ``<prefix>_error.png``, ``<prefix>_tilt.png``."""
    import json

    res = json.loads(Path(results_json).read_text())
    plots = length_plots(res["rows"], res["args"]["target_scales"])
    return save_plots({name.removeprefix("length_"): draw for name, draw in plots.items()}, prefix, command)
