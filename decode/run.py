"""``jaxtok decode``: decode held-out prompts of the configured task with a trained model.

Writes ``results.json`` (exact match, generated tokens, tokens/s — steady state: the first batch is run once
untimed to compile, ``compile_s`` — and the method's own metrics) and ``results.md`` (sample completions) into
the run directory, and prints a table. ``decode.method`` selects the loop; each method is one registered builder
in :data:`jaxtok.registry.DECODE_METHODS` returning a step for :func:`jaxtok.decode.evaluate.evaluate`:

- ``greedy`` / ``sample``: autoregressive, :func:`jaxtok.decode.generate`; ``decode.policy`` names a logit guide
  (``lenvm``: length control with a trained LenVM, :mod:`jaxtok.decode.length_control`; ``grammar``);
- ``speculative``: :func:`jaxtok.decode.speculative.speculative_generate` with the target ``model.init_from``, the
  drafter ``decode.drafter`` (``single``: ``decode.draft_init_from`` — an AR run -> model drafter, a
  masked-diffusion run -> DEER, unset -> n-gram prompt lookup; ``taps``: routed among several, ``decode.drafter_args``),
  draft cap ``decode.draft_len`` and the draft-length policy ``decode.policy`` (default ``fixed``);
- ``ead``: lossy small/large switching (small = ``decode.draft_init_from``), arguments ``decode.policy_args``;
- ``lud``: lexical unit decoding, k tokens per forward from placeholders (:mod:`jaxtok.decode.lud`), arguments
  ``decode.policy_args`` (:class:`~jaxtok.decode.lud.LUDArgs`);
- ``diffusion``: masked-diffusion sampling with the commit policy ``decode.policy`` (default ``llada``);
- ``lave``: grammar-constrained masked diffusion (a host loop, :mod:`jaxtok.decode.constrained`), arguments
  ``decode.policy_args``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from jaxtok import mesh as mesh_lib
from jaxtok.metrics import write_results
from jaxtok.registry import DECODE_METHODS, DRAFTERS, ConfigError
from jaxtok.sampling import SamplingParams
from jaxtok.tasks.tokenizer import load_tokenizer_for

from .constrained import LaveArgs, grammar_for
from .diffusion import policy_and_heads
from .draft_policies import EADArgs, TAPSArgs
from .evaluate import Step, ar_step, diffusion_step, ead_step, evaluate, lave_step, lud_step, speculative_step
from .lud import LUDArgs
from .speculative import DeerDrafter, ModelDrafter, NgramDrafter, RoutedDrafter


def _load_model(path: str, mesh, key: str, dtype: str = "float32", diffusion: bool = False):
    """The model at ``path`` (a jaxtok run directory or an HF directory; config key ``key`` in errors)."""
    from jaxtok.models.hf import load_any

    model, _ = load_any(path, key=key, mesh=mesh, dtype=dtype, diffusion=diffusion)
    return model


def _model_and_tokenizer(cfg, mesh, diffusion: bool):
    """Weights from ``model.init_from`` (a jaxtok run/checkpoint) or ``model.hf_path``, and their tokenizer."""
    if cfg.model.init_from:
        model = _load_model(cfg.model.init_from, mesh, "model.init_from", cfg.model.dtype, diffusion=diffusion)
    elif cfg.model.hf_path:
        model = _load_model(cfg.model.hf_path, mesh, "model.hf_path", cfg.model.dtype, diffusion=diffusion)
    else:
        raise ConfigError("decode needs trained weights: set model.init_from=<run dir> or model.hf_path=<HF dir>")
    return model, load_tokenizer_for(cfg)


def _sampling(d, greedy: bool = False) -> dict:
    """``max_new_tokens`` and the :class:`~jaxtok.sampling.SamplingParams` of ``decode`` (greedy: temperature 0)."""
    return dict(max_new_tokens=d.max_new_tokens, sampling=SamplingParams(
        temperature=0.0 if greedy else d.temperature, top_k=d.top_k, top_p=d.top_p, min_p=d.min_p))


# ----------------------------------------------------------------------------------------------------------------
# Drafters (decode.drafter): build(args, cfg, mesh, vocab_size) -> Drafter
# ----------------------------------------------------------------------------------------------------------------


def _drafter_from(path, mesh, vocab_size: int, max_ngram: int = 3, key: str = "decode.draft_init_from"):
    if path is None:
        return NgramDrafter(vocab_size=vocab_size, max_ngram=max_ngram)
    m = _load_model(path, mesh, key)
    return DeerDrafter.of(m) if m.cfg.is_diffusion else ModelDrafter.of(m)


@DRAFTERS.register("single")
def single_drafter(args, cfg, mesh, vocab_size: int):
    """``decode.draft_init_from``: an AR run -> :class:`ModelDrafter`, a masked-diffusion run -> DEER, unset ->
    n-gram prompt lookup."""
    return _drafter_from(cfg.decode.draft_init_from, mesh, vocab_size)


@DRAFTERS.register("taps", TAPSArgs)
def taps_drafter(args: TAPSArgs, cfg, mesh, vocab_size: int):
    """TAPS (§A5): a :class:`RoutedDrafter` over ``decode.draft_init_from`` (if set), ``args.drafters`` and, with
    ``args.ngram``, an n-gram drafter; at least two."""
    d = cfg.decode
    paths = ([d.draft_init_from] if d.draft_init_from else []) + list(args.drafters)
    keys = (["decode.draft_init_from"] if d.draft_init_from else []) + [
        f"decode.drafter_args.drafters[{i}]" for i in range(len(args.drafters))]
    drafters = [_drafter_from(p, mesh, vocab_size, key=k) for p, k in zip(paths, keys)]
    if args.ngram:
        drafters.append(NgramDrafter(vocab_size=vocab_size, max_ngram=args.max_ngram))
    if len(drafters) < 2:
        raise ConfigError(f"decode.drafter='taps' needs at least two drafters, got {len(drafters)} "
                          f"(decode.draft_init_from, decode.drafter_args.drafters, decode.drafter_args.ngram)")
    return RoutedDrafter(tuple(drafters))


# ----------------------------------------------------------------------------------------------------------------
# Methods (decode.method): build(cfg, plan: DecodePlan, model, tok, *, mesh, task) -> Step
# ----------------------------------------------------------------------------------------------------------------


@DECODE_METHODS.register("greedy", policy="guide")
@DECODE_METHODS.register("sample", policy="guide")
def build_ar(cfg, plan, model, tok, *, mesh, task) -> Step:
    """AR decoding; ``decode.policy`` names a logit guide (module docstring)."""
    guide = None
    if plan.policy is not None:
        guide = plan.policy.fn(plan.policy_args, mesh=mesh, tokenizer=tok, vocab_size=model.cfg.vocab_size)
    return ar_step(model, tok, guide=guide, guide_args=plan.policy_args, mesh=mesh,
                   **_sampling(cfg.decode, greedy=cfg.decode.method == "greedy"))


@DECODE_METHODS.register("speculative", policy="draft", default_policy="fixed", drafter=True)
def build_speculative(cfg, plan, model, tok, *, mesh, task) -> Step:
    """Draft-and-verify with the drafter ``decode.drafter`` and the draft-length policy ``decode.policy``."""
    drafter = plan.drafter.fn(plan.drafter_args, cfg, mesh, model.cfg.vocab_size)
    hidden = getattr(drafter, "cfg", None)
    policy = plan.policy.fn(plan.policy_args, hidden_size=hidden.hidden_size if hidden is not None else None)
    return speculative_step(model, drafter, policy, tok, draft_len=cfg.decode.draft_len, **_sampling(cfg.decode))


@DECODE_METHODS.register("ead", EADArgs)
def build_ead(cfg, plan, model, tok, *, mesh, task) -> Step:
    """EAD: the small model ``decode.draft_init_from`` and the large ``model`` with :class:`EADArgs`."""
    small = _load_model(cfg.decode.draft_init_from, mesh, "decode.draft_init_from")
    return ead_step(small, model, tok, args=plan.policy_args, **_sampling(cfg.decode))


@DECODE_METHODS.register("lud", LUDArgs)
def build_lud(cfg, plan, model, tok, *, mesh, task) -> Step:
    """LUD (§A8): k tokens per forward from placeholders, the confident prefix accepted (:class:`LUDArgs`); the
    model must be fine-tuned with objective ``lud``."""
    return lud_step(model, tok, args=plan.policy_args, **_sampling(cfg.decode))


@DECODE_METHODS.register("diffusion", policy="commit", default_policy="llada", diffusion=True)
def build_diffusion(cfg, plan, model, tok, *, mesh, task) -> Step:
    """Masked-diffusion sampling with the commit policy ``decode.policy`` (learned heads from its ``head_path``)."""
    policy, heads = policy_and_heads(plan.policy.name, plan.policy_args)
    return diffusion_step(model, tok, gen_len=cfg.decode.max_new_tokens, policy=policy, heads=heads,
                          temperature=float(cfg.decode.temperature), attention=cfg.model.attention,
                          block_size=cfg.model.block_size)


@DECODE_METHODS.register("lave", LaveArgs, diffusion=True)
def build_lave(cfg, plan, model, tok, *, mesh, task) -> Step:
    """LAVE under the grammar ``args.grammar`` of ``task`` (:class:`LaveArgs`)."""
    from .diffusion import stop_ids_of

    args = plan.policy_args
    grammar = grammar_for(args.grammar, task, tok, stop_ids_of(tok))
    return lave_step(model, tok, grammar, args=args, gen_len=cfg.decode.max_new_tokens,
                     temperature=float(cfg.decode.temperature), attention=cfg.model.attention,
                     block_size=cfg.model.block_size)


# ----------------------------------------------------------------------------------------------------------------
# Results of each method (keys as before the one loop)
# ----------------------------------------------------------------------------------------------------------------

_AR_KEYS = ("exact_match", "num_examples", "overlong_prompts", "generated_tokens", "tokens_per_s", "wall_s",
            "compile_s")
_DIFFUSION_KEYS = ("exact_match", "mean_nfe", "tokens_per_nfe", "mean_length", "wall_s", "tokens_per_s",
                   "compile_s", "num_examples", "overlong_prompts", "format_ok")
_LAVE_KEYS = ("exact_match", "format_ok", "grammar_ok", "mean_nfe", "mean_length", "verifies_per_row",
              "rejections_per_row", "recoveries_per_row", "wall_s", "forward_s", "host_s", "num_examples")
_SCORING = ("exact_match", "format_ok", "num_examples", "overlong_prompts", "decoded", "generated_tokens",
            "tokens_per_s", "wall_s", "compile_s")


def _results(cfg, plan, metrics: dict) -> tuple[dict, str]:
    """``(results.json mapping, results.md title)`` of one method's :func:`evaluate` metrics."""
    d = cfg.decode
    pick = lambda keys: {k: metrics[k] for k in keys if k in metrics}  # noqa: E731
    if d.method == "diffusion":
        results = dict(policy=plan.policy.name, **pick(_DIFFUSION_KEYS), method="diffusion",
                       policy_args=dataclasses.asdict(plan.policy_args), gen_len=d.max_new_tokens)
        return results, (f"diffusion decode, {plan.policy.name} (exact match {results['exact_match']:.3f}, mean NFE "
                         f"{results['mean_nfe']:.1f})")
    if d.method == "lave":
        args = plan.policy_args
        results = {"method": "lave", "constrained": args.constrained, "grammar": args.grammar, **pick(_LAVE_KEYS),
                   "gen_len": d.max_new_tokens, "policy_args": dataclasses.asdict(args),
                   "note": "host loop: wall_s = whole calls; forward_s = jitted forwards (first compilation "
                           "included); host_s = proposals, parser and lookahead"}
        return results, (f"LAVE decode (constrained={args.constrained}; exact match {results['exact_match']:.3f}, "
                         f"format_ok {results['format_ok']:.3f})")
    results = {"method": d.method, **pick(_AR_KEYS)}
    if d.method in ("greedy", "sample") and d.policy:
        results["policy"] = d.policy
        results["policy_args"] = dict(d.policy_args)
    if plan.method.spec.policy is None:  # a method with its own arguments (ead, lud)
        results["policy_args"] = dataclasses.asdict(plan.policy_args)
    if d.method == "speculative":
        results["policy"] = plan.policy.name
        results["draft_len"] = d.draft_len
        if d.drafter != "single":
            results["drafter"] = d.drafter
    results.update({k: v for k, v in metrics.items() if k not in _SCORING})
    return results, f"decode samples (exact match {results['exact_match']:.3f})"


