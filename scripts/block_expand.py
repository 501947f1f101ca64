"""Function-preserving block expansion of a trained jaxtok Decoder (LLaMA Pro, arXiv:2401.02415; the depth
up-scaling idea of SOLAR, arXiv:2312.15166).

The expanded model has ``m`` times the layers: every original block ``i`` is followed by ``m - 1`` copies of itself
whose two output projections (attention ``o_weight_hnd`` and MLP ``down_weight_fd``) are zero. A pre-norm block
computes ``x + o(attn(norm(x)))`` then ``x + down(mlp(norm(x)))``, so with both projections zero the added block
adds exactly 0.0 to the residual stream: the expanded model computes the original function (bit for bit up to
XLA's op ordering) with ``m`` times the block weights. Used here as a model-size stand-in for the memory-bound
speculative benchmark (issue 20): a 4x larger target with the trained target's behaviour, hence the same draft
acceptance.

    python scripts/block_expand.py --src runs/membound2/target --dst runs/membound2/target_x4 -m 4

writes a run directory (``checkpoints/0``, ``config.yaml``, the tokenizer files) that ``load_any`` / ``model.
init_from`` / ``scripts/spec_membound.py --target`` read, after checking on held-out prompts that the expanded
model's logits equal the original's (max |diff| <= --atol) and that greedy ``generate`` gives identical tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]

ZEROED = ("attn.o_weight_hnd", "mlp.down_weight_fd")  # the block's writes into the residual stream


def expand(model, m: int, *, seed: int = 0):
    """A Decoder with ``m * num_layers`` blocks: block ``i`` of ``model`` at position ``i * m``, followed by
    ``m - 1`` copies of it with zero output projections (identity blocks). Embedding, final norm and LM head are
    shared values (copied). The unscanned layer layout is required (``scan_layers: false``)."""
    from jaxtok.models.transformer import Decoder

    cfg = model.cfg
    if cfg.scan_layers:
        raise ValueError("expand() needs the unscanned layout (scan_layers: false)")
    if cfg.num_experts:
        raise ValueError("expand() handles dense blocks only")
    new_cfg = dataclasses.replace(cfg, num_layers=cfg.num_layers * m)
    big = nnx.eval_shape(lambda: Decoder(new_cfg, rngs=nnx.Rngs(seed)))
    graphdef, _, rest = nnx.split(big, nnx.Param, ...)
    src = nnx.to_flat_state(nnx.state(model, nnx.Param))
    src = {tuple(str(p) for p in path): v for path, v in src}
    flat = {}
    for path, v in src.items():
        if path[0] != "layers":
            flat[path] = jnp.asarray(v.get_value())
            continue
        i, sub = int(path[1]), path[2:]
        name = ".".join(sub[:-1] if sub[-1] == "value" else sub)
        for j in range(m):
            val = jnp.asarray(v.get_value())
            if j > 0 and name in ZEROED:
                val = jnp.zeros_like(val)
            flat[("layers", str(i * m + j)) + sub] = val
    # fill the abstract state of the big model with these arrays
    big_state = nnx.state(big, nnx.Param)
    leaves = nnx.to_flat_state(big_state)
    missing = []
    new_pairs = []
    for path, var in leaves:
        key = tuple(str(p) for p in path)
        if key not in flat:
            missing.append(key)
            continue
        arr = flat.pop(key)
        if tuple(arr.shape) != tuple(var.get_value().shape):
            raise ValueError(f"{key}: shape {arr.shape} vs {var.get_value().shape}")
        new_pairs.append((path, var.replace(arr)))
    if missing or flat:
        raise ValueError(f"parameter paths do not match: missing {missing[:4]}, unused {list(flat)[:4]}")
    params = nnx.from_flat_state(new_pairs)
    return nnx.merge(graphdef, params, rest)


def check_equal(small, big, prompts: np.ndarray, valid: np.ndarray, *, max_new: int, stop, pad: int) -> dict:
    """Max |logit diff| on the prompts (full forward) and greedy-token identity of ``generate``."""
    from jaxtok.decode.generate import generate
    from jaxtok.sampling import SamplingParams

    toks = jnp.asarray(prompts)
    la = np.asarray(small(toks).logits)
    lb = np.asarray(big(toks).logits)
    mask = np.asarray(valid).astype(bool)
    diff = float(np.abs(la - lb)[mask].max())
    outs = []
    for mdl in (small, big):
        o = generate(mdl, prompts, valid, max_new_tokens=max_new, sampling=SamplingParams(temperature=0.0),
                     stop_tokens=stop, pad_id=pad, rng=jax.random.key(0), return_logprobs=False)
        outs.append((np.asarray(o.tokens), np.asarray(o.valid)))
    same = bool(np.array_equal(outs[0][1], outs[1][1])
                and np.array_equal(np.where(outs[0][1], outs[0][0], -1), np.where(outs[1][1], outs[1][0], -1)))
    return {"max_abs_logit_diff": diff, "greedy_identical": same, "rows": int(prompts.shape[0]),
            "new_tokens": int(outs[0][1].sum())}


def differing_rows(a: tuple, b: tuple) -> np.ndarray:
    """``[B]`` bool: greedy rows whose generated tokens differ, ``a`` and ``b`` being ``(tokens, valid)`` pairs of
    ``[B, T]`` arrays (tokens compared where valid; a different length counts as a difference)."""
    (ta, va), (tb, vb) = a, b
    va, vb = np.asarray(va).astype(bool), np.asarray(vb).astype(bool)
    return np.any(va != vb, axis=1) | np.any(np.where(va, ta, -1) != np.where(vb, tb, -1), axis=1)


def compare_runs(ma, mb, prompts: np.ndarray, valid: np.ndarray, *, max_new: int, stop, pad, tok, show: int) -> dict:
    """How far two models with one tokenizer differ on the prompts (``--compare``, e.g. the source and a fine-tuned
    expansion): max and mean |logit diff| over the prompt positions, the greedy rows that differ, their mean first
    differing position, and up to ``show`` differing rows decoded."""
    from jaxtok.decode.generate import generate
    from jaxtok.sampling import SamplingParams

    toks = jnp.asarray(prompts)
    mask = np.asarray(valid).astype(bool)
    d = np.abs(np.asarray(ma(toks).logits) - np.asarray(mb(toks).logits))[mask]
    outs = []
    for mdl in (ma, mb):
        o = generate(mdl, prompts, valid, max_new_tokens=max_new, sampling=SamplingParams(temperature=0.0),
                     stop_tokens=stop, pad_id=pad, rng=jax.random.key(0), return_logprobs=False)
        outs.append((np.asarray(o.tokens), np.asarray(o.valid)))
    diff = differing_rows(outs[0], outs[1])
    (ta, va), (tb, vb) = outs
    neq = (np.where(va, ta, -1) != np.where(vb, tb, -1)) | (va != vb)
    first = [int(np.argmax(neq[i])) for i in np.flatnonzero(diff)]
    text = lambda t, v, i: tok.decode([int(x) for x in t[i][v[i].astype(bool)]])
    examples = [{"prompt": tok.decode([int(x) for x in prompts[i][mask[i]]]), "a": text(ta, va, i),
                 "b": text(tb, vb, i)} for i in np.flatnonzero(diff)[:show]]
    return {"rows": int(prompts.shape[0]), "rows_differing": int(diff.sum()),
            "mean_first_diff_position": float(np.mean(first)) if first else None,
            "max_abs_logit_diff": float(d.max()), "mean_abs_logit_diff": float(d.mean()),
            "new_tokens_a": int(va.sum()), "new_tokens_b": int(vb.sum()), "examples": examples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="runs/membound2/target")
    ap.add_argument("--dst", default="runs/membound2/target_x4")
    ap.add_argument("-m", type=int, default=4, help="layers multiplier (each block followed by m-1 identity copies)")
    ap.add_argument("--config", default="configs/bench/membound2_target.yaml", help="the source's training config "
                    "(tokenizer and held-out prompts for the check)")
    ap.add_argument("--check-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--atol", type=float, default=1e-5)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--compare", action="store_true", help="expand nothing: compare the existing runs --src and --dst "
                    "(logits, greedy rows that differ) on --check-prompts held-out prompts and print it as JSON")
    ap.add_argument("--compare-json", default=None, help="with --compare: also write the comparison to this file")
    ap.add_argument("--compare-show", type=int, default=4, help="with --compare: differing rows shown decoded")
    args = ap.parse_args(argv)
    import os

    os.chdir(ROOT)
    from jaxtok.bench.speculative import _prompt_batches
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config
    from jaxtok.models import num_params as cfg_params
    num_params = lambda mdl: int(sum(x.size for x in jax.tree.leaves(nnx.state(mdl, nnx.Param))))
    from jaxtok.models.hf import load_any, save_checkpoint
    from jaxtok.tasks.tokenizer import SpecialTokens, load_tokenizer_for

    t0 = time.time()
    small, meta = load_any(args.src, key="--src")
    if args.compare:
        return _compare_main(args, small, t0, argv)
    big = expand(small, args.m)
    n0, n1 = num_params(small), num_params(big)
    assert n1 == cfg_params(big.cfg), (n1, cfg_params(big.cfg))
    print(f"{args.src}: {small.cfg.num_layers} layers, {n0/1e6:.2f}M params -> {big.cfg.num_layers} layers, "
          f"{n1/1e6:.2f}M params ({n1*4/1e6:.0f} MB f32)", flush=True)

    cfg = load_config(args.config, [f"model.init_from={args.src}", f"decode.batch_size={args.check_prompts}"])
    tok = load_tokenizer_for(cfg)
    sp = SpecialTokens.of(tok)
    task = make_task_from_config(cfg.data)
    batches, _ = _prompt_batches(task, "eval", tok, cfg, args.check_prompts)
    p, v = batches[0]
    check = check_equal(small, big, np.asarray(p), np.asarray(v), max_new=args.max_new_tokens, stop=sp.eos_ids,
                        pad=sp.pad)
    print(f"check: {check}", flush=True)
    if check["max_abs_logit_diff"] > args.atol or not check["greedy_identical"]:
        print("expanded model differs from the source: not saved", file=sys.stderr)
        return 1

    dst = Path(args.dst)
    if dst.exists():
        if not args.overwrite:
            raise FileExistsError(f"{dst} exists (use --overwrite)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    save_checkpoint(big, str(dst), meta={"block_expansion": {"source": args.src, "source_step": meta.get("step"),
                                                             "m": args.m, "zeroed": list(ZEROED)},
                                         "step": 0})
    src = Path(args.src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    if (src / "config.yaml").is_file():
        text = (src / "config.yaml").read_text()
        (dst / "config.yaml").write_text(
            f"# block expansion of {args.src} (x{args.m} layers, zero o/down in the added blocks) by "
            f"scripts/block_expand.py;\n# model.init_from below is the SOURCE run, kept from its config: load the "
            f"weights of this directory with model.init_from={args.dst}\n" + text)
    info = {"source": args.src, "source_step": meta.get("step"), "m": args.m, "layers": big.cfg.num_layers,
            "params": n1, "source_params": n0, "mb_f32": n1 * 4 / 1e6, "check": check,
            "seconds": time.time() - t0, "command": "python scripts/block_expand.py " + " ".join(argv or sys.argv[1:])}
    (dst / "expansion.json").write_text(json.dumps(info, indent=2) + "\n")
    # reload and re-check one forward from disk
    again, _ = load_any(str(dst), key="--dst")
    d2 = float(np.abs(np.asarray(again(jnp.asarray(p)).logits) - np.asarray(small(jnp.asarray(p)).logits))[
        np.asarray(v).astype(bool)].max())
    print(f"saved {dst} ({time.time() - t0:.0f}s); reloaded max |logit diff| {d2:.2e}", flush=True)
    return 0 if d2 <= args.atol else 1


def _compare_main(args, ma, t0: float, argv) -> int:
    """``--compare``: load ``--dst``, compare it with ``ma`` (the ``--src`` model) and print/write the result."""
    from jaxtok.bench.speculative import _prompt_batches
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import SpecialTokens, load_tokenizer_for

    mb, _ = load_any(args.dst, key="--dst")
    cfg = load_config(args.config, [f"model.init_from={args.src}", f"decode.batch_size={args.check_prompts}"])
    tok = load_tokenizer_for(cfg)
    sp = SpecialTokens.of(tok)
    batches, meta = _prompt_batches(make_task_from_config(cfg.data), "eval", tok, cfg, args.check_prompts)
    p, v = batches[0]
    n = meta[0][1]
    res = compare_runs(ma, mb, np.asarray(p)[:n], np.asarray(v)[:n], max_new=args.max_new_tokens, stop=sp.eos_ids,
                       pad=sp.pad, tok=tok, show=args.compare_show)
    res = {"a": args.src, "b": args.dst, "layers_a": ma.cfg.num_layers, "layers_b": mb.cfg.num_layers, **res,
           "seconds": time.time() - t0, "command": "python scripts/block_expand.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(res, indent=2), flush=True)
    if args.compare_json:
        Path(args.compare_json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
