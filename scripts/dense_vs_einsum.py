"""Where a CPU train step's time goes, and why ``jaxtok.models.transformer.dense`` flattens its matmuls.

Times, in one process, the jitted forward (+ mean cross-entropy) and forward+backward of a preset's decoder with the
projections computed two ways: ``dense`` (one 2-D matmul per projection, what the models use) and ``tensordot``
(the multi-axis ``dot_general`` an einsum such as ``btd,dhn->bthn`` lowers to; its weight gradient contracts two
axes). Rates are against a float32 1024x1024 matmul measured in the same run, FLOPs counted as the ``train``
bench counts them (:func:`jaxtok.models.flops_per_token`, backward = 2x forward).

    python scripts/dense_vs_einsum.py --preset small --batch 16 --seq 64 --json docs/results/dense_vs_einsum.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxtok.models.transformer as transformer
from jaxtok.models import Decoder, flops_per_token, presets


def _best_ms(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def _tensordot(x, w, n_in=1, preferred_element_type=None):
    return jnp.tensordot(x, w, axes=n_in, preferred_element_type=preferred_element_type)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the rows and settings to this results.json path")
    a = p.parse_args()
    cfg = presets.get(a.preset, vocab_size=64)
    eye = jnp.ones((1024, 1024), jnp.float32)
    peak = 2 * 1024**3 / (_best_ms(jax.jit(lambda m: m @ m), eye) / 1e3)
    fwd_flops = flops_per_token(cfg, a.seq).forward * a.batch * a.seq
    tokens = jax.random.randint(jax.random.key(1), (a.batch, a.seq), 4, cfg.vocab_size)
    rows = []
    for name, fn in (("dense (2-D matmuls)", transformer.dense), ("tensordot (multi-axis)", _tensordot)):
        transformer.dense = fn
        graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))

        def loss(s, t):
            logits = nnx.merge(graphdef, s)(t).logits  # [B, T, V]
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        f_ms = _best_ms(jax.jit(loss), state, tokens)
        g_ms = _best_ms(jax.jit(jax.grad(loss)), state, tokens)
        rows.append((name, f_ms, g_ms, fwd_flops / (f_ms / 1e3) / peak, 3 * fwd_flops / (g_ms / 1e3) / peak))
    print(f"{a.preset}, batch {a.batch} x seq {a.seq}; matmul peak {peak / 1e9:.0f} GFLOP/s (f32 1024^2, this run)")
    print("| projections | forward ms | forward+backward ms | bwd/fwd | forward rate | fwd+bwd rate |")
    print("|---|---|---|---|---|---|")
    for name, f, g, rf, rg in rows:
        print(f"| {name} | {f:.1f} | {g:.1f} | {(g - f) / f:.2f} | {rf:.2f} | {rg:.2f} |")
    if a.json:
        keys = ("projections", "forward_ms", "fwd_bwd_ms", "forward_rate", "fwd_bwd_rate")
        with open(a.json, "w") as fh:
            json.dump({"preset": a.preset, "batch": a.batch, "seq": a.seq, "peak_flops": peak,
                       "device": jax.devices()[0].device_kind, "rows": [dict(zip(keys, r)) for r in rows]}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