def _table(results: dict) -> str:
    cols = ["method", "policy", "exact_match", "tokens_per_s", "tokens_per_target_forward", "tokens_per_forward",
            "mean_accepted_length",
            "large_share", "mean_length", "length_abs_err", "exact_length_share", "over_target_share"]
    cols = [c for c in cols if c in results]

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    return "\n".join([head, sep, "| " + " | ".join(fmt(results[c]) for c in cols) + " |"])


def run_decode(cfg, run_dir: str | Path) -> dict:
    """Decode ``data.num_eval`` held-out prompts with ``decode.method``; returns exact match, throughput and the
    method's metrics. ``cfg``: a Config or its :class:`~jaxtok.plan.RunPlan` (decode section resolved once)."""
    from jaxtok.config import as_plan

    run_plan = as_plan(cfg)
    cfg, plan = run_plan.cfg, run_plan.decode
    mesh = mesh_lib.mesh_from_config(cfg.mesh)
    model, tok = _model_and_tokenizer(cfg, mesh, diffusion=plan.method.spec.diffusion)
    task = run_plan.make_task()
    step = plan.method.fn(cfg, plan, model, tok, mesh=mesh, task=task)
    lave = cfg.decode.method == "lave"  # a host loop: unpadded batches, no separate compile pass
    metrics, rows = evaluate(step, task, tok, prompt_len=cfg.data.prompt_len, batch_size=cfg.decode.batch_size,
                             num_examples=cfg.data.num_eval, overlong=cfg.data.overlong,
                             key=jax.random.key(cfg.train.seed), warmup=not lave, pad=not lave,
                             sample_stats=("nfe",) if plan.method.spec.diffusion else ())
    results, title = _results(cfg, plan, metrics)
    write_results(run_dir, results, rows, title=title)
    print(json.dumps(results, indent=2, default=str))
    if not plan.method.spec.diffusion:
        print(_table(results))
    return results
