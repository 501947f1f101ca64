"""MoESD on CPU (issue 18 item 2): does a sparse MoE target gain more from speculative decoding (SD) than a dense
target of equal active parameters at medium batch sizes? The cost model (:mod:`jaxtok.decode.moesd`) beside CPU
measurements.

Three parts, all settings from ``configs/scripts/moesd.yaml``:

1. **Probe**: time of one MoE layer's expert computation (:func:`jaxtok.models.moe.expert_swiglu`) for both
   library dispatches, ``ragged_dot`` (JAX's CPU rule runs every expert on every row) and ``tiled`` (expert-aligned
   tiles, a ``lax.cond`` per tile: work proportional to the routed rows, only activated experts' weights read, as
   GPU grouped-GEMM kernels do), forward and forward + backward, over ``n`` routed tokens with the routing forced
   to activate 2, 4, 8 or all experts, or uniform random (~eq. 2). Interleaved repeats, fastest kept.
2. **Speedup vs batch**: an MoE target (run with each dispatch: ``moe_ragged``, ``moe_tiled``) and a dense target with the same attention and ``intermediate_size =
   k · moe_intermediate_size`` (equal active parameters), the same AR draft, greedy SD with fixed γ against greedy
   AR of the same target at each batch size; timed passes interleaved (MoE AR, MoE SD, dense AR, dense SD per
   repeat), the median of the per-repeat AR/SD ratios reported (and the ratio of the fastest passes). Beside it: per-forward times (target step on 1
   token, verification on γ+1, draft step; :func:`jaxtok.bench.speculative.forward_costs`) and two predictions:
   eq. (1) with those measured times and the measured tokens per round, and the count model
   ``AR forwards · t_step / (target forwards · t_verify + draft forwards · t_draft)``.
   Controlled acceptance: random models rarely agree, so the draft and both targets share one embedding and LM
   head; the draft's layer output is zeroed (its compute still runs), the targets' residual branches (attention
   and MLP/expert output projections) are scaled by ``eps``, calibrated per target so greedy acceptance is close to
   ``acceptance`` at batch ``calibrate_batch``. Small ``eps`` -> both models predict nearly the same bigram map.
3. **Cost-model curves**: eq. (1) with roofline forward times (eq. 2 for the experts) for the real shapes in
   ``real_targets`` against their dense equal-active models on ``hardware`` (published GPU peak numbers).

    python scripts/moesd.py configs/scripts/moesd.yaml            # -> docs/results/moesd.{json,md,png}

A config key that is not known, or a bad value, exits with code 2 and a message naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.decode import generate, speculative_generate
from jaxtok.sampling import GREEDY
from jaxtok.decode import moesd as cm
from jaxtok.bench.speculative import forward_costs
from jaxtok.metrics import default_command, markdown_table, save_plot, script_args
from jaxtok.models import Decoder, ModelConfig, presets
from jaxtok.models import moe as moe_lib
from jaxtok.models.transformer import with_execution


@dataclasses.dataclass(frozen=True)
class MoESDArgs:
    """Settings of ``scripts/moesd.py`` (see its docstring). Model shapes: ``hidden_size``, ``num_layers``,
    ``num_heads``, ``num_kv_heads``, ``vocab_size``; MoE ``num_experts``/``top_k``/``moe_intermediate_size``;
    draft ``draft_layers``/``draft_intermediate_size``. Decoding: ``batches``, ``gamma``, ``max_new_tokens``,
    ``prompt_len``, ``repeats`` (interleaved timed passes), ``cost_repeats`` (per forward-time measurement),
    ``acceptance`` (calibration goal) at ``calibrate_batch`` over ``eps_grid``. Probe: ``probe_tokens``,
    ``probe_repeats``. Curves: ``hardware`` (a name of ``jaxtok.decode.moesd.HARDWARE``), ``real_targets`` and
    ``real_draft`` (presets), ``real_alpha``, ``real_gamma``, ``real_batches``. ``out``: results path stem."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 256
    num_experts: int = 16
    top_k: int = 2
    moe_intermediate_size: int = 256
    draft_layers: int = 1
    draft_intermediate_size: int = 128
    batches: tuple = (1, 2, 4, 8, 16, 32, 64)
    gamma: int = 3
    max_new_tokens: int = 32
    prompt_len: int = 8
    repeats: int = 3
    cost_repeats: int = 10
    acceptance: float = 0.8
    calibrate_batch: int = 8
    eps_grid: tuple = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    probe_tokens: tuple = (1, 4, 16, 64, 256)
    probe_repeats: int = 5
    hardware: str = "h100-sxm"
    real_targets: tuple = ("qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "mixtral-8x7b")
    real_draft: str = "qwen3-0.6b"
    real_alpha: float = 0.8
    real_gamma: int = 3
    real_batches: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    seed: int = 0
    out: str = "docs/results/moesd"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(f.default, tuple) and not isinstance(v, (list, tuple)):
                raise ValueError(f"{f.name}={v!r}: a list")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "num_experts", "top_k",
                     "moe_intermediate_size", "draft_layers", "draft_intermediate_size", "gamma", "max_new_tokens",
                     "prompt_len", "repeats", "cost_repeats", "calibrate_batch", "probe_repeats", "real_gamma"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k}: allowed 1..num_experts={self.num_experts}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads}: must divide hidden_size={self.hidden_size} and be a "
                             f"multiple of num_kv_heads={self.num_kv_heads}")
        if not 0 < self.acceptance < 1 or not 0 <= self.real_alpha <= 1:
            raise ValueError(f"acceptance={self.acceptance} must be in (0, 1), real_alpha={self.real_alpha} in [0, 1]")
        if self.hardware not in cm.HARDWARE:
            raise ValueError(f"hardware={self.hardware!r}: allowed {sorted(cm.HARDWARE)}")
        bad = [n for n in (*self.real_targets, self.real_draft) if n not in presets.PRESETS]
        if bad:
            raise ValueError(f"real_targets/real_draft: unknown preset {bad[0]!r}; allowed {presets.names()}")
        if any(int(b) < 1 for b in (*self.batches, *self.real_batches, *self.probe_tokens)) or not self.eps_grid:
            raise ValueError("batches, real_batches and probe_tokens must be >= 1; eps_grid non-empty")


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def model_configs(a: MoESDArgs) -> dict[str, ModelConfig]:
    """The MoE target, its dense equal-active twin and the draft (Qwen3-style, untied embeddings)."""
    base = dict(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_heads=a.num_heads,
                num_kv_heads=a.num_kv_heads, head_dim=a.hidden_size // a.num_heads, rope_theta=10000.0,
                max_position_embeddings=512, qk_norm=True)
    return {
        "moe": ModelConfig(**base, intermediate_size=a.top_k * a.moe_intermediate_size, num_layers=a.num_layers,
                           architecture="qwen3_moe", num_experts=a.num_experts, num_experts_per_tok=a.top_k,
                           moe_intermediate_size=a.moe_intermediate_size, norm_topk_prob=True),
        "dense": ModelConfig(**base, intermediate_size=a.top_k * a.moe_intermediate_size, num_layers=a.num_layers,
                             architecture="qwen3"),
        "draft": ModelConfig(**base, intermediate_size=a.draft_intermediate_size, num_layers=a.draft_layers,
                             architecture="qwen3"),
    }


