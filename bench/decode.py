"""``decode`` benchmark: AR decoding throughput against the device's memory bandwidth.

For each batch size: prefill tokens/s (one forward over the prompt), decode tokens/s of the jitted
:func:`jaxtok.decode.generate` loop (greedy, no stop tokens, so every row generates ``new_tokens``), and the
achieved bandwidth = (weight bytes + KV-cache bytes read per decode step) x steps / decode time, against the
device's bandwidth: a data-sheet table for TPUs and NVIDIA GPUs, on a CPU a read calibration measured in the same
run. Decode time is the generate call minus the measured prefill time.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.metrics import device_table_value, write_results
from jaxtok.models import Decoder, KVCache, num_params, presets
from jaxtok.registry import BENCHES

from jaxtok.decode.generate import generate
from jaxtok.sampling import GREEDY

from .plots import draw_decode_tokens_per_s

# HBM bandwidth per chip (bytes/s), from the vendors' data sheets.
PEAK_BANDWIDTH = {
    "TPU v4": 1.2e12, "TPU v5 lite": 0.82e12, "TPU v5e": 0.82e12, "TPU v5p": 2.76e12, "TPU v5": 2.76e12,
    "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12,
    "A100": 2.0e12, "H100": 3.35e12, "H200": 4.8e12,
}


@dataclasses.dataclass(frozen=True)
class DecodeBenchArgs:
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    prompt_len: int = 16
    new_tokens: int = 32
    repeats: int = 3  # timed calls per batch size (after one compiling call)
    calibration_mb: int = 256  # CPU: size of the array read to measure bandwidth

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes={self.batch_sizes}: positive integers")
        if self.prompt_len < 1 or self.new_tokens < 1 or self.repeats < 1:
            raise ValueError("prompt_len, new_tokens and repeats must be >= 1")


def peak_bandwidth(calibration_mb: int = 256) -> tuple[float, str]:
    """``(bytes/s of one device, source)``: the table for known accelerators, else the best read rate measured
    in the same run over a ``calibration_mb`` float32 array: a full reduction (``sum``: a pure stream read) and a
    matrix-vector product (the access pattern of a decode step's weight reads). The best of the two is the peak,
    so a decode step cannot look better than the machine's own streaming read."""
    value, kind = device_table_value(PEAK_BANDWIDTH)
    if value is not None:
        return value, f"table ({kind})"
    n = calibration_mb * 2**20 // 4
    cols = 1024
    w = jnp.ones((n // cols, cols), jnp.float32)
    v = jnp.ones((cols,), jnp.float32)
    rates = {}
    for name, fn in {"sum": jax.jit(jnp.sum), "matvec": jax.jit(lambda a: a @ v)}.items():
        fn(w).block_until_ready()
        reps, t0 = 5, time.perf_counter()
        for _ in range(reps):
            out = fn(w)
        out.block_until_ready()
        rates[name] = 4 * n * reps / (time.perf_counter() - t0)
    best = max(rates, key=rates.get)
    return rates[best], f"measured {calibration_mb} MB read ({best}) on {kind}"


def _timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / repeats


def _breakdown(model, state, weight_bytes: int, peak: float, capacity: int, repeats: int) -> dict:
    """Where a batch-1 decode step's time goes, each part timed alone: ``ideal`` = weight bytes / peak;
    ``weight_matvecs`` = every weight matrix read once by one fused matrix-vector chain (the step's unavoidable
    reads, at the efficiency the machine reaches on matrices of these sizes); ``cached_forward`` = one jitted
    single-token forward with the KV cache (adds norms, RoPE, attention, logits and the cache write)."""
    graphdef = nnx.graphdef(model)
    mats = [w for w in jax.tree.leaves(state) if getattr(w, "ndim", 0) >= 2]

    @jax.jit
    def chain(mats):
        acc = jnp.zeros((), jnp.float32)
        for w in mats:
            w2 = w.reshape(-1, w.shape[-1])
            acc = acc + jnp.sum(jnp.ones((w2.shape[0],), w2.dtype) @ w2)
        return acc

    @jax.jit
    def step(state, cache, tok):
        out = nnx.merge(graphdef, state)(tok, cache=cache)
        return out.logits, out.cache

    cache = KVCache.init(model.cfg, 1, capacity, model.cfg.dtype)
    tok = jnp.ones((1, 1), jnp.int32)
    return {"ideal": weight_bytes / peak * 1e3, "weight_matvecs": _timed(lambda: chain(mats), repeats) * 1e3,
            "cached_forward": _timed(lambda: step(state, cache, tok), repeats) * 1e3}


def execution_options(sec) -> dict:
    """The ``ModelConfig`` execution fields of config section ``model`` (``attention_impl``, ``scan_layers``,
    ``remat``), so a bench measures the model as a training or decoding run builds it."""
    return {k: getattr(sec, k) for k in ("attention_impl", "scan_layers", "remat") if hasattr(sec, k)}


@BENCHES.register("decode", DecodeBenchArgs)
def decode_bench(cfg, run_dir: str | Path, args: DecodeBenchArgs) -> dict:
    """Prefill and decode throughput and achieved bandwidth of ``cfg.model.preset`` at each batch size."""
    model_cfg = presets.get(cfg.model.preset, vocab_size=cfg.model.vocab_size or 64, dtype=cfg.model.dtype,
                            param_dtype=cfg.model.param_dtype, **execution_options(cfg.model))
    model = Decoder(model_cfg, rngs=nnx.Rngs(0))
    peak, peak_src = peak_bandwidth(args.calibration_mb)
    weight_bytes = num_params(model_cfg) * jnp.dtype(model_cfg.param_dtype).itemsize
    kv_per_token = 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim * jnp.dtype(model_cfg.dtype).itemsize
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
    P, N = args.prompt_len, args.new_tokens
    rows = []
    for B in args.batch_sizes:
        prompt = np.random.default_rng(B).integers(4, model_cfg.vocab_size, (B, P)).astype(np.int32)
        valid = np.ones((B, P), bool)
        t_prefill = _timed(lambda: prefill(state, prompt), args.repeats)
        t_total = _timed(lambda: generate(model, prompt, valid, max_new_tokens=N, sampling=GREEDY, stop_tokens=(),
                                          rng=jax.random.key(0)).tokens, args.repeats)
        t_decode = max(t_total - t_prefill, 1e-9)
        mean_ctx = P + (N + 1) / 2
        bytes_per_step = weight_bytes + B * mean_ctx * kv_per_token
        achieved = bytes_per_step * N / t_decode
        rows.append({"batch": B, "prefill_tokens_per_s": B * P / t_prefill, "decode_tokens_per_s": B * N / t_decode,
                     "ms_per_step": t_decode / N * 1e3, "achieved_gb_s": achieved / 1e9,
                     "bandwidth_utilisation": achieved / peak})
    results = {"bench": "decode", "preset": cfg.model.preset, "params": num_params(model_cfg),
               "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "prompt_len": P, "new_tokens": N,
               "peak_bandwidth": peak, "peak_source": peak_src, "device": jax.devices()[0].device_kind, "rows": rows,
               "batch1_breakdown_ms": _breakdown(model, state, weight_bytes, peak, P + N, args.repeats)}
    write_results(run_dir, results, rows, title=f"AR decode, {cfg.model.preset} (bandwidth peak: {peak_src})",
                  plots={"decode_tokens_per_s": functools.partial(draw_decode_tokens_per_s, rows)})
    return {"decode_tokens_per_s": rows[-1]["decode_tokens_per_s"], "peak_source": peak_src}
