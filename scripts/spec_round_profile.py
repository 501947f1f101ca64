"""Where one speculative round's time goes (issue 20 item 2), on the memory-bound pair at a given batch size.

Times, interleaved (best of ``--repeats``), the pieces of one round of ``decode/speculative.py``'s loop at the shapes
it runs with: the drafter's re-feed forward (the whole window W = γ + 1, as before, and the 2 tokens it re-feeds
now), one drafter step, the whole drafting phase (``ModelDrafter.draft``: re-feed + γ - 1 steps, its while loop),
the target's verification forward on γ + 1 tokens, the target's AR step, the greedy acceptance (argmax, leading
matches, emitted tokens, buffer writes) and the cache rollback; then whole greedy calls of ``speculative_generate``
with the old re-feed (``refeed_width`` patched to return W) and the new one, ``batch_gamma`` at γ* = 0 (AR rounds
inside the loop: no drafts, a 1-position verification), and AR ``generate``, as ms per round (per step for AR)
after subtracting a 1-token call (prefill and first token).

    python scripts/spec_round_profile.py --batch 1 --gammas 4,6 --json runs/overhead/profile_b1.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))

from jaxtok.bench.speculative import best_ms  # noqa: E402


def piece_calls(target, draft, b: int, p: int, n_new: int, g: int) -> dict:
    """Zero-argument jitted calls for each piece of a round at batch ``b``, prompt ``p``, γ = ``g``."""
    spec = importlib.import_module("jaxtok.decode.speculative")
    from jaxtok import sampling
    from jaxtok.decode import draft_policies as dp
    from jaxtok.decode import rows
    from jaxtok.models import KVCache

    w, s = spec.seq_layout(b, p, n_new, g)
    fill = w + p + n_new // 2  # a half-filled cache
    tg, ts = nnx.split(target)
    dg, ds = nnx.split(draft)

    def filled(model):
        cache = KVCache.init(model.cfg, b, s)
        toks = jnp.full((b, fill), 5, jnp.int32)
        return jax.jit(lambda c: model(toks, cache=c, return_logits=False).cache)(cache)

    tcache, dcache = filled(target), filled(draft)
    seq = jnp.full((b, s), 5, jnp.int32)
    seq_valid = jnp.ones((b, s), bool)
    n = jnp.full((b,), fill + 1, jnp.int32)

    def fwd(graphdef, state, cache, width, last_only):
        tok = jnp.full((b, width), 5, jnp.int32)
        at = jnp.full((b, 1), width - 1, jnp.int32) if last_only else None
        f = jax.jit(lambda st, c: nnx.merge(graphdef, st)(tok, cache=c.rollback(c.lengths - 1), logits_at=at).logits)
        return lambda: f(state, cache)

    drafter = spec.ModelDrafter.of(draft)
    policy = dp.build_policy("fixed")
    params = {"temperature": jnp.zeros((b,), jnp.float32)}

    def drafting(refeed):
        def run(dstate, key):
            ctx = spec.DraftContext(seq=seq, seq_valid=seq_valid, n=n, live=jnp.ones((b,), bool),
                                    gamma=jnp.full((b,), g, jnp.int32), params=params, key=key, gamma_max=g,
                                    window=w, pad_id=0, refeed=refeed)
            tok = rows.ALL_GREEDY.set(True)
            try:
                d = drafter.draft(dstate, ctx, policy)
            finally:
                rows.ALL_GREEDY.reset(tok)
            return d.tokens, d.state
        f = jax.jit(run)
        return lambda: f(dcache, jax.random.key(0))

    vocab = target.cfg.vocab_size
    t_logits = jax.random.normal(jax.random.key(1), (b, g + 1, vocab))
    d_tokens = jnp.argmax(t_logits[:, :g], -1).astype(jnp.int32)

    @jax.jit
    def accept(t_logits, d_tokens, seq, seq_valid, n):
        a = rows.greedy_tokens(t_logits)  # [B, γ+1]
        nacc = sampling.count_leading_true(d_tokens == a[:, :g])
        emitted = sampling._emit(d_tokens, nacc, jnp.take_along_axis(a, nacc[:, None], axis=1)[:, 0], 0)
        keep = jnp.arange(g + 1)[None, :] < (nacc + 1)[:, None]
        return rows.rows_write(seq, jnp.where(keep, emitted, 0), n), rows.rows_write(seq_valid, keep, n), nacc

    rollback = jax.jit(lambda c, m: c.rollback(m))
    return {
        "target_step": fwd(tg, ts, tcache, 1, False),
        f"target_verify_{g + 1}": fwd(tg, ts, tcache, g + 1, False),
        "draft_step": fwd(dg, ds, dcache, 1, False),
        f"draft_refeed_{w}": fwd(dg, ds, dcache, w, True),
        "draft_refeed_2": fwd(dg, ds, dcache, 2, True),
        f"drafting_refeed_{w}": drafting(w),
        "drafting_refeed_2": drafting(2),
        "accept_greedy": lambda: accept(t_logits, d_tokens, seq, seq_valid, n),
        "cache_rollback": lambda: rollback(tcache, n - 1),
    }


def loop_calls(target, draft, prompt, valid, n_new: int, g: int, stop) -> dict:
    """Whole greedy calls: speculative with the old re-feed (W) and the new one (2), AR; each also with 1 token."""
    spec = importlib.import_module("jaxtok.decode.speculative")
    from jaxtok.decode.generate import generate
    from jaxtok.sampling import GREEDY

    drafter = spec.ModelDrafter.of(draft)
    key = jax.random.key(0)
    orig_width, new_jit = spec.refeed_width, spec._speculative_jit
    inner = new_jit.__wrapped__

    def old_fn(*a, **k):  # a distinct function: its own jit caches, traced with the old width
        return inner(*a, **k)

    old_jit = jax.jit(old_fn, static_argnames=("target_graphdef", "max_new_tokens", "gamma_max", "stop_tokens",
                                               "pad_id", "poison", "greedy", "mesh", "return_logprobs"))

    def run_spec(refeed_all, n):
        def call():
            if refeed_all:
                spec.refeed_width, spec._speculative_jit = (lambda w, own_drafts_verified=True: w), old_jit
            try:
                return spec.speculative_generate(target, drafter, prompt, valid, max_new_tokens=n, draft_len=g,
                                                 sampling=GREEDY, stop_tokens=stop, rng=key)
            finally:
                spec.refeed_width, spec._speculative_jit = orig_width, new_jit
        return call

    def run_ar(n):
        return lambda: generate(target, prompt, valid, max_new_tokens=n, sampling=GREEDY, stop_tokens=stop, rng=key,
                                return_logprobs=False)

    from jaxtok.decode import draft_policies as dp

    ar_policy = dp.BatchGamma(dp.BatchGammaArgs(acceptance=(0.0,)))  # γ* = 0: AR rounds inside the loop

    def run_gamma0(n):
        return lambda: spec.speculative_generate(target, drafter, prompt, valid, max_new_tokens=n, draft_len=g,
                                                 policy=ar_policy, sampling=GREEDY, stop_tokens=stop, rng=key)

    return {"spec_gamma0_in_loop": (run_gamma0(n_new), run_gamma0(1)),
            "spec_old_refeed": (run_spec(True, n_new), run_spec(True, 1)),
            "spec_new_refeed": (run_spec(False, n_new), run_spec(False, 1)), "ar": (run_ar(n_new), run_ar(1))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="runs/membound/target")
    ap.add_argument("--draft", default="runs/membound/draft")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gammas", default="4,6")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    from jaxtok.models.hf import load_any

    import os
    os.chdir(ROOT)
    target, _ = load_any(args.target, key="--target")
    draft, _ = load_any(args.draft, key="--draft")
    b, p, n_new = args.batch, args.prompt_len, args.max_new_tokens
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, min(target.cfg.vocab_size, 60), (b, p)).astype(np.int32)
    valid = np.ones((b, p), bool)
    res = {"command": "python scripts/spec_round_profile.py " + " ".join(argv or sys.argv[1:]), "batch": b,
           "gammas": {}}
    for g in [int(x) for x in args.gammas.split(",")]:
        pieces = best_ms(piece_calls(target, draft, b, p, n_new, g), args.repeats)
        loops = loop_calls(target, draft, prompt, valid, n_new, g, stop=())
        flat = {f"{k}/{i}": f for k, (full, one) in loops.items() for i, f in (("full", full), ("one", one))}
        ms = best_ms(flat, max(3, args.repeats // 2))
        outs = {k: full() for k, (full, _) in loops.items()}
        per = {}
        for k, o in outs.items():
            steps = (int(np.max(np.asarray(o.rounds))) if k != "ar" else n_new - 1)  # AR: steps after the first
            per[k] = {"ms_per_round": (ms[f"{k}/full"] - ms[f"{k}/one"]) / max(steps, 1), "rounds": steps}
        same = all(np.array_equal(np.asarray(outs[k].tokens), np.asarray(outs["ar"].tokens))
                   for k in outs if k != "ar")
        res["gammas"][str(g)] = {"pieces_ms": pieces, "loop": per, "identical_to_ar": same}
        print(json.dumps({g: res["gammas"][str(g)]}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
