"""``jaxtok decode``: decode held-out prompts of the configured task with a trained model.

Writes ``results.json`` (exact match, generated tokens, tokens/s — steady state: the first batch is run once
untimed to compile, ``compile_s`` — and the method's own metrics) and ``results.md`` (sample completions) into
the run directory, and prints a table. Methods (one builder each in :data:`METHODS`, same signature, so a new
method is one entry):

- ``greedy`` / ``sample``: autoregressive, :func:`jaxtok.decode.generate`; ``decode.policy: lenvm`` steers the
  completion length with a trained LenVM (:mod:`jaxtok.decode.length_control`);
- ``speculative``: :func:`jaxtok.decode.speculative.speculative_generate` with the target ``model.init_from`` and
  the drafter ``decode.draft_init_from`` (an AR run -> model drafter; a masked-diffusion run -> DEER; unset ->
  n-gram prompt lookup), draft cap ``decode.draft_len`` and the draft-length policy ``decode.policy``.
  Two ``decode.policy`` names select other loops: ``taps`` (route among several drafters, its args name them and
  the inner policy) and ``ead`` (lossy small/large switching: small = ``decode.draft_init_from``);
- ``diffusion``: :func:`jaxtok.decode.diffusion.run_diffusion_decode` — masked-diffusion sampling of a diffusion
  LM with the commit policy ``decode.policy`` (default ``llada``) and ``decode.policy_args``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from jaxtok import mesh as mesh_lib
from jaxtok.data import make_task_from_config, pad_prompt_batch, prompt_dataset
from jaxtok.metrics import write_results
from jaxtok.registry import DRAFT_POLICIES, LOGIT_GUIDES, ConfigError
from jaxtok.tasks.tokenizer import SpecialTokens, decode, load_tokenizer_for

from . import constrained  # noqa: F401  (registers decode.policy 'lave', a host loop)
from .generate import generate
from .length_control import length_error_sums
from .speculative import (
    DeerDrafter, ModelDrafter, NgramDrafter, RoutedDrafter, ead_generate, speculative_generate,
)


def _load_model(path: str, mesh, key: str, dtype: str = "float32", diffusion: bool = False):
    """The model at ``path`` (a jaxtok run directory or an HF directory; config key ``key`` in errors)."""
    from jaxtok.models.hf import load_any

    model, _ = load_any(path, key=key, mesh=mesh, dtype=dtype, diffusion=diffusion)
    return model


def _model_and_tokenizer(cfg, mesh):
    """Weights from ``model.init_from`` (a jaxtok run/checkpoint) or ``model.hf_path``, and their tokenizer."""
    if cfg.model.init_from:
        model = _load_model(cfg.model.init_from, mesh, "model.init_from", cfg.model.dtype,
                            diffusion=cfg.decode.method == "diffusion")
    elif cfg.model.hf_path:
        model = _load_model(cfg.model.hf_path, mesh, "model.hf_path", cfg.model.dtype,
                            diffusion=cfg.decode.method == "diffusion")
    else:
        raise ConfigError("decode needs trained weights: set model.init_from=<run dir> or model.hf_path=<HF dir>")
    return model, load_tokenizer_for(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Methods: build(cfg, model, mesh) -> step(prompt, valid, key, special_tokens, real_rows) -> (tokens [B, N],
# valid [B, N], stats: dict of per-batch sums over the first real_rows rows)
# ----------------------------------------------------------------------------------------------------------------


def _sampling(cfg, temperature):
    d = cfg.decode
    return dict(max_new_tokens=d.max_new_tokens, temperature=temperature, top_k=d.top_k, top_p=d.top_p, min_p=d.min_p)


def _build_ar(cfg, model, mesh, tok) -> Callable:
    """AR decoding; ``decode.policy`` names a logit guide (``lenvm``: length control, which also reports the
    mean completion length and, with a target, the mean |length − target| and the share over it; ``grammar``: a
    token-level grammar mask, which also reports the rows that stopped inside the grammar)."""
    d = cfg.decode
    temperature = 0.0 if d.method == "greedy" else d.temperature
    guide, args = None, None
    if d.policy is not None:
        entry = LOGIT_GUIDES.entry(d.policy, "decode.policy")
        args = LOGIT_GUIDES.parse_args(d.policy, d.policy_args, "decode.policy_args")
        guide = entry.fn(args, mesh=mesh, tokenizer=tok, vocab_size=model.cfg.vocab_size)
        if getattr(guide, "host_session", False):  # grammar matchers on the host: decode on one device
            graphdef, state = nnx.split(model)
            model, mesh = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0])), None

    def step(prompt, valid, key, sp, b):
        out = generate(model, prompt, valid, rng=key, stop_tokens=sp.eos_ids, pad_id=sp.pad, mesh=mesh, guide=guide,
                       **_sampling(cfg, temperature))
        stats = {"target_forwards": int(out.num_forwards)}
        if guide is not None:
            stats["rows"] = b
            if getattr(guide, "host_session", False):  # grammar matchers on the host: surface the engine's error
                jax.block_until_ready(out.tokens)
                guide.close()
                stats["grammar_stopped"] = int(np.asarray(out.done)[:b].sum())
            if getattr(args, "mode", None) in ("target", "budget"):  # a length target to score against
                stats.update(length_error_sums(np.asarray(out.lengths)[:b], args.target_length))
        return out.tokens, out.valid, stats

    return step


def _drafter_from(path, mesh, vocab_size: int, max_ngram: int = 3, key: str = "decode.draft_init_from"):
    if path is None:
        return NgramDrafter(vocab_size=vocab_size, max_ngram=max_ngram)
    m = _load_model(path, mesh, key)
    return DeerDrafter.of(m) if m.cfg.is_diffusion else ModelDrafter.of(m)


def _spec_stats(out, b: int) -> dict:
    """Per-batch sums (only the batch's real rows for per-row arrays)."""
    return {
        "target_forwards": int(out.target_forwards), "draft_forwards": int(out.draft_forwards),
        "rounds": int(np.sum(np.asarray(out.rounds)[:b])), "accepted": int(np.sum(np.asarray(out.accepted)[:b])),
        "drafted": int(np.sum(np.asarray(out.drafted)[:b])),
        "row_forwards": int(np.sum(np.asarray(out.rounds)[:b] + 1)),
        "accepted_by_position": np.asarray(out.accepted_by_position)[:b].sum(0).astype(np.int64),
        "drafted_by_position": np.asarray(out.drafted_by_position)[:b].sum(0).astype(np.int64),
        "route_counts": np.asarray(out.route_counts)[:b].sum(0).astype(np.int64),
    }


def _build_speculative(cfg, model, mesh, tok) -> Callable:
    d = cfg.decode
    name = d.policy or "fixed"
    entry = DRAFT_POLICIES.entry(name, "decode.policy")
    args = DRAFT_POLICIES.parse_args(name, d.policy_args, "decode.policy_args")
    vocab = model.cfg.vocab_size
    if entry.meta.get("loop") == "ead":
        if d.draft_init_from is None:
            raise ConfigError("decode.policy='ead' needs decode.draft_init_from=<small model run dir>")
        small = _load_model(d.draft_init_from, mesh, "decode.draft_init_from")

        def ead_step(prompt, valid, key, sp, b):
            out = ead_generate(small, model, prompt, valid, rng=key, stop_tokens=sp.eos_ids, pad_id=sp.pad, args=args,
                               **_sampling(cfg, d.temperature))
            return out.tokens, out.valid, {"large_tokens": int(np.sum(np.asarray(out.from_large)[:b])),
                                           "small_forwards": int(out.small_forwards),
                                           "large_forwards": int(out.large_forwards)}

        return ead_step
    if entry.meta.get("routed"):
        paths = ([d.draft_init_from] if d.draft_init_from else []) + list(args.drafters)
        keys = (["decode.draft_init_from"] if d.draft_init_from else []) + [
            f"decode.policy_args.drafters[{i}]" for i in range(len(args.drafters))]
        drafters = [_drafter_from(p, mesh, vocab, key=k) for p, k in zip(paths, keys)]
        if args.ngram:
            drafters.append(NgramDrafter(vocab_size=vocab, max_ngram=args.max_ngram))
        if len(drafters) < 2:
            raise ConfigError(f"decode.policy='taps' needs at least two drafters, got {len(drafters)} "
                              f"(decode.draft_init_from, decode.policy_args.drafters, decode.policy_args.ngram)")
        drafter = RoutedDrafter(tuple(drafters))
    else:
        drafter = _drafter_from(d.draft_init_from, mesh, vocab)
    hidden = getattr(drafter, "cfg", None)
    policy = entry.fn(args, hidden_size=hidden.hidden_size if hidden is not None else None)

    def spec_step(prompt, valid, key, sp, b):
        out = speculative_generate(model, drafter, prompt, valid, rng=key, stop_tokens=sp.eos_ids, pad_id=sp.pad,
                                   draft_len=d.draft_len, policy=policy, **_sampling(cfg, d.temperature))
        return out.tokens, out.valid, _spec_stats(out, b)

    return spec_step


METHODS = {"greedy": _build_ar, "sample": _build_ar, "speculative": _build_speculative}
AVAILABLE_METHODS = (*METHODS, "diffusion")


def _summary(method_stats: dict, n_tok: int) -> dict:
    """Derived metrics of the summed per-batch stats."""
    s = dict(method_stats)
    out = {}
    if "row_forwards" in s:
        out["tokens_per_target_forward"] = n_tok / max(s["row_forwards"], 1)
        out["mean_accepted_length"] = s["accepted"] / max(s["rounds"], 1)
        out["acceptance_rate"] = s["accepted"] / max(s["drafted"], 1)
        dr = s.pop("drafted_by_position")
        out["acceptance_rate_by_position"] = [float(a / x) if x else None
                                              for a, x in zip(s.pop("accepted_by_position"), dr)]
        out["route_counts"] = s.pop("route_counts").tolist()
    if "large_tokens" in s:
        out["large_share"] = s["large_tokens"] / max(n_tok, 1)
    if "rows" in s:  # a logit guide (length control, grammar)
        rows = max(s.pop("rows"), 1)
        out["mean_length"] = n_tok / rows
        if "grammar_stopped" in s:  # rows that reached a terminator inside the grammar (their text parses)
            out["grammar_stopped_share"] = s.pop("grammar_stopped") / rows
        if "length_abs_err" in s:
            out["length_abs_err"] = s.pop("length_abs_err") / rows
            out["exact_length_share"] = s.pop("exact_length") / rows
            out["over_target_share"] = s.pop("over_target") / rows
    return {**{k: int(v) for k, v in s.items()}, **out}


def _table(results: dict) -> str:
    cols = ["method", "policy", "exact_match", "tokens_per_s", "tokens_per_target_forward", "mean_accepted_length",
            "large_share", "mean_length", "length_abs_err", "exact_length_share", "over_target_share"]
    cols = [c for c in cols if c in results]

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    return "\n".join([head, sep, "| " + " | ".join(fmt(results[c]) for c in cols) + " |"])


def run_decode(cfg, run_dir: str | Path) -> dict:
    """Decode ``data.num_eval`` held-out prompts; returns exact match, throughput and the method's metrics."""
    if cfg.decode.method not in AVAILABLE_METHODS:
        raise ConfigError(f"decode.method={cfg.decode.method!r}: available {list(AVAILABLE_METHODS)}")
    mesh = mesh_lib.mesh_from_config(cfg.mesh)
    model, tok = _model_and_tokenizer(cfg, mesh)
    if cfg.decode.method == "diffusion" and cfg.decode.policy == "lave":  # LAVE (decode/constrained.py)
        return constrained.run_lave_decode(cfg, model, tok, make_task_from_config(cfg.data), run_dir)
    if cfg.decode.method == "diffusion":
        from .diffusion import run_diffusion_decode

        return run_diffusion_decode(cfg, model, tok, make_task_from_config(cfg.data), run_dir)
    step = METHODS[cfg.decode.method](cfg, model, mesh, tok)
    task = make_task_from_config(cfg.data)
    sp = SpecialTokens.of(tok)
    ds, dropped = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len,
                                 batch_size=cfg.decode.batch_size, num_examples=cfg.data.num_eval,
                                 overlong=cfg.data.overlong)
    rows, hits, total, n_tok, wall = [], 0.0, 0, 0, 0.0
    stats: dict = {}
    compile_s = None
    key = jax.random.key(cfg.train.seed)
    for batch in ds:
        B = batch["prompt"].shape[0]
        prompt, valid = pad_prompt_batch(batch, cfg.decode.batch_size)  # one static shape
        key, sub = jax.random.split(key)
        if compile_s is None:  # compile (and warm up) outside the timed region
            t0 = time.perf_counter()
            jax.block_until_ready(step(prompt, valid, sub, sp, B)[0])
            compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_tokens, out_valid, batch_stats = step(prompt, valid, sub, sp, B)
        tokens = np.asarray(jax.device_get(out_tokens))
        wall += time.perf_counter() - t0
        n_tok += int(np.asarray(jax.device_get(out_valid))[:B].sum())
        for k, v in batch_stats.items():
            stats[k] = stats[k] + v if k in stats else v
        for r in range(B):
            ex = task.example("eval", int(batch["index"][r]))
            text = decode(tok, tokens[r])
            ok = task.reward(text, ex) >= 1.0
            hits += ok
            total += 1
            if len(rows) < 16:
                rows.append({"prompt": ex.prompt, "completion": text, "answer": ex.answer, "correct": bool(ok)})
    total += dropped.count  # over-long prompts are not decoded; they score 0 and stay in the denominator
    results = {"method": cfg.decode.method, "exact_match": hits / max(total, 1), "num_examples": total,
               "overlong_prompts": dropped.count,
               "generated_tokens": n_tok, "tokens_per_s": n_tok / max(wall, 1e-9), "wall_s": wall,
               "compile_s": compile_s}
    if cfg.decode.method in ("greedy", "sample") and cfg.decode.policy:
        results["policy"] = cfg.decode.policy
        results["policy_args"] = dict(cfg.decode.policy_args)
    if cfg.decode.method == "speculative":
        results["policy"] = cfg.decode.policy or "fixed"
        results["draft_len"] = cfg.decode.draft_len
    results.update(_summary(stats, n_tok))
    write_results(run_dir, results, rows, title=f"decode samples (exact match {results['exact_match']:.3f})")
    print(json.dumps(results, indent=2))
    print(_table(results))
    return results
