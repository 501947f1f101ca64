"""``train`` and ``sweep`` benchmarks: measured training throughput against the device's limits, and training
variants side by side.

``sweep``: training variants of one config side by side (reproductions: TIP selections, RL loss modes).

``train``: the jitted train step of :mod:`jaxtok.train.step` (SFT loss) at several batch sizes. Reports step time,
tokens/s, model FLOPs per token (:func:`jaxtok.models.flops_per_token`, MaxText-style: 3x forward, causal
attention at half), achieved FLOP/s, MFU = achieved / peak, and the compiled step's memory (XLA memory analysis).
Peak FLOP/s comes from a table for TPUs and NVIDIA GPUs (dense bf16, per chip); on a CPU there is no honest table
value, so a float32 matmul calibration is measured in the same run and used as the peak.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.config import build_optimizer
from jaxtok.metrics import device_table_value, write_results
from jaxtok.models import Decoder, flops_per_token, num_params, presets
from jaxtok.registry import BENCHES

from .decode import execution_options
from .plots import draw_sweep_curves, draw_train_tokens_per_s

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
}


@dataclasses.dataclass(frozen=True)
class TrainBenchArgs:
    """``objectives``: ``[{name, args, label}]`` from OBJECTIVES (``label`` optional, names the table row), each timed
    at every batch size of every preset; rollout objectives get a synthetic rollout batch (prompt = first half of
    ``seq_len``, groups of ``group_size``) and random frozen models of the same preset (``teacher_preset`` for a
    teacher). ``presets``: the model presets to bench (empty = ``model.preset``); ``vocab_size``: 0 =
    ``model.vocab_size`` or 64 (the synthetic tokenizer); a realistic vocabulary makes the loss path visible."""

    batch_sizes: tuple[int, ...] = (8, 16, 32)
    seq_len: int = 64
    steps: int = 10  # timed steps per batch size
    warmup: int = 2  # untimed steps after compilation
    calibration_size: int = 1024  # CPU: square matmul size of the peak calibration
    objectives: tuple[dict, ...] = ({"name": "sft"},)
    group_size: int = 4
    teacher_preset: str = ""  # "" = the benchmarked preset
    presets: tuple[str, ...] = ()  # () = (model.preset,)
    vocab_size: int = 0  # 0 = model.vocab_size or 64

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes={self.batch_sizes}: positive integers")
        if self.seq_len < 2 or self.steps < 1 or self.warmup < 0:
            raise ValueError("seq_len >= 2, steps >= 1, warmup >= 0")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size={self.vocab_size}: 0 (the model's) or a positive size")
        for i, o in enumerate(self.objectives):
            if not isinstance(o, dict) or "name" not in o or set(o) - {"name", "args", "label"}:
                raise ValueError(f"objectives[{i}]={o!r}: expected {{name: ..., args: {{...}}, label: ...}}")


def peak_flops(calibration_size: int = 1024) -> tuple[float, str]:
    """``(peak FLOP/s of one device, source)``: the table for known accelerators, else a measured matmul rate."""
    value, kind = device_table_value(PEAK_FLOPS)
    if value is not None:
        return value, f"table ({kind}, dense bf16)"
    return matmul_rate(calibration_size), f"measured f32 {calibration_size}x{calibration_size} matmul on {kind}"


def matmul_rate(n: int, reps: int = 10) -> float:
    """FLOP/s of a jitted float32 ``[n, n] @ [n, n]`` on the default device (2·n³ FLOPs per product)."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = mm(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _batch(B: int, T: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, (B, T)).astype(np.int32)
    return {"tokens": tokens, "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "valid": np.ones((B, T), bool), "loss_mask": np.ones((B, T), bool)}


def _rollout_batch(B: int, T: int, vocab: int, seed: int, group_size: int) -> dict:
    """A synthetic rollout batch (train/rollout.py contract): the second half of every row is the completion."""
    rng = np.random.default_rng(seed)
    batch = _batch(B, T, vocab, seed)
    batch["loss_mask"][:, : T // 2] = False
    batch.update(old_logprobs=np.where(batch["loss_mask"], -rng.exponential(2.0, (B, T)), 0.0).astype(np.float32),
                 entropy=np.where(batch["loss_mask"], rng.uniform(0, 2, (B, T)), 0.0).astype(np.float32),
                 rewards=rng.integers(0, 2, B).astype(np.float32),
                 group_ids=(np.arange(B) // group_size).astype(np.int32),
                 temperature=np.ones(B, np.float32), on_policy=np.ones(B, bool))
    return batch


def _objective(spec: dict):
    """``(loss_fn, entry)`` of a bench objective spec ``{name, args}``."""
    import functools

    import jaxtok.train.objectives  # noqa: F401  (registration)
    from jaxtok.registry import OBJECTIVES

    entry = OBJECTIVES.entry(spec["name"], "bench.args.objectives.name")
    args = OBJECTIVES.parse_args(spec["name"], spec.get("args"), f"bench.args.objectives[{spec['name']}].args")
    return (functools.partial(entry.fn, args=args) if args is not None else entry.fn), entry


def _label(spec: dict) -> str:
    if spec.get("label"):
        return str(spec["label"])
    args = spec.get("args") or {}
    return spec["name"] + (" " + " ".join(f"{k}={v}" for k, v in sorted(args.items())) if args else "")


def compiled_memory_mb(compiled) -> dict:
    """XLA memory analysis of a compiled step in MiB: ``temp_mb`` (scratch: activations, float32 loss
    intermediates) and ``peak_mb`` = arguments + outputs + temp − aliased (donated state counted once)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {"temp_mb": None, "peak_mb": None}
    get = lambda name: getattr(mem, name, 0) or 0  # noqa: E731
    peak = (get("argument_size_in_bytes") + get("output_size_in_bytes") + get("temp_size_in_bytes")
            - get("alias_size_in_bytes"))
    return {"temp_mb": get("temp_size_in_bytes") / 2**20, "peak_mb": peak / 2**20}


@BENCHES.register("train", TrainBenchArgs)
def train_bench(cfg, run_dir: str | Path, args: TrainBenchArgs) -> dict:
    """Train-step throughput and MFU of every preset in ``args.presets`` (default ``cfg.model.preset``) for every
    objective at each of ``args.batch_sizes``.

    Model FLOPs per token count what the step must compute: 3x the policy's forward (forward + backward), plus one
    forward of every frozen model the objective uses (teacher, reference). Selective objectives (TIP) are charged
    the full count, so a cheaper selected-logits path shows as a higher MFU-equivalent rate, not a different
    denominator. Only the jitted train step is timed (rollout generation is the decode bench's business).
    ``logits_f32_mb`` is the size of one float32 ``[B, T, V]`` array, the scale of what the loss path would hold
    without chunking or selection. On a shared CPU the matmul rate moves with the load, so each row also reports
    ``mfu_local``: achieved / a calibration measured just before that row's timed steps."""
    from jaxtok.train.step import frozen_states, init_train_state, make_train_step

    vocab = args.vocab_size or cfg.model.vocab_size or 64

    def preset(name):
        return presets.get(name, vocab_size=vocab, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                           **execution_options(cfg.model))

    peak, peak_src = peak_flops(args.calibration_size)
    measured = peak_src.startswith("measured")
    rows, params = [], {}
    for preset_name in args.presets or (cfg.model.preset,):
        model_cfg = preset(preset_name)
        teacher_cfg = preset(args.teacher_preset or preset_name)
        params[preset_name] = num_params(model_cfg)
        fpt = flops_per_token(model_cfg, args.seq_len)
        for spec in args.objectives:
            loss_fn, entry = _objective(spec)
            names = entry.spec.models
            frozen = {n: Decoder(teacher_cfg if n == "teacher" else model_cfg, rngs=nnx.Rngs(1)) for n in names}
            step_fpt = fpt.train + sum(flops_per_token(m.cfg, args.seq_len).forward for m in frozen.values())
            extra = (frozen_states(frozen),) if frozen else ()
            for B in args.batch_sizes:
                model = Decoder(model_cfg, rngs=nnx.Rngs(0))
                opt = build_optimizer(cfg.optimizer, max(args.steps + args.warmup, cfg.optimizer.warmup_steps + 1))
                step = make_train_step(model, opt, loss_fn, frozen=frozen or None)
                _, state = init_train_state(model, opt)
                if entry.spec.data == "rollout":
                    batch = _rollout_batch(B, args.seq_len, model_cfg.vocab_size, B, args.group_size)
                else:
                    batch = _batch(B, args.seq_len, model_cfg.vocab_size, B)
                t0 = time.perf_counter()
                compiled = step.lower(state, batch, *extra).compile()
                compile_s = time.perf_counter() - t0
                mem = compiled_memory_mb(compiled)
                for _ in range(args.warmup):
                    state, m = step(state, batch, *extra)
                jax.block_until_ready(state)
                local = matmul_rate(args.calibration_size) if measured else None  # the load just before timing
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    state, m = step(state, batch, *extra)
                jax.block_until_ready(state)
                dt = (time.perf_counter() - t0) / args.steps
                tok_s = B * args.seq_len / dt
                achieved = tok_s * step_fpt
                rows.append({"preset": preset_name, "objective": _label(spec), "batch": B, "seq_len": args.seq_len,
                             "step_ms": dt * 1e3, "tokens_per_s": tok_s, "flops_per_token": step_fpt,
                             "achieved_tflops": achieved / 1e12, "mfu": achieved / peak,
                             "mfu_local": achieved / local if local else None, "compile_s": compile_s,
                             **mem, "logits_f32_mb": B * args.seq_len * vocab * 4 / 2**20,
                             "selected_frac": float(m["selected_frac"]) if "selected_frac" in m else None,
                             "loss": float(m["loss"])})
    first = (args.presets or (cfg.model.preset,))[0]
    results = {"bench": "train", "preset": first, "presets": list(params), "params": params[first],
               "params_by_preset": params, "vocab_size": vocab,
               "train_flops_per_token": flops_per_token(preset(first), args.seq_len).train,
               "peak_flops": peak, "peak_source": peak_src,
               "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "rows": rows}
    write_results(run_dir, results, rows, title=f"train step, {', '.join(params)} (peak: {peak_src})",
                  plots={"tokens_per_s": functools.partial(draw_train_tokens_per_s, rows)})
    return {"tokens_per_s": rows[-1]["tokens_per_s"], "mfu": rows[-1]["mfu"], "peak_source": peak_src}


@dataclasses.dataclass(frozen=True)
class SweepArgs:
    """A side-by-side comparison of training variants (a reproduction, not a timing): every variant starts from
    ``config`` (or the file of its own ``config=<path>`` entry) with the shared ``overrides`` and then its own
    dotted overrides, runs once per seed, and the table reports the final ``metrics``
    (mean and spread over seeds) and wall time; ``curve`` (a key of the runs' ``metrics.jsonl``) is plotted against
    the step for every variant.

    ``train_metrics``: keys of the logged training rows (e.g. ``selected_frac``, ``q1``..``q4``), averaged over the
    logged steps of a run, then over seeds. ``step_s``: the median of the run's logged ``step_time_s`` windows
    (seconds per optimizer step incl. rollout collection, measured by the loop between synchronising log points;
    the compile window and the periodic evals are left out). Host-side stamps at ``on_step`` would time the
    asynchronous dispatch, not the step. ``memory``: compile
    each variant's train step once on a synthetic batch of the config's shapes and report the XLA memory analysis
    (``temp_mb``, ``peak_mb``). ``compilation_cache``: a JAX persistent compilation cache directory (``""`` = off),
    so seeds after the first reuse the compiled step, sampler and eval functions. ``initial_eval``: evaluate the
    starting model once (the first variant's config; every variant starts from the same ``model.init_from``) and
    put it at step 0 of every curve."""

    config: str = ""
    variants: dict = dataclasses.field(default_factory=dict)  # name -> list of "key=value" overrides
    overrides: tuple[str, ...] = ()  # applied to every variant before its own
    seeds: tuple[int, ...] = (0,)
    metrics: tuple[str, ...] = ("eval/exact_match",)
    curve: str = "eval/exact_match"
    train_metrics: tuple[str, ...] = ()
    memory: bool = False
    compilation_cache: str = ""
    initial_eval: bool = False

    def __post_init__(self):
        if not self.config:
            raise ValueError("config: the experiment config every variant starts from is required")
        if not self.variants:
            raise ValueError("variants: give at least one {name: [overrides]}")
        for name, ov in [*self.variants.items(), ("overrides", self.overrides)]:
            if not isinstance(ov, (list, tuple)) or not all(isinstance(o, str) and "=" in o for o in ov):
                raise ValueError(f"variants.{name}={ov!r}: a list of 'key=value' strings")
        if any(o.startswith("config=") for o in self.overrides):
            raise ValueError("overrides: config=<path> belongs to a variant (the shared base is `config`)")
        if not self.seeds:
            raise ValueError("seeds: at least one")


def _variant_config(args: SweepArgs, name: str, seed: int):
    """The run plan of variant ``name`` with ``seed`` (validated, input paths checked)."""
    from jaxtok.config import check_paths, load_config, validate_names

    own = list(args.variants[name])
    path = args.config
    for o in [o for o in own if o.startswith("config=")]:
        path = o.split("=", 1)[1]
        own.remove(o)
    cfg = load_config(path, [*args.overrides, *own, f"train.seed={seed}", "run.progress=false"])
    plan = validate_names(cfg)
    check_paths(cfg)
    return plan


def variant_step_memory(plan) -> dict:
    """XLA memory of the train step the run plan builds (its model, frozen models, objective and micro-batching),
    compiled on a synthetic batch of the config's shapes: ``[data.batch_size, prompt_len + rollout.max_new_tokens]``
    for rollout objectives, ``[data.batch_size, data.seq_len]`` otherwise. Weights do not change the numbers."""
    from jaxtok.config import build_optimizer as build_opt
    from jaxtok.train.loop import build_frozen_models, build_model, build_objective, load_tokenizer_for
    from jaxtok.train.step import frozen_states, init_train_state, make_train_step

    cfg = plan.cfg
    vocab = load_tokenizer_for(cfg).get_vocab_size()
    model = build_model(cfg, vocab)
    frozen = build_frozen_models(cfg, plan.spec.models, vocab)
    opt = build_opt(cfg.optimizer, cfg.train.steps)
    step = make_train_step(model, opt, build_objective(plan), micro_batches=cfg.train.micro_batches,
                           frozen=frozen or None)
    _, state = init_train_state(model, opt, seed=cfg.train.seed)
    B = cfg.data.batch_size
    if plan.spec.data == "rollout":
        T = cfg.data.prompt_len + cfg.rollout.max_new_tokens
        batch = _rollout_batch(B, T, model.cfg.vocab_size, 0, max(cfg.rollout.num_generations, 1))
    else:
        batch = _batch(B, cfg.data.seq_len, model.cfg.vocab_size, 0)
    extra = (frozen_states(frozen),) if frozen else ()
    return compiled_memory_mb(step.lower(state, batch, *extra).compile())


def logged_step_s(logged: list[dict]) -> Optional[float]:
    """Median seconds per optimizer step over a run's ``metrics.jsonl`` windows (``step_time_s`` of the rows
    with a ``tokens_per_s``; the compile-only window has none); None when no such window was logged."""
    times = [r["step_time_s"] for r in logged if r.get("tokens_per_s") is not None and "step_time_s" in r]
    return float(np.median(times)) if times else None


def _mean_sd(values) -> tuple:
    vals = np.array([v for v in values if v is not None], float)
    return (float(vals.mean()) if vals.size else None), (float(vals.std()) if vals.size > 1 else 0.0)


@BENCHES.register("sweep", SweepArgs)
def sweep_bench(cfg, run_dir: str | Path, args: SweepArgs) -> dict:
    """Train every variant x seed of ``args`` into ``<run_dir>/<variant>/seed<k>`` (finished runs are reused) and
    compare them in one table and one learning-curve plot (mean over seeds; ``results.json`` keeps every run's
    curve and the mean curves)."""
    from jaxtok.metrics import read_jsonl
    from jaxtok.train.loop import evaluate, train

    del cfg
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(args.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    configs = {(v, s): _variant_config(args, v, s) for v in args.variants for s in args.seeds}  # fail early
    memory = {v: variant_step_memory(configs[(v, args.seeds[0])]) for v in args.variants} if args.memory else {}
    initial = None
    if args.initial_eval:
        first = configs[(next(iter(args.variants)), args.seeds[0])]
        initial = evaluate(first, Path(run_dir) / "initial").get(args.curve)
    rows, curves = [], {}
    for (variant, seed), vcfg in configs.items():
        out_dir = Path(run_dir) / variant / f"seed{seed}"
        t0 = time.perf_counter()
        summary = train(vcfg, out_dir)
        logged = read_jsonl(out_dir / "metrics.jsonl")
        row = {"variant": variant, "seed": seed, "wall_s": time.perf_counter() - t0, "step_s": logged_step_s(logged)}
        row.update({m: summary.get(m) for m in args.metrics})
        for key in args.train_metrics:
            row[key] = _mean_sd(r.get(key) for r in logged)[0]
        rows.append(row)
        pts = [(0, initial)] if initial is not None else []
        pts += [(r["step"], r[args.curve]) for r in logged if args.curve in r]
        curves.setdefault(variant, []).append(dict(pts))
    table, mean_curves = [], {}
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, "seeds": len(mine)}
        for m in args.metrics:
            entry[m], entry[f"{m} sd"] = _mean_sd(r[m] for r in mine)
        for key in args.train_metrics:
            entry[key] = _mean_sd(r[key] for r in mine)[0]
        entry["step_s"] = _mean_sd(r["step_s"] for r in mine)[0]
        entry["wall_s"] = float(np.mean([r["wall_s"] for r in mine]))
        entry.update(memory.get(variant, {}))
        table.append(entry)
        steps = sorted(set().union(*curves[variant]))
        mean_curves[variant] = {s: float(np.mean([c[s] for c in curves[variant] if s in c])) for s in steps}
    results = {"bench": "sweep", "config": args.config, "seeds": list(args.seeds), "variants": args.variants,
               "overrides": list(args.overrides), f"initial {args.curve}": initial,
               "rows": rows, "table": table, "curve_key": args.curve, "curves": curves, "mean_curves": mean_curves}
    write_results(run_dir, results, table, title=f"sweep over {args.config}",
                  plots={"curve": functools.partial(draw_sweep_curves, mean_curves, args.curve)})
    return {"table": table}