_OUT_PROJ = ("o_weight", "down_weight")  # residual-branch output projections (attention, MLP, experts)


def residual_scale(model: Decoder, eps: float, base: dict) -> None:
    """Set every residual-branch output projection to ``eps`` times its value in ``base`` (a saved state)."""
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and any(str(path[-1]).startswith(p) for p in _OUT_PROJ):
            var[...] = base[path] * eps


def out_proj_state(model: Decoder) -> dict:
    return {path: jnp.array(var[...]) for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param) and any(str(path[-1]).startswith(p) for p in _OUT_PROJ)}


def share_embeddings(src: Decoder, *dsts: Decoder) -> None:
    for d in dsts:
        d.embed_vd[...] = src.embed_vd[...]
        d.lm_head_dv[...] = src.lm_head_dv[...]


# ----------------------------------------------------------------------------------------------------------------
# Part 1: does the MoE forward's time depend on how many experts are activated?
# ----------------------------------------------------------------------------------------------------------------


def with_dispatch(model: Decoder, dispatch: str) -> Decoder:
    """The same MoE decoder (same weights) with ``ModelConfig.moe_dispatch = dispatch``
    (:func:`jaxtok.models.transformer.with_execution`); a distinct graph, so its jitted decode loops are traced and
    cached apart."""
    return with_execution(model, moe_dispatch=dispatch)


