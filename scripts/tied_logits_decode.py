"""Batch-1 decode step time with the tied LM head computed two ways: ``dense(h, embed.T)`` (before: XLA:CPU copies a
transposed ``[D, V]`` embedding inside every step) and :func:`jaxtok.models.transformer.dense_t` (after: the dot
contracts ``embed [V, D]``'s D axis directly; what ``Decoder.logits`` does now for calls of at most
``transformer._MATVEC_ROWS`` rows, i.e. decoding).

One jitted step = one token through the decoder with a KV cache (``capacity`` slots, ``prefill`` of them written),
logits over the whole vocabulary. The two variants are timed in the same process, interleaved ``--rounds`` times
(best of ``--reps`` steps each round); the table reports the median step time per variant, the after/before ratio
per round, and whether the compiled step contains a transpose/copy of the embedding.

    python scripts/tied_logits_decode.py --preset qwen3-0.6b --layers 4 --rounds 5 \\
        --out docs/results/tied_logits_decode
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import jaxtok.models.transformer as T
from jaxtok.metrics import default_command, markdown_table
from jaxtok.models import Decoder, presets
from jaxtok.models.cache import KVCache


def _before_logits(self, hidden):
    """``Decoder.logits`` as it was: the tied head as ``dense(h, embed.T)``."""
    dt = jnp.dtype(self.cfg.dtype)
    w = self.embed_vd[...].T if self.cfg.tie_embeddings else self.lm_head_dv[...]
    return T.dense(hidden.astype(dt), w.astype(dt), preferred_element_type=jnp.float32).astype(jnp.float32)


def build_step(model, variant: str):
    graphdef, state = nnx.split(model)
    logits_fn = _before_logits if variant == "before" else T.Decoder.logits

    @jax.jit
    def step(state, cache, tok):
        m = nnx.merge(graphdef, state)
        orig = T.Decoder.logits
        T.Decoder.logits = logits_fn  # traced once under jit
        try:
            out = m(tok, cache=cache)
        finally:
            T.Decoder.logits = orig
        return out.logits, out.cache

    return step, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="docs/results/tied_logits_decode")
    a = ap.parse_args()

    cfg = presets.get(a.preset, num_layers=a.layers)
    if not cfg.tie_embeddings:
        raise SystemExit(f"preset {a.preset} has untied embeddings; nothing to compare")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    cache = KVCache.init(cfg, 1, a.capacity)
    _, cache = jax.jit(lambda m, c: (None, m(jnp.zeros((1, a.prefill), jnp.int32), cache=c).cache))(model, cache)
    tok = jnp.ones((1, 1), jnp.int32)
    steps, hlo, logits = {}, {}, {}
    for v in ("before", "after"):
        step, state = build_step(model, v)
        txt = step.lower(state, cache, tok).compile().as_text()
        shape = f"[{cfg.hidden_size},{cfg.vocab_size}]"
        hlo[v] = sum(1 for line in txt.splitlines() if shape in line and ("transpose(" in line or " copy(" in line))
        logits[v] = step(state, cache, tok)[0]
        steps[v] = (step, state)
    max_diff = float(jnp.max(jnp.abs(logits["before"] - logits["after"])))
    times = {v: [] for v in steps}
    for _ in range(a.rounds):
        for v, (step, state) in steps.items():
            jax.block_until_ready(step(state, cache, tok))
            best = float("inf")
            for _ in range(a.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(step(state, cache, tok))
                best = min(best, time.perf_counter() - t0)
            times[v].append(best * 1e3)
    ratios = [t_a / t_b for t_a, t_b in zip(times["after"], times["before"])]
    embed_mb = cfg.vocab_size * cfg.hidden_size * 4 / 2**20
    rows = [{"variant": v, "step_ms (median)": round(statistics.median(times[v]), 2),
             "step_ms per round": [round(t, 2) for t in times[v]],
             "embedding transpose/copy ops in HLO": hlo[v]} for v in ("before", "after")]
    results = {"command": default_command(), "backend": jax.default_backend(), "jax": jax.__version__,
               "preset": a.preset, "num_layers": cfg.num_layers, "hidden": cfg.hidden_size,
               "vocab": cfg.vocab_size, "embedding_mib_f32": round(embed_mb, 1), "capacity": a.capacity,
               "prefill": a.prefill, "rows": rows, "after_over_before_per_round": [round(r, 3) for r in ratios],
               "after_over_before_median": round(statistics.median(ratios), 3), "max_abs_logit_diff": max_diff}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    md = (f"# Tied LM head in decode: transposed copy vs direct contraction\n\n`{results['command']}`\n\n"
          f"{a.preset} shapes with {cfg.num_layers} layers (hidden {cfg.hidden_size}, vocab {cfg.vocab_size}: "
          f"tied embedding {embed_mb:.0f} MiB in float32), batch 1, one token per step, KV cache {a.capacity} "
          f"slots ({a.prefill} written), backend {results['backend']}; best of {a.reps} steps per round, "
          f"{a.rounds} interleaved rounds. after/before per round: {results['after_over_before_per_round']} "
          f"(median {results['after_over_before_median']}); max |logit difference| {max_diff:.2e}.\n\n"
          + markdown_table(rows))
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