def routings(n: int, E: int, k: int, rng: np.random.Generator, counts=(2, 4, 8)) -> dict[str, np.ndarray]:
    """``[n, k]`` expert choices: ``"m experts"`` = the n·k assignments round-robin over experts 0..m-1 (distinct
    per token for k <= m; min(m, n·k) activated) for each m in ``counts`` (>= k) and E, and ``"random"`` = uniform
    distinct picks per token (~eq.-(2) activated)."""
    out = {}
    for m in sorted({max(int(c), k) for c in counts if c < E} | {E}):
        out[f"{m} experts"] = (np.arange(n * k) % m).reshape(n, k)
    out["random"] = np.stack([rng.choice(E, k, replace=False) for _ in range(n)])
    return out


DISPATCHES = ("ragged_dot", "tiled")


def probe(a: MoESDArgs, moe_model: Decoder) -> list[dict]:
    """Milliseconds of the expert computation of layer 0 per routing and dispatch (``moe_dispatch`` ragged_dot /
    tiled, :func:`jaxtok.models.moe.expert_swiglu`), forward and forward + backward (gradient of the sum of
    squares w.r.t. the rows and the three weights), fastest of interleaved repeats."""
    layer = moe_model.layers[0].mlp
    w = [jnp.asarray(getattr(layer, n)[...]) for n in ("gate_weight_edf", "up_weight_edf", "down_weight_efd")]
    fns = {}
    for d in DISPATCHES:
        f = functools.partial(moe_lib.expert_swiglu, dispatch=d)
        fns[(d, "fwd")] = jax.jit(f)
        fns[(d, "fwd+bwd")] = jax.jit(jax.grad(lambda x, ex, g, u, dn, f=f: jnp.sum(f(x, ex, g, u, dn) ** 2),
                                               argnums=(0, 2, 3, 4)))
    rows = []
    for n in a.probe_tokens:
        x = jax.random.normal(jax.random.key(n), (n, a.hidden_size), jnp.float32)
        calls = {}
        routes = routings(int(n), a.num_experts, a.top_k, np.random.default_rng(a.seed + int(n)))
        for rname, ex in routes.items():
            ex = jnp.asarray(ex, jnp.int32)
            for dname, fn in fns.items():
                jax.block_until_ready(fn(x, ex, *w))  # compile (one per n, dispatch and pass)
                calls[(rname, dname)] = (fn, ex)
        best = {key: float("inf") for key in calls}
        for r in range(a.probe_repeats):
            for key in (list(calls) if r % 2 == 0 else list(reversed(list(calls)))):  # interleaved
                fn, ex = calls[key]
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, ex, *w))
                best[key] = min(best[key], time.perf_counter() - t0)
        for rname, ex in routes.items():
            active = len(np.unique(ex))
            row = {"tokens": int(n), "routing": rname, "active_experts": active,
                   "eq2_experts": cm.expected_active_experts(a.num_experts, a.top_k, int(n))}
            for pas in ("fwd", "fwd+bwd"):
                rd, td = best[(rname, ("ragged_dot", pas))], best[(rname, ("tiled", pas))]
                row |= {f"ragged_dot_{pas}_ms": rd * 1e3, f"tiled_{pas}_ms": td * 1e3, f"ratio_{pas}": rd / td}
            rows.append(row)
        print(f"probe n={n}: " + ", ".join(f"{r['routing']} {r['ragged_dot_fwd_ms']:.3f}/{r['tiled_fwd_ms']:.3f}ms"
                                          for r in rows if r["tokens"] == n), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Part 2: SD speedup vs batch size, MoE and dense targets
# ----------------------------------------------------------------------------------------------------------------


def prompts(a: MoESDArgs, batch: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(a.seed + batch)
    p = rng.integers(4, a.vocab_size, size=(batch, a.prompt_len)).astype(np.int32)
    return jnp.asarray(p), jnp.ones(p.shape, bool)


def decode_calls(a: MoESDArgs, target: Decoder, draft: Decoder):
    """``(ar(prompt, valid), sd(prompt, valid))`` greedy, no stop token, same key."""
    key = jax.random.key(a.seed)
    ar = lambda p, v: generate(target, p, v, max_new_tokens=a.max_new_tokens, sampling=GREEDY,  # noqa: E731
                               stop_tokens=(), rng=key, return_logprobs=False)
    sd = lambda p, v: speculative_generate(target, draft, p, v, max_new_tokens=a.max_new_tokens,  # noqa: E731
                                           draft_len=a.gamma, sampling=GREEDY, stop_tokens=(), rng=key)
    return ar, sd


def sd_stats(res) -> dict:
    rounds = int(np.sum(np.asarray(res.rounds)))
    return {"acceptance": float(np.sum(res.accepted) / max(np.sum(res.drafted), 1)),
            "tokens_per_round": float(np.sum(np.asarray(res.lengths) - 1) / max(rounds, 1)),  # first token: prefill
            "target_forwards": int(res.target_forwards), "draft_forwards": int(res.draft_forwards)}


def calibrate(a: MoESDArgs, target: Decoder, draft: Decoder, base: dict) -> tuple[float, list]:
    """The ``eps`` of ``eps_grid`` whose greedy acceptance at ``calibrate_batch`` is closest to ``acceptance``."""
    _, sd = decode_calls(a, target, draft)
    p, v = prompts(a, a.calibrate_batch)
    tried = []
    for eps in a.eps_grid:
        residual_scale(target, eps, base)
        tried.append({"eps": eps, "acceptance": sd_stats(sd(p, v))["acceptance"]})
    best = min(tried, key=lambda t: abs(t["acceptance"] - a.acceptance))
    residual_scale(target, best["eps"], base)
    return best["eps"], tried


def speedup_rows(a: MoESDArgs, targets: dict, draft: Decoder) -> list[dict]:
    rows = []
    for b in a.batches:
        t_start = time.perf_counter()
        p, v = prompts(a, int(b))
        calls, res = {}, {}
        for name, tgt in targets.items():
            ar, sd = decode_calls(a, tgt, draft)
            calls[(name, "ar")], calls[(name, "sd")] = ar, sd
        for key, fn in calls.items():
            res[key] = jax.block_until_ready(fn(p, v))  # compile + outputs
        times = {key: [] for key in calls}
        for r in range(a.repeats):
            order = list(calls) if r % 2 == 0 else list(reversed(list(calls)))
            for key in order:
                t0 = time.perf_counter()
                jax.block_until_ready(calls[key](p, v))
                times[key].append(time.perf_counter() - t0)
        for name, tgt in targets.items():
            ar_out, sd_out = res[(name, "ar")], res[(name, "sd")]
            same = bool(np.array_equal(np.asarray(ar_out.tokens), np.asarray(sd_out.tokens)))
            ratios = [x / y for x, y in zip(times[(name, "ar")], times[(name, "sd")])]
            c = forward_costs(tgt, draft, None, int(b), a.prompt_len + a.max_new_tokens + 2 * a.gamma + 2, a.gamma,
                              a.cost_repeats)
            st = sd_stats(sd_out)
            pred_eq1 = cm.sd_speedup(min(st["acceptance"], 1.0), a.gamma, c["target_step"], c["target_verify"],
                                     c["draft_step"])
            ar_forwards = int(ar_out.num_forwards)
            pred_counts = (ar_forwards * c["target_step"]) / (st["target_forwards"] * c["target_verify"]
                                                              + st["draft_forwards"] * c["draft_step"])
            rows.append({
                "target": name, "batch": int(b), "speedup": statistics.median(ratios),
                "speedup_fastest": min(times[(name, "ar")]) / min(times[(name, "sd")]),
                "speedup_min": min(ratios), "speedup_max": max(ratios),
                "ar_ms": statistics.median(times[(name, "ar")]) * 1e3,
                "sd_ms": statistics.median(times[(name, "sd")]) * 1e3,
                **st, "identical_to_ar": same,
                "t_step_ms": c["target_step"], "t_verify_ms": c["target_verify"], "t_draft_ms": c["draft_step"],
                "target_efficiency": cm.target_efficiency(c["target_step"], c["target_verify"]),
                "predicted_eq1": pred_eq1, "predicted_counts": pred_counts,
                "experts_step_eq2": cm.expected_active_experts(tgt.cfg.num_experts, tgt.cfg.num_experts_per_tok,
                                                               int(b)),
                "experts_verify_eq2": cm.expected_active_experts(tgt.cfg.num_experts, tgt.cfg.num_experts_per_tok,
                                                                 int(b) * (a.gamma + 1)),
            })
            r = rows[-1]
            print(f"B={b} {name}: speedup {r['speedup']:.2f} [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] "
                  f"acc {r['acceptance']:.2f} eff {r['target_efficiency']:.2f} pred {pred_eq1:.2f}/"
                  f"{pred_counts:.2f} identical {same}", flush=True)
        print(f"  batch {b} took {time.perf_counter() - t_start:.0f}s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Part 3: cost-model curves for real shapes
# ----------------------------------------------------------------------------------------------------------------


def model_curves(a: MoESDArgs) -> list[dict]:
    hw = cm.HARDWARE[a.hardware]
    draft = cm.shape_of(presets.get(a.real_draft), 2)
    rows = []
    for name in a.real_targets:
        shape = cm.shape_of(presets.get(name), 2)
        for kind, s in (("moe", shape), ("dense", cm.dense_equivalent(shape))):
            for r in cm.speedup_curve(s, draft, a.real_batches, a.real_gamma, a.real_alpha, hw):
                rows.append({"model": name, "kind": kind, "batch": r["batch"], "speedup": r["speedup"],
                             "target_efficiency": r["target_efficiency"], "experts_step": r["experts_step"],
                             "experts_verify": r["experts_verify"]})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def plot(results: dict, path: Path, command: str) -> None:
    def draw(ax):
        gs = ax.get_subplotspec().subgridspec(1, 4, wspace=0.3)
        fig = ax.figure
        ax.remove()
        ax1, ax4, ax2, ax3 = (fig.add_subplot(gs[0, i]) for i in range(4))
        pr = results["probe"]
        E = results["args"]["num_experts"]
        for d, col in (("ragged_dot", "C0"), ("tiled", "C1")):
            for rname, ls in ((f"{min(2, E)} experts", "--"), (f"{E} experts", "-")):
                pts = [(r["tokens"], r[f"{d}_fwd_ms"]) for r in pr if r["routing"] == rname]
                ax1.plot(*zip(*pts), color=col, ls=ls, marker="o", label=f"{d}, {rname} activated")
        ax1.set_xscale("log"), ax1.set_yscale("log")
        ax1.set_xlabel("routed tokens"), ax1.set_ylabel("ms, one MoE layer's experts (forward)")
        ax1.set_title("CPU: expert time vs tokens", fontsize=9), ax1.legend(fontsize=7)
        n_big = max(r["tokens"] for r in pr)
        for d, col in (("ragged_dot", "C0"), ("tiled", "C1")):
            for pas, ls in (("fwd", "-"), ("fwd+bwd", ":")):
                pts = sorted((r["active_experts"], r[f"{d}_{pas}_ms"]) for r in pr
                             if r["tokens"] == n_big and r["routing"] != "random")
                ax4.plot(*zip(*pts), color=col, ls=ls, marker="o", label=f"{d} {pas}")
        ax4.set_yscale("log"), ax4.set_xlabel(f"activated experts ({n_big} tokens)"), ax4.set_ylabel("ms")
        ax4.set_title("CPU: expert time vs activated experts", fontsize=9), ax4.legend(fontsize=7)
        sp = results["speedup"]
        for name, col in (("moe_ragged", "C0"), ("moe_tiled", "C1"), ("dense", "C2")):
            rs = [r for r in sp if r["target"] == name]
            bs = [r["batch"] for r in rs]
            ax2.plot(bs, [r["speedup"] for r in rs], color=col, marker="o", label=f"{name} measured")
            ax2.plot(bs, [r["predicted_counts"] for r in rs], color=col, ls="--", label=f"{name} counts x fwd times")
        ax2.axhline(1.0, color="0.5", lw=0.8)
        ax2.set_xscale("log", base=2), ax2.set_xlabel("batch size"), ax2.set_ylabel("SD speedup over AR")
        ax2.set_title(f"CPU tiny targets, γ={results['args']['gamma']}", fontsize=9), ax2.legend(fontsize=7)
        cv = results["model_curves"]
        for i, name in enumerate(results["args"]["real_targets"]):
            for kind, ls in (("moe", "-"), ("dense", "--")):
                rs = [r for r in cv if r["model"] == name and r["kind"] == kind]
                ax3.plot([r["batch"] for r in rs], [r["speedup"] for r in rs], color=f"C{i}", ls=ls,
                         label=f"{name} {kind}" if kind == "moe" else "  dense equal-active")
        ax3.axhline(1.0, color="0.5", lw=0.8)
        ax3.set_xscale("log", base=2), ax3.set_xlabel("batch size"), ax3.set_ylabel("predicted SD speedup")
        ax3.set_title(f"cost model, {results['args']['hardware']}, α={results['args']['real_alpha']}, "
                      f"γ={results['args']['real_gamma']}", fontsize=9)
        ax3.legend(fontsize=6)

    save_plot(path, draw, command=command, size=(20.0, 5.5))


def main(argv: list[str]) -> int:
    a = script_args(MoESDArgs, argv, "moesd")
    if a is None:
        return 2
    command = default_command()
    t0 = time.perf_counter()
    cfgs = model_configs(a)
    models = {k: Decoder(c, rngs=nnx.Rngs(a.seed + i)) for i, (k, c) in enumerate(cfgs.items())}
    share_embeddings(models["draft"], models["moe"], models["dense"])
    residual_scale(models["draft"], 0.0, out_proj_state(models["draft"]))
    print("part 1: probe", flush=True)
    probe_rows = probe(a, models["moe"])
    print(f"part 2: calibrate eps ({time.perf_counter() - t0:.0f}s)", flush=True)
    calib = {}
    for name in ("moe", "dense"):
        eps, tried = calibrate(a, models[name], models["draft"], out_proj_state(models[name]))
        calib[name] = {"eps": eps, "tried": tried}
        print(f"  {name}: eps={eps} ({tried})", flush=True)
    print(f"part 2: speedup vs batch ({time.perf_counter() - t0:.0f}s)", flush=True)
    targets = {"moe_ragged": with_dispatch(models["moe"], "ragged_dot"),
               "moe_tiled": with_dispatch(models["moe"], "tiled"), "dense": models["dense"]}
    sp = speedup_rows(a, targets, models["draft"])
    curves = model_curves(a)
    shapes = {k: dataclasses.asdict(cm.shape_of(c)) for k, c in cfgs.items()}
    results = {"command": command, "args": dataclasses.asdict(a), "shapes": shapes, "calibration": calib,
               "probe": probe_rows, "speedup": sp, "model_curves": curves,
               "wall_s": time.perf_counter() - t0, "devices": str(jax.devices())}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"), command)
    tables = {
        "probe": markdown_table(probe_rows),
        "speedup": markdown_table(sp, ["target", "batch", "speedup", "speedup_min", "speedup_max", "speedup_fastest", "acceptance",
                                       "tokens_per_round", "t_step_ms", "t_verify_ms", "t_draft_ms",
                                       "target_efficiency", "predicted_eq1", "predicted_counts",
                                       "experts_step_eq2", "experts_verify_eq2", "identical_to_ar"]),
        "curves": markdown_table(curves),
    }
    out.with_name(out.name + ".tables.md").write_text(
        "\n".join(f"## {k}\n\n{v}" for k, v in tables.items()))
    print(f"done in {time.perf_counter() - t0:.0f}s -> {out}.json, {out}.png, {out}.tables.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
