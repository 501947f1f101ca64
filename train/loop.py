"""The training loop: config -> tokenizer, data, model, mesh, optimizer, objective -> jitted steps, periodic eval,
metrics, checkpoints, resume.

Run directory::

    <run_dir>/tokenizer.json      the tokenizer, with its tokenizer_config.json / generation_config.json / chat
                                  template when it has them (later stages and ``init_from`` reuse them)
    <run_dir>/metrics.jsonl       one JSON object per logged step / eval: training rows carry the objective's
                                  metrics, ``lr`` (the optimizer schedule's rate at that step), ``step_time_s``
                                  and ``tokens_per_s`` (since the previous row, without the first, compiling step
                                  and evaluations; the first row after it also has ``compile_s``), rollout rows
                                  ``rollout/*`` (rewards, lengths, sampler mismatch)
    <run_dir>/tensorboard/        with ``run.tensorboard``: the same scalars as TensorBoard event files
                                  (:mod:`jaxtok.observe`; ``run.wandb`` sends them to Weights & Biases)
    <run_dir>/profile/            with ``run.profile_steps: [first, last]``: a jax.profiler trace of those steps
    <run_dir>/checkpoints/<step>/ params, optimizer state, data-iterator state, RNG, meta (model config)
    <run_dir>/summary.json        the dict returned by :func:`train`

Logging (``jaxtok`` logger; the CLI prints INFO and above, ``--log-level``): the phases ``build``, ``compile`` (the
first step's time), ``train``, ``eval``, and one start-up summary (model and parameter count, mesh and devices,
data, objective, steps, run directory, resumed step). The progress bar starts after the compiling step, so its
rate and ETA exclude compilation; with ``run.progress=false`` each metrics row is also a log line with the ETA.

A run directory that already holds a checkpoint is resumed from its last good one (``run.resume``; damaged newer
steps are moved to ``checkpoints-damaged/`` with a warning, and ``metrics.jsonl`` gets an ``{"event": "resume",
"from_step": k}`` record, so records of steps after ``k`` written before it were redone); a finished run (last
checkpoint at ``train.steps`` and ``summary.json`` written) is not trained, evaluated or rewritten again, which is
what lets recipe stages and the model zoo be cached. While training, ``train.lock`` in the run directory keeps a
second training out (:mod:`jaxtok.rundir`); ``run.resume=false`` into a directory holding a run needs
``run.overwrite=true``. ``model.init_from`` points at an earlier run directory: its parameters and tokenizer seed
this run.

The loop runs a :class:`~jaxtok.plan.RunPlan` (``train`` resolves a Config itself,
:func:`jaxtok.config.validate_names`): objectives are ``fn(model, batch, rng, args, **frozen) -> (loss_sum, count,
aux)`` from ``OBJECTIVES`` with the plan's parsed ``objective_args``; the entry's
:class:`~jaxtok.specs.ObjectiveSpec` says what they eat. ``data="sft"`` (default): SFT batches ``{tokens, positions,
valid, loss_mask}`` of the task.
``data="rollout"``: every ``rollout.inner_epochs`` steps, prompts of the task are completed by the current policy and
scored (:mod:`jaxtok.train.rollout`; APPO tree rollouts with ``rollout.branches``); ``data="documents"``: SFT rows
handed to the objective's own ``collect`` (REFINE); ``data="trajectory"``: the frozen teacher's diffusion
trajectories on privileged prompts, cut into ``(x_t, x_target)`` pairs (:mod:`jaxtok.train.trajectory`, TAD).
``models=("teacher", "reference")`` names the frozen models the step passes (``rollout.teacher_init_from``;
``rollout.reference`` = ``init`` for the initial policy or a run directory); ``self_teacher=fn(args) -> (N, end) |
None``: the ``teacher`` is instead a copy of the student synced every ``N`` steps and dropped from step ``end`` on
(:mod:`jaxtok.train.self_teacher`, TRACE); ``prepare_args=True``: the ``prepare`` hook gets ``args=``;
``collect=fn(policy, batch, *, task, tokenizer, settings, rng, mesh, teacher, prepare, args)`` replaces the default
collector. ``batch_step=True``: the objective reads ``batch["step"] [B]``, the optimizer step being
taken (filled in by the train step, :func:`jaxtok.train.step.make_train_step`; TRACE's λ schedule).
``wrap_model=fn(decoder, args, rngs)`` builds the trained model around the decoder (LenVM's value head); the
checkpoint meta names the wrapper (``wrap_model``/``wrap_args``) and the module class (``module``, read by
:func:`jaxtok.models.value.build_module`) so resume, ``init_from``, :func:`load_model` and the decoders
rebuild the same model. ``group_advantages=fn(batch, args)``: with ``train.micro_batches > 1`` the loop merges
its whole-batch ``advantages``/``row_keep`` into each rollout batch before the step splits it (``True``: the
objective normalises groups itself, and micro-batching is refused, :func:`jaxtok.config.check_micro_batches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx

from jaxtok import checkpoint as ckpt_lib
from jaxtok import mesh as mesh_lib
from jaxtok.observe import ProfileWindow, fmt_count, fmt_duration, open_observer, startup_summary
from jaxtok.models import Decoder, ModelConfig, presets
from jaxtok.tasks.tokenizer import load_tokenizer_for

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
WRAP_META = "wrap_model"  # checkpoint meta: the objective whose ``wrap_model`` built the saved model
WRAP_ARGS_META = "wrap_args"  # checkpoint meta: that objective's arguments (the wrapper's shape options)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def load_model(path: str | Path, *, mesh=None, step: Optional[int] = None, key: str = "model.init_from",
               dtype: str = "float32", param_dtype: Optional[str] = None) -> tuple[Decoder, dict]:
    """A :class:`Decoder` with the parameters at ``path`` (config key ``key``): a run directory or its checkpoint
    directory (default: latest step) or an HF directory (loaded in ``dtype``), placed on ``mesh`` when given.
    Returns ``(model, meta)``; a bad path or unsupported checkpoint is a ConfigError naming ``key``.

    A checkpoint of a wrapped training model is rebuilt as the module its meta names (``module``, e.g. LenVM's
    :class:`~jaxtok.models.value.LengthValueModel`), so every parameter, head included, is restored."""
    from jaxtok.models.hf import load_any

    return load_any(path, key=key, mesh=mesh, step=step, dtype=dtype, param_dtype=param_dtype)


def with_model_execution(model, sec):
    """A :class:`Decoder` with ``model.attention_impl`` / ``scan_layers`` / ``remat`` / ``moe_dispatch`` of ``sec``
    (parameters restacked when ``scan_layers`` differs from the checkpoint's); other modules unchanged."""
    from jaxtok.models.transformer import with_execution

    if not isinstance(model, Decoder):
        return model
    return with_execution(model, attention_impl=sec.attention_impl, scan_layers=sec.scan_layers, remat=sec.remat,
                          moe_dispatch=sec.moe_dispatch)


def build_model(cfg, vocab_size: int, mesh=None) -> Decoder:
    """The model of ``cfg.model``: ``init_from`` a run, an HF checkpoint, or a preset with the tokenizer's vocab."""
    sec = cfg.model
    if sec.init_from:
        model, _ = load_model(sec.init_from, mesh=mesh, dtype=sec.dtype, param_dtype=sec.param_dtype)
        return with_model_execution(model, sec)
    if sec.hf_path:
        model, _ = load_model(sec.hf_path, mesh=mesh, key="model.hf_path", dtype=sec.dtype,
                              param_dtype=sec.param_dtype)
        return with_model_execution(model, sec)
    model_cfg = presets.get(sec.preset, vocab_size=sec.vocab_size or vocab_size, dtype=sec.dtype,
                            param_dtype=sec.param_dtype, attention_impl=sec.attention_impl,
                            scan_layers=sec.scan_layers, remat=sec.remat,
                            **{"moe_dispatch": sec.moe_dispatch, **dict(sec.overrides)})
    if model_cfg.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return Decoder(model_cfg, rngs=nnx.Rngs(cfg.train.seed))


def build_objective(plan) -> Callable:
    """``loss_fn(model, batch, rng, **frozen)`` of the plan's objective with its parsed arguments bound; for a
    mixture-of-experts model it adds ``router_aux_loss_coef`` x the router load-balancing loss (a no-op for dense
    models, :func:`jaxtok.models.moe.with_router_aux_loss`)."""
    from jaxtok.models.moe import with_router_aux_loss

    fn, args = plan.objective.fn, plan.objective_args
    return with_router_aux_loss(functools.partial(fn, args=args) if args is not None else fn)


def build_train_model(plan, vocab_size: int, mesh=None) -> tuple[Decoder, dict]:
    """The model the loop trains and the checkpoint meta that rebuilds it: ``(model, wrap_meta)``.

    :func:`build_model`, then the objective's ``spec.wrap_model(decoder, args, rngs)`` (LenVM's value head)
    with ``nnx.Rngs(train.seed)``. ``model.init_from`` a wrapped run (a LenVM run continued) restores the wrapped
    model as saved, head included, instead of wrapping again. ``wrap_meta`` (``{wrap_model, wrap_args}`` plus the
    module's ``checkpoint_meta()``, or ``{}``) goes into every checkpoint, so a resume, ``init_from`` and
    :func:`load_model` rebuild the same model."""
    from jaxtok.registry import ConfigError

    cfg = plan.cfg
    wrap_meta: dict = {}
    if cfg.model.init_from:
        model, src = load_model(cfg.model.init_from, mesh=mesh, dtype=cfg.model.dtype,
                                param_dtype=cfg.model.param_dtype)
        model = with_model_execution(model, cfg.model)
        if src.get(WRAP_META):
            wrap_meta = {WRAP_META: src[WRAP_META], WRAP_ARGS_META: src.get(WRAP_ARGS_META) or {}}
    else:
        model = build_model(cfg, vocab_size, mesh=mesh)
    if plan.spec.wrap_model is not None:
        if wrap_meta and wrap_meta[WRAP_META] != cfg.objective.name:
            raise ConfigError(f"model.init_from={cfg.model.init_from!r} holds a model wrapped by objective "
                              f"{wrap_meta[WRAP_META]!r}; objective {cfg.objective.name!r} wraps its own: start "
                              f"from an unwrapped run")
        if not wrap_meta:
            model = plan.spec.wrap_model(model, plan.objective_args, nnx.Rngs(cfg.train.seed))
            wrap_meta = {WRAP_META: cfg.objective.name, WRAP_ARGS_META: dict(cfg.objective.args)}
    if hasattr(model, "checkpoint_meta"):  # the module class and options load_model rebuilds (models.value)
        wrap_meta.update(model.checkpoint_meta())
    model = add_lora(cfg, model)
    if cfg.lora.rank:  # informative: checkpoints hold merged weights (a plain model) plus the adapters in "train"
        wrap_meta[LORA_META] = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)}
    return model, wrap_meta


LORA_META = "lora"  # checkpoint meta of a LoRA run: rank, alpha, targets
SAMPLER_ITEM = "spec_sampler"  # checkpoint train item of speculative rollouts with a drafter refresh


def add_lora(cfg, model):
    """``model`` with LoRA adapters of config section ``lora`` attached (:func:`jaxtok.models.lora.apply_lora`,
    ``nnx.Rngs(train.seed + 1)``), or unchanged when ``lora.rank`` is 0. Only the adapters train
    (:func:`jaxtok.train.step.trainable`)."""
    from jaxtok.models import lora as lora_lib
    from jaxtok.registry import ConfigError

    sec = cfg.lora
    if not sec.rank:
        return model
    try:
        return lora_lib.apply_lora(model, lora_lib.LoraConfig(rank=sec.rank, alpha=sec.alpha, targets=sec.targets),
                                   rngs=nnx.Rngs(cfg.train.seed + 1))
    except ValueError as e:
        raise ConfigError(f"lora.targets={list(sec.targets)!r}: {e}") from None


def build_frozen_models(cfg, names, vocab_size: int, mesh=None) -> dict:
    """The frozen models an objective names (``spec.models``): ``teacher`` from ``rollout.teacher_init_from``;
    ``reference`` from ``rollout.reference`` (``init``: the initial policy, rebuilt so a resumed run gets the same
    one; a run directory; ``none``: not passed, the objective sees ``reference=None``)."""
    out = {}
    for name in names:
        if name == "teacher":
            if not cfg.rollout.teacher_init_from:
                raise ValueError(f"objective {cfg.objective.name!r} needs rollout.teacher_init_from")
            out["teacher"], _ = load_model(cfg.rollout.teacher_init_from, mesh=mesh, key="rollout.teacher_init_from",
                                           dtype=cfg.model.dtype)
        elif name == "reference":
            ref = cfg.rollout.reference
            if ref == "init":
                out["reference"] = mesh_lib.shard_model(build_model(cfg, vocab_size, mesh=mesh), mesh)
            elif ref != "none":
                out["reference"], _ = load_model(ref, mesh=mesh, key="rollout.reference", dtype=cfg.model.dtype)
        else:
            raise ValueError(f"objective {cfg.objective.name!r} asks for an unknown frozen model {name!r}; "
                             f"known: teacher, reference")
    return out


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def eval_scores(task, texts, examples, rewards) -> dict:
    """Sums over completions: ``exact_match`` (the task's verifier gives 1), ``reward`` (the configured weighted
    rewards, ``rollout.rewards``, as the RL rollout scores them), ``reward/<name>`` per reward, and ``format_ok``
    when the task has an answer format (``task.has_format``, default True; file datasets without
    ``data.answer_regex`` have none)."""
    from jaxtok.train.rewards import score

    parts = {name: float(np.sum(score(task, texts, examples, {name: 1.0}))) for name in rewards}
    out = {"exact_match": float(sum(task.reward(t, ex) >= 1.0 for t, ex in zip(texts, examples))),
           "reward": sum(float(w) * parts[name] for name, w in rewards.items())}
    if len(rewards) > 1:
        out.update({f"reward/{name}": v for name, v in parts.items()})
    if getattr(task, "has_format", True):
        out["format_ok"] = float(sum(bool(task.format_ok(t)) for t in texts))
    return out


def generation_eval(model: Decoder, task, tok, cfg, *, mesh=None, num_examples: Optional[int] = None) -> dict:
    """Held-out accuracy of greedy completions (decode_methods.md §0.1): :func:`jaxtok.decode.evaluate.evaluate` of
    an :func:`~jaxtok.decode.evaluate.ar_step`, scored by :func:`eval_scores`.

    Every eval example is counted once: ``num_examples`` (default ``data.num_eval``) capped at the eval split's size
    (a small eval file is not wrapped). Returns :func:`eval_scores` means (``exact_match``, ``reward`` with the
    configured ``rollout.rewards``, ``format_ok`` when the task has a format) over all of them, ``num_examples``,
    and ``overlong_prompts``: prompts longer than ``data.prompt_len`` are not generated for, score 0, stay in the
    denominator, and are counted and warned about. The last batch is padded to the decode batch size with copies
    of its first row (ignored), so every call has one static shape.
    """
    from jaxtok.data import capped
    from jaxtok.decode.evaluate import ar_step, evaluate

    n = capped(task, "eval", num_examples or cfg.data.num_eval)
    step = ar_step(model, tok, max_new_tokens=cfg.decode.max_new_tokens, mesh=mesh)  # greedy
    metrics, _ = evaluate(step, task, tok, prompt_len=cfg.data.prompt_len, batch_size=cfg.decode.batch_size,
                          num_examples=n, overlong=cfg.data.overlong, key=jax.random.key(0), warmup=False,
                          num_samples=0, score=lambda texts, examples: eval_scores(task, texts, examples,
                                                                                    cfg.rollout.rewards))
    if metrics["overlong_prompts"]:
        log.warning("held-out eval: %d of %d prompts exceed data.prompt_len=%d; each scores 0 and counts in the "
                    "denominator (eval/overlong_prompts)", metrics["overlong_prompts"], n, cfg.data.prompt_len)
    keys = [*eval_scores(task, [], [], cfg.rollout.rewards), "num_examples", "overlong_prompts"]
    return {k: metrics[k] for k in keys}


def teacher_forced_eval(model: Decoder, task, tok, plan, *, mesh=None) -> dict:
    """Token-weighted SFT loss / token accuracy / exact match on ``train.eval_batches`` held-out batches, with the
    run objective's parsed ``chunk_size`` where it has one (the LM-head chunking of the loss)."""
    from jaxtok.train.objectives.sft import SFTArgs, sft_metrics

    chunk = getattr(plan.objective_args, "chunk_size", None)
    args = SFTArgs() if chunk is None else SFTArgs(chunk_size=chunk)
    return _held_out_metrics(model, functools.partial(sft_metrics, args=args), task, tok, plan.cfg, mesh)


def _held_out_metrics(model, metrics_fn, task, tok, cfg, mesh) -> dict:
    """``metrics_fn(model, batch)`` summed over ``train.eval_batches`` held-out SFT batches (token-weighted)."""
    from jaxtok.data import pad_sft_batch, sft_dataset, split_size
    from jaxtok.train.step import finalize_metrics, make_eval_step, split_model

    finite = split_size(task, "eval") is not None  # a file: each example once, the short last batch padded
    ds, _ = sft_dataset(task, "eval", tok, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                        num_examples=cfg.data.num_eval if finite else max(cfg.data.num_eval, cfg.data.batch_size),
                        seed=0, shuffle=False, num_epochs=1, overlong=cfg.data.overlong, drop_remainder=not finite)
    eval_step = make_eval_step(model, metrics_fn, mesh=mesh)
    _, params, rest = split_model(model)
    pairs = []
    for i, batch in enumerate(ds):
        if i >= cfg.train.eval_batches:
            break
        batch = pad_sft_batch(batch, cfg.data.batch_size)  # padding rows carry no loss_mask tokens
        pairs.append(jax.device_get(eval_step(params, rest, mesh_lib.put_batch(batch, mesh))))
    return finalize_metrics(pairs)


DATA_KINDS = ("sft", "rollout", "documents", "trajectory")  # what the loop feeds objectives (``spec.data``)


def is_diffusion_run(plan) -> bool:
    """Whether the run trains a masked-diffusion LM (evaluated by diffusion decoding, not AR generation):
    ``decode.method=diffusion`` or an objective whose spec says ``eval="diffusion"`` (mdlm, bd3lm, cj_grpo, tad)."""
    return plan.cfg.decode.method == "diffusion" or plan.spec.eval == "diffusion"


def diffusion_eval_settings(plan):
    """``(cfg, policy)`` for :func:`jaxtok.decode.evaluate.evaluate_policy`, the policy resolved once (a
    :class:`~jaxtok.decode.diffusion.CommitPolicy`): ``decode.policy`` (default ``llada``) with ``decode.policy_args``
    (``block_len`` defaults to a block-causal model's ``block_size``); the attention is ``model.attention`` unless
    that is the default ``causal``, then the objective's own (``mdlm``: ``args.attention``, ``bd3lm``:
    ``block_causal`` with ``args.block_size``); an objective trained with ``shift_logits`` decodes shifted unless
    the policy arguments say otherwise. Policies that need learned heads are refused (ConfigError)."""
    from jaxtok.decode.diffusion import commit_policy  # (registers the commit policies)
    from jaxtok.registry import COMMIT_POLICIES, ConfigError

    cfg, args = plan.cfg, plan.objective_args
    policy = cfg.decode.policy or "llada"
    heads = COMMIT_POLICIES.entry(policy, "decode.policy").spec.heads
    if heads:
        raise ConfigError(f"decode.policy={policy!r} needs learned heads {list(heads)}; the training loop's "
                          f"evaluation cannot provide them: choose a policy without heads (e.g. llada, threshold)")
    policy_args = dict(cfg.decode.policy_args)
    if getattr(args, "shift_logits", False):
        policy_args.setdefault("shift_logits", True)
    if cfg.model.attention == "causal":
        attention = getattr(args, "attention", "bidirectional")
        block_size = getattr(args, "block_size", None) if attention == "block_causal" else cfg.model.block_size
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention,
                                                                 block_size=block_size))
    block_len = cfg.model.block_size if (cfg.model.attention == "block_causal" and cfg.model.block_size
                                         and "block_len" not in policy_args) else None
    return cfg, commit_policy(policy, policy_args, block_len=block_len)


def diffusion_eval(model, task, tok, plan) -> dict:
    """Held-out accuracy of diffusion decoding (:func:`jaxtok.decode.evaluate.evaluate_policy` with
    :func:`diffusion_eval_settings`): ``exact_match``, ``format_ok``, ``mean_nfe``, ``tokens_per_nfe``,
    ``mean_length``, ``num_examples``."""
    from jaxtok.decode.evaluate import evaluate_policy

    dcfg, policy = diffusion_eval_settings(plan)
    metrics, _ = evaluate_policy(dcfg, model, tok, task, policy=policy)
    keys = ("exact_match", "format_ok", "mean_nfe", "tokens_per_nfe", "mean_length", "num_examples")
    return {k: metrics[k] for k in keys}


def objective_eval(model, task, tok, plan, *, mesh=None) -> dict:
    """The objective's own loss and aux metrics on ``train.eval_batches`` held-out SFT batches (fixed noise key
    ``train.seed``, so evals of one run are comparable): e.g. the masked-diffusion NELBO per token and masked
    accuracy of ``mdlm``/``bd3lm``."""
    from jaxtok.train.step import aux_parts

    loss_fn = build_objective(plan)

    def metrics_fn(m, batch):
        loss_sum, count, aux = loss_fn(m, batch, jax.random.key(plan.cfg.train.seed))
        return {"loss": (loss_sum, count), **aux_parts(aux, count)}

    return _held_out_metrics(model, metrics_fn, task, tok, plan.cfg, mesh)


def _evaluate_model(model, task, tok, plan, mesh) -> dict:
    """``eval/*`` metrics: AR models get the teacher-forced SFT metrics and greedy generation accuracy; diffusion
    runs (:func:`is_diffusion_run`) get the objective's held-out loss (SFT-data objectives) and diffusion-decoding
    accuracy and NFE. A file task without eval data (no ``data.eval_files``, ``data.eval_fraction=0``) has no
    held-out eval: a warning, and no ``eval/*`` metrics (``jaxtok eval`` refuses instead, :func:`evaluate`)."""
    from jaxtok.data import NO_EVAL, has_split

    if not has_split(task, "eval"):
        log.warning("skipping held-out eval: %s", NO_EVAL)
        return {}
    cfg = plan.cfg
    if is_diffusion_run(plan):
        out = {}
        if plan.spec.data == "sft":
            out.update({f"eval/{k}": v for k, v in objective_eval(model, task, tok, plan, mesh=mesh).items()})
        out.update({f"eval/{k}": v for k, v in diffusion_eval(model, task, tok, plan).items()})
        return out
    out = {f"eval/{k}": v for k, v in teacher_forced_eval(model, task, tok, plan, mesh=mesh).items()}
    out.update({f"eval/{k}": v for k, v in generation_eval(model, task, tok, cfg, mesh=mesh).items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Train / evaluate
# ----------------------------------------------------------------------------------------------------------------


def train(cfg, run_dir: str | Path, *, on_step: Optional[Callable[[int, dict], None]] = None,
          final_eval: bool = True) -> dict:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the final metrics (also ``summary.json``).

    ``cfg``: the :class:`~jaxtok.plan.RunPlan` (``jaxtok train`` passes the one validation built) or a Config,
    resolved here (:func:`jaxtok.config.validate_names`). ``on_step(step, metrics)`` is called on the host after
    every step (metrics as device arrays); ``final_eval=False`` skips the held-out evaluation after the last step.
    Holds the run directory's lock (process 0) while it runs; a finished run returns its stored summary
    (``resumed_from`` = its last step).
    """
    from jaxtok import rundir
    from jaxtok.config import as_plan

    plan = as_plan(cfg)
    mesh_lib.initialize_distributed(plan.cfg.mesh)
    run_dir = Path(run_dir)
    with rundir.run_lock(run_dir, enabled=jax.process_index() == 0):
        if jax.process_index() == 0:
            rundir.check_fresh_start(plan.cfg, run_dir)  # resume=false: refused, or run.overwrite=true clears it
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxtok train: run directory checked")
        return _train(plan, run_dir, on_step=on_step, final_eval=final_eval)


def _train(plan, run_dir: Path, *, on_step: Optional[Callable[[int, dict], None]] = None,
           final_eval: bool = True) -> dict:
    """:func:`train` inside the run directory's lock, in phases: inputs, trainer (models, state, step), batch feed,
    resume, then the step loop with its evaluations and checkpoints."""
    cfg = plan.cfg
    t_build = time.perf_counter()
    log.info("build: tokenizer, data, model, optimizer and objective %r", cfg.objective.name)
    run_dir = Path(run_dir)
    inputs = _build_inputs(plan, run_dir)
    if plan.spec.head is not None:  # a small head beside frozen decoders (SpecDec++, SpecKV, Learn2PD, TraceLock)
        from jaxtok.train.heads import train_head_run

        return train_head_run(plan, run_dir, tokenizer=inputs.tok, task=inputs.task)
    trainer, state = _build_trainer(plan, inputs, final_eval=final_eval)
    feed = _build_feed(plan, inputs, trainer)
    ck = ckpt_lib.Checkpointer(run_dir / CHECKPOINT_DIR, max_to_keep=cfg.train.keep_checkpoints)
    state, start, damaged = _resume(cfg, run_dir, ck, trainer, state, feed)
    stored = _finished_summary(cfg, run_dir, ck, start)
    if stored is not None:
        return stored
    _log_startup(cfg, run_dir, state, inputs.mesh, trainer.model_cfg, start=start, damaged=bool(damaged),
                 rollouts=plan.spec.data == "rollout", build_s=time.perf_counter() - t_build)
    return _step_loop(plan, run_dir, inputs, trainer, feed, ck, state, start=start, damaged=damaged,
                      on_step=on_step, final_eval=final_eval)


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What every phase reads: the tokenizer, the task and the device mesh."""

    tok: Any
    task: Any
    mesh: Any


@dataclasses.dataclass(frozen=True)
class _Trainer:
    """The built training side: the model's graphdef and config, the jitted step (with the frozen models it
    takes), the self-teacher (TRACE) or None, the checkpoint meta, and LoRA's adapter merge (None without LoRA)."""

    graphdef: Any
    model_cfg: Any
    step_fn: Callable
    frozen: dict
    frozen_args: tuple
    self_teacher: Any
    checkpoint_meta: dict
    merge_adapters: Optional[Callable]

    def step(self, k: int, state, placed):
        """Optimizer step ``k`` (0-based) on the placed batch; ``(state, metrics)``."""
        if self.self_teacher is None:
            return self.step_fn(state, placed, *self.frozen_args)
        # re-copied from the student at sync steps, not passed once λ = 0 (train/self_teacher.py)
        return self.self_teacher.step(k, state, placed, self.frozen_args, self.step_fn)

    def train_item(self, k: int, state, sampler=None) -> dict:
        """The checkpoint's ``train`` item after ``k`` updates: optimizer state, step, RNG, LoRA's adapters, the
        self-teacher's copy and the speculative sampler's refreshed drafter."""
        drafter = sampler.checkpoint_item() if sampler is not None else {}
        return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng,
                **({LORA_META: state.params} if self.merge_adapters else {}),
                **(self.self_teacher.checkpoint_item(k, state) if self.self_teacher else {}),
                **({SAMPLER_ITEM: drafter} if drafter else {})}

    def save(self, ck, step: int, state, feed: "_Feed") -> None:
        """Checkpoint ``step``; LoRA: ``params`` holds the merged weights (a plain model for every loader),
        ``train`` the adapters."""
        params = self.merge_adapters(state.params, state.rest) if self.merge_adapters else state.params
        ck.save(step, params=params, data=feed.it.get_state(), meta=self.checkpoint_meta,
                train=self.train_item(step, state, feed.sampler))


@dataclasses.dataclass(frozen=True)
class _Feed:
    """Where the batches come from: the train data iterator (``dropped`` counts over-long examples) and, for
    objectives that do not eat SFT batches, the collector (with its ``prepare`` hook and host-side group
    advantages) that turns its prompts into training batches."""

    it: Any
    dropped: Any
    collect: Optional[Callable] = None
    prepare: Optional[Callable] = None
    host_adv: Optional[Callable] = None
    sampler: Any = None  # rollout.sampler=speculative: its SpeculativeSampler (checkpointed with the run)


def _build_inputs(plan, run_dir: Path) -> _Inputs:
    """Tokenizer (saved into ``run_dir``), task and mesh; the batch must split into micro-batches over the batch
    shards."""
    from jaxtok.tasks import save_tokenizer

    cfg = plan.cfg
    mesh_lib.initialize_distributed(cfg.mesh)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer_for(cfg)
    if jax.process_index() == 0:
        save_tokenizer(tok, run_dir)  # tokenizer.json + its config, generation config and chat template
    task = plan.make_task()
    mesh = mesh_lib.mesh_from_config(cfg.mesh)
    rows = cfg.data.batch_size // cfg.train.micro_batches
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape.get("expert", 1)
    if cfg.data.batch_size % cfg.train.micro_batches or rows % shards:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must split into train.micro_batches="
                         f"{cfg.train.micro_batches} micro-batches whose rows divide the {shards} batch shards "
                         f"(mesh data x fsdp{' x expert' if 'expert' in mesh.shape else ''})")
    return _Inputs(tok=tok, task=task, mesh=mesh)


def _build_trainer(plan, inputs: _Inputs, *, final_eval: bool) -> tuple[_Trainer, Any]:
    """The trained model, optimizer, loss, self-teacher and frozen models, the placed train state and the jitted
    step: ``(trainer, state)``. The model itself is dropped: the state owns the (donated) parameters."""
    from jaxtok.config import build_optimizer, check_micro_batches
    from jaxtok.train.self_teacher import SelfTeacher
    from jaxtok.train.step import frozen_states, init_train_state, make_train_step

    cfg, spec, mesh, vocab = plan.cfg, plan.spec, inputs.mesh, inputs.tok.get_vocab_size()
    if is_diffusion_run(plan) and (final_eval or cfg.train.eval_every):
        diffusion_eval_settings(plan)  # a bad decode policy fails now, not after training
    model, wrap_meta = build_train_model(plan, vocab, mesh=mesh)
    optimizer = build_optimizer(cfg.optimizer, cfg.train.steps)
    check_micro_batches(cfg, spec)
    loss_fn = build_objective(plan)
    self_teacher = SelfTeacher.of(plan)  # TRACE: the teacher is the student's copy, synced every N steps
    names = [n for n in spec.models if not (self_teacher and n == "teacher")]
    frozen = build_frozen_models(cfg, names, vocab, mesh=mesh)
    graphdef, state = init_train_state(model, optimizer, seed=cfg.train.seed, mesh=mesh)
    make_step = functools.partial(make_train_step, model, optimizer, loss_fn, mesh=mesh,
                                  micro_batches=cfg.train.micro_batches, batch_step=spec.batch_step)
    step_fn = (make_step(frozen=frozen or None) if self_teacher is None
               else self_teacher.build_steps(make_step, frozen, graphdef, state))
    merge_adapters = None
    if cfg.lora.rank:  # LoRA: the train state's params are the adapters, the base weights sit in rest
        from jaxtok.models.lora import merged_params_fn

        merge_adapters = jax.jit(merged_params_fn(graphdef))
    checkpoint_meta = {"model_config": model_config_to_dict(model.cfg), "objective": cfg.objective.name, **wrap_meta}
    trainer = _Trainer(graphdef=graphdef, model_cfg=model.cfg, step_fn=step_fn, frozen=frozen,
                       frozen_args=(frozen_states(frozen),) if frozen else (), self_teacher=self_teacher,
                       checkpoint_meta=checkpoint_meta, merge_adapters=merge_adapters)
    return trainer, state


def _build_feed(plan, inputs: _Inputs, trainer: _Trainer) -> _Feed:
    """The train data iterator and, unless the objective eats SFT batches (``spec.data``), its collector: the
    default rollout collector (APPO's branching one with ``rollout.branches``), the objective's own
    ``spec.collect``, or TAD's trajectory collector; with top-K statistics, speculative sampling, the ``prepare``
    hook and host-side group advantages bound as the spec and config say."""
    from jaxtok.config import rollout_topk
    from jaxtok.data import prompt_dataset, sft_dataset
    from jaxtok.registry import ConfigError
    from jaxtok.train import branching
    from jaxtok.train import rollout as rollout_lib

    cfg, spec, args, tok = plan.cfg, plan.spec, plan.objective_args, inputs.tok
    if spec.data not in DATA_KINDS:
        raise ConfigError(f"objective {cfg.objective.name!r} eats data={spec.data!r}; the loop produces {DATA_KINDS}")
    collect = branching.collect_appo if cfg.rollout.branches else rollout_lib.collect
    if spec.collect is not None:  # the objective's own collector gets its parsed arguments
        collect = functools.partial(spec.collect, args=args)
    if spec.data == "trajectory":  # TAD: teacher trajectories with the privileged prompt
        from jaxtok.train.trajectory import collect_trajectories

        collect = functools.partial(collect_trajectories, seq_len=cfg.data.seq_len, args=args)
    prepare = spec.prepare
    if prepare is not None and spec.prepare_args:  # the hook reads the objective's arguments
        prepare = functools.partial(prepare, args=args)
    topk = rollout_topk(cfg, spec, args) if spec.data == "rollout" else 0
    if topk:  # top-K behaviour statistics for the objective (CPPO's top-K TV/KL)
        collect = functools.partial(collect, topk=topk)
    spec_sampler = rollout_lib.SpeculativeSampler.from_config(plan, trainer.model_cfg, mesh=inputs.mesh)
    if spec_sampler is not None:  # rollout.sampler=speculative: lossless speculative rollouts with the drafter
        collect = functools.partial(collect, sampler=spec_sampler)
    host_adv = None
    if callable(spec.group_advantages) and cfg.train.micro_batches > 1:
        # whole-group advantages on the full rollout batch, before the micro-batch split
        host_adv = functools.partial(spec.group_advantages, args=args)
    d = cfg.data
    if spec.data in ("rollout", "trajectory"):
        ds, dropped = prompt_dataset(inputs.task, "train", tok, prompt_len=d.prompt_len,
                                     batch_size=d.batch_size // cfg.rollout.rows_per_prompt,
                                     num_examples=d.num_train, seed=d.seed, shuffle=True, num_epochs=None,
                                     drop_remainder=True, overlong=d.overlong, worker_count=d.worker_count)
    else:
        ds, dropped = sft_dataset(inputs.task, "train", tok, seq_len=d.seq_len, batch_size=d.batch_size,
                                  num_examples=d.num_train, seed=d.seed, overlong=d.overlong,
                                  worker_count=d.worker_count)
    if spec.data == "sft":
        return _Feed(it=iter(ds), dropped=dropped)
    return _Feed(it=iter(ds), dropped=dropped, collect=collect, prepare=prepare, host_adv=host_adv,
                 sampler=spec_sampler)


def _resume(cfg, run_dir: Path, ck, trainer: _Trainer, state, feed: _Feed) -> tuple[Any, int, list]:
    """With ``run.resume`` and a checkpoint in ``run_dir``: the train state, data iterator and speculative
    sampler restored from the newest good checkpoint (damaged newer steps moved aside with a warning).
    ``(state, start step, damaged)``."""
    from jaxtok.registry import ConfigError

    if not (cfg.run.resume and ck.latest_step() is not None):
        return state, 0, []
    # LoRA: the stored merged weights have the base weights' structure and shardings (read, then unused: the base
    # comes from model.init_from / hf_path / preset again, the adapters from "train")
    graphdef = trainer.graphdef
    params_like = (nnx.state(nnx.merge(graphdef, state.params, state.rest), nnx.All(nnx.Param, nnx.Not(
        nnx.LoRAParam))) if trainer.merge_adapters else state.params)
    try:  # the newest good checkpoint: damaged newer steps are moved aside
        out, damaged = ck.restore_good(params=ckpt_lib.abstract_of(params_like),
                                       train=ckpt_lib.abstract_of(trainer.train_item(0, state, feed.sampler)))
    except ckpt_lib.CheckpointError as e:
        ck.close()
        raise ConfigError(f"cannot resume {run_dir}: {e}; use run.resume=false run.overwrite=true to start "
                          f"over") from None
    restored_train = dict(out["train"])
    adapters = restored_train.pop(LORA_META, None)
    sampler_item = restored_train.pop(SAMPLER_ITEM, None)
    if sampler_item is not None:
        feed.sampler.restore(sampler_item)
    self_teacher = trainer.self_teacher
    state = dataclasses.replace(state, params=out["params"] if adapters is None else adapters, **(
        self_teacher.restored(restored_train, int(out["step"])) if self_teacher else restored_train))
    if out["data"] is not None:
        feed.it.set_state(out["data"])
    start = int(out["step"])
    for bad, why in damaged:
        log.warning("checkpoint step %d is damaged, moved to %s-damaged/: %s", bad, ck.directory, why)
    log.log(logging.WARNING if damaged else logging.INFO, "resumed %s from step %d%s", run_dir, start,
            ", the last good checkpoint" if damaged else "")
    return state, start, damaged


def _finished_summary(cfg, run_dir: Path, ck, start: int) -> Optional[dict]:
    """A finished run's stored summary (then nothing is trained, evaluated or rewritten), else None; a run
    directory beyond ``train.steps`` is a ConfigError."""
    from jaxtok.registry import ConfigError

    if start > cfg.train.steps:
        ck.close()
        raise ConfigError(f"train.steps={cfg.train.steps}: run directory {str(run_dir)!r} is already at step {start}")
    stored = _stored_summary(run_dir) if start == cfg.train.steps else None
    if stored is None:
        return None
    ck.close()
    log.warning("run %s is already finished at step %d (summary.json); nothing to do", run_dir, start)
    return {**stored, "resumed_from": start, "already_finished": True}


def _next_batch(plan, inputs: _Inputs, trainer: _Trainer, feed: _Feed, step: int, state, placed, rollout_info):
    """The batch of ``step``: the next SFT batch, or every ``rollout.inner_epochs`` steps a new collected one
    (kept placed between). ``(host batch or None when reused, placed batch, rollout info)``."""
    cfg = plan.cfg
    if feed.collect is None:
        batch = next(feed.it)
        return batch, mesh_lib.put_batch(batch, inputs.mesh), rollout_info
    if placed is not None and (step - 1) % cfg.rollout.inner_epochs != 0:
        return None, placed, rollout_info
    policy = nnx.merge(trainer.graphdef, state.params, state.rest)
    ro = feed.collect(policy, next(feed.it), task=inputs.task, tokenizer=inputs.tok, settings=cfg.rollout,
                      rng=jax.random.fold_in(jax.random.key(cfg.train.seed), step), mesh=inputs.mesh,
                      teacher=trainer.frozen.get("teacher"), prepare=feed.prepare)
    del policy
    batch = ro.batch
    if feed.host_adv is not None:  # keys the collector set itself (APPO's token advantages) are kept
        batch = {**feed.host_adv(batch), **batch}
    return batch, mesh_lib.put_batch(batch, inputs.mesh), ro.info


def _open_metrics(cfg, run_dir: Path, *, start: int, damaged: list, lead: bool):
    """The metrics observer (:func:`jaxtok.observe.open_observer`); a resumed run's ``metrics.jsonl`` gets a
    ``resume`` record: records of steps after ``start`` written before it were redone (or lost with a damaged
    checkpoint)."""
    metrics_out = open_observer(cfg, run_dir, enabled=lead, start=start)
    if metrics_out.enabled and metrics_out.path.is_file() and metrics_out.path.stat().st_size:
        metrics_out.write(start, {"event": "resume", "from_step": start,
                                  **({"damaged_from_step": max(s for s, _ in damaged)} if damaged else {})})
    return metrics_out


def _evaluate_state(plan, inputs: _Inputs, trainer: _Trainer, state, step: int, final: bool = False) -> dict:
    """Held-out ``eval/*`` metrics of the model in the train state at ``step`` (:func:`_evaluate_model`), logged."""
    t_eval = time.perf_counter()
    log.info("eval: %sheld-out evaluation at step %d", "final " if final else "", step)
    ev = _evaluate_model(nnx.merge(trainer.graphdef, state.params, state.rest), inputs.task, inputs.tok, plan,
                         inputs.mesh)
    log.info("eval: %sdone in %.1f s: %s", "" if final else f"step {step} ", time.perf_counter() - t_eval, _brief(ev))
    return ev


def _step_loop(plan, run_dir: Path, inputs: _Inputs, trainer: _Trainer, feed: _Feed, ck, state, *, start: int,
               damaged: list, on_step, final_eval: bool) -> dict:
    """Steps ``start+1 .. train.steps`` with metrics records, periodic evaluations and checkpoints, the last
    checkpoint and the final held-out evaluation; writes ``summary.json`` and returns the summary."""
    from jaxtok.config import build_schedule, learning_rate

    cfg = plan.cfg
    lead = jax.process_index() == 0
    rollouts = feed.collect is not None
    metrics_out = _open_metrics(cfg, run_dir, start=start, damaged=damaged, lead=lead)
    total = cfg.train.steps
    schedule = jax.jit(build_schedule(cfg.optimizer, total))  # the optimizer's own schedule: metrics.jsonl's lr
    profile = ProfileWindow(cfg.run.profile_steps, run_dir, start=start, enabled=lead)
    bar = None  # made after the first (compiling) step, so its rate and ETA exclude the compilation
    timer = _StepTimer()
    last: dict = {}
    batch, placed, rollout_info = None, None, {}
    quiet_bar = contextlib.ExitStack()  # log lines above the progress bar while it is shown
    evaluate_now = functools.partial(_evaluate_state, plan, inputs, trainer)
    try:
        quiet_bar.enter_context(_logging_around_bar())
        if cfg.train.eval_at_start and start == 0:  # the starting model's point on the same eval curve
            metrics_out.write(0, evaluate_now(state, 0))
        for step in range(start + 1, total + 1):
            timer.begin_step()
            profile.before_step(step)
            if step == start + 1:
                log.info("compile: the first step compiles the train step%s; its time is the compile time",
                         " and the rollout sampler" if rollouts else "")
            new, placed, rollout_info = _next_batch(plan, inputs, trainer, feed, step, state, placed, rollout_info)
            batch = new if new is not None else batch
            timer.tokens += int(np.sum(batch["valid"]))
            state, metrics = trainer.step(step - 1, state, placed)
            timer.steps += 1
            if on_step is not None:
                on_step(step, metrics)
            profile.after_step(step, metrics)
            if step == start + 1:  # the compiling step: timed alone, then left out of tokens/s and the ETA
                jax.block_until_ready(metrics)
                compile_s = timer.first_step_done()
                log.info("compile: first step %d took %.1f s (compilation%s); train: steps %d..%d",
                         step, compile_s, " and the first rollout" if rollouts else "", step + 1, total)
                bar = _progress(total, step - 1, cfg.run.progress and lead)
            if step % cfg.train.log_every == 0 or step == total:
                host = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "step"}
                host.update(lr=learning_rate(schedule, step), **timer.window(), dropped_overlong=feed.dropped.count,
                            **rollout_info)
                metrics_out.write(step, host)
                if lead:
                    _show_progress(bar, host, step, total)
                last = host
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
                with timer.paused():
                    metrics_out.write(step, evaluate_now(state, step))
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step != total:
                trainer.save(ck, step, state, feed)
            bar.update(1)
        if ck.latest_step() != total:
            trainer.save(ck, total, state, feed)
        ck.wait()
        if bar is not None:
            bar.close()
        quiet_bar.close()
        log.info("train: steps %d..%d done in %s", start + 1, total, fmt_duration(timer.elapsed()))

        summary = {"step": total, "train/loss": last.get("loss"), "resumed_from": start or None}
        if final_eval:
            summary.update(evaluate_now(state, total, final=True))
            metrics_out.write(total, {k: v for k, v in summary.items() if k.startswith("eval/")})
    finally:
        profile.close()
        if bar is not None:
            bar.close()
        quiet_bar.close()
        ck.close()
        metrics_out.close()
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class _StepTimer:
    """Wall time and tokens of the training steps since the last metrics record, without the first (compiling)
    step and paused evaluations: ``step_time_s`` and ``tokens_per_s`` of each record."""

    def __init__(self):
        self.t0 = self.t_start = time.perf_counter()
        self.tokens = 0
        self.steps = 0
        self.compile_s: Optional[float] = None
        self._step_t0 = self.t0
        self._first_pending = False

    def begin_step(self) -> None:
        self._step_t0 = time.perf_counter()

    def first_step_done(self) -> float:
        """End of the compiling step: its time, and a new window from now."""
        now = time.perf_counter()
        self.compile_s = now - self._step_t0
        self.t0, self.tokens, self.steps = now, 0, 0
        self._first_pending = True
        return self.compile_s

    def window(self) -> dict:
        """``step_time_s`` and ``tokens_per_s`` over the steps since the last call (a window holding only the
        compiling first step: its time as ``step_time_s``, ``compile_s``, and ``tokens_per_s`` null); then a new
        window. The first record after the compile also carries ``compile_s``."""
        now = time.perf_counter()
        out: dict = {}
        if self._first_pending:
            out["compile_s"] = self.compile_s
            self._first_pending = False
        if self.steps:
            dt = max(now - self.t0, 1e-9)
            out.update(step_time_s=dt / self.steps, tokens_per_s=self.tokens / dt)
        else:
            out.update(step_time_s=self.compile_s, tokens_per_s=None)
        self.t0, self.tokens, self.steps = now, 0, 0
        return out

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluations) is left out of the window."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


def _logging_around_bar():
    """jaxtok's log lines printed above the progress bar instead of through it (tqdm's logging redirect)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logging.getLogger("jaxtok")])


def _show_progress(bar, host: dict, step: int, total: int) -> None:
    """The progress bar's postfix; without a bar (``run.progress=false``, other processes) an INFO line per
    record with loss, lr, tokens/s and the ETA from the measured step time (compilation excluded)."""
    tok_s = host.get("tokens_per_s")
    if bar is not None and not bar.disable:
        bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['lr']:.2e}",
                        **({"tok_s": f"{tok_s:.0f}"} if tok_s is not None else {}))
        return
    eta = fmt_duration(host["step_time_s"] * (total - step)) if tok_s is not None else "?"
    log.info("step %d/%d: loss %.4f, lr %.3g, %s tokens/s, %.3f s/step, ETA %s", step, total, host["loss"],
             host["lr"], f"{tok_s:.0f}" if tok_s is not None else "-", host["step_time_s"], eta)


def _brief(ev: dict) -> str:
    keys = [k for k in ("eval/exact_match", "eval/loss", "eval/accuracy", "eval/format_ok", "eval/mean_nfe")
            if k in ev]
    return ", ".join(f"{k[5:]} {ev[k]:.4g}" for k in keys) or "no held-out metrics"


def _log_startup(cfg, run_dir: Path, state, mesh, model_cfg, *, start: int, damaged: bool, rollouts: bool,
                 build_s: float) -> None:
    """The one start-up summary: model and parameter count, mesh and devices, data, objective, steps, run
    directory and what was resumed."""
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    trainable = "parameters" if not cfg.lora.rank else (
        f"trainable LoRA parameters (rank {cfg.lora.rank} on {'/'.join(cfg.lora.targets)}) over "
        f"{fmt_count(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.rest)))} frozen")
    source = (f"init_from {cfg.model.init_from}" if cfg.model.init_from else
              f"hf_path {cfg.model.hf_path}" if cfg.model.hf_path else f"preset {cfg.model.preset}")
    arch = getattr(model_cfg, "architecture", "")
    devices = jax.devices()
    d = cfg.data
    shape = f"seq_len {d.seq_len}" if not rollouts else (
        f"prompt_len {d.prompt_len}, {cfg.rollout.num_generations} completions/prompt of <= "
        f"{cfg.rollout.max_new_tokens} tokens")
    opt = cfg.optimizer
    outputs = ["metrics.jsonl"] + (["tensorboard/"] if cfg.run.tensorboard else []) + (
        [f"W&B project {cfg.run.wandb['project']}"] if cfg.run.wandb else []) + (
        [f"profile/ (steps {cfg.run.profile_steps[0]}..{cfg.run.profile_steps[1]})"] if cfg.run.profile_steps else [])
    rows = [
        ("model", f"{source} ({arch}, {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}), "
                  f"{fmt_count(n_params)} {trainable}, {cfg.model.dtype}"),
        ("mesh", " x ".join(f"{k} {v}" for k, v in mesh.shape.items()) + f" on {len(devices)} "
                 f"{devices[0].platform} device(s) ({devices[0].device_kind}), {jax.process_count()} process(es)"),
        ("data", f"task {d.task}, batch {d.batch_size} ({cfg.train.micro_batches} micro-batch(es)), {shape}"),
        ("objective", f"{cfg.objective.name}; optimizer {opt.name}, lr {opt.lr:g} ({opt.schedule}, warmup "
                      f"{opt.warmup_steps})"),
        ("steps", f"{start} -> {cfg.train.steps}; log every {cfg.train.log_every}, eval every "
                  f"{cfg.train.eval_every or '-'}, checkpoint every {cfg.train.checkpoint_every or '-'}"),
        ("run dir", f"{run_dir} ({', '.join(outputs)})"),
        ("resumed", f"from step {start}" + (" (the last good checkpoint)" if damaged else "") if start
         else "no: a fresh start"),
    ]
    if jax.process_index() == 0:
        log.info(startup_summary(rows, f"build: done in {build_s:.1f} s; run {run_dir.name}:"))


def _stored_summary(run_dir: Path) -> Optional[dict]:
    """The run directory's ``summary.json`` (None when missing or unreadable)."""
    try:
        stored = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def _has_checkpoint(run_dir: Path) -> bool:
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        return False
    with ckpt_lib.Checkpointer(run_dir / CHECKPOINT_DIR, async_save=False) as ck:
        return ck.latest_step() is not None


def evaluate(cfg, run_dir: str | Path) -> dict:
    """Held-out evaluation of the model in ``run_dir`` (or ``model.init_from`` / an untrained preset when the run
    directory has no checkpoint); writes ``eval.json`` and returns the metrics. ``cfg``: the run plan or a Config
    (resolved here). A file task without eval data is a ConfigError (nothing held out to evaluate), raised before
    any model is loaded."""
    from jaxtok.data import NO_EVAL, has_split
    from jaxtok.config import as_plan
    from jaxtok.registry import ConfigError

    plan = as_plan(cfg)
    cfg = plan.cfg
    task = plan.make_task()
    if not has_split(task, "eval"):
        raise ConfigError(f"jaxtok eval: {NO_EVAL}")
    mesh_lib.initialize_distributed(cfg.mesh)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_lib.mesh_from_config(cfg.mesh)
    trained = _has_checkpoint(run_dir)
    if trained and (run_dir / TOKENIZER_FILE).is_file():  # the run's own tokenizer files
        cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(run_dir)))
        plan = dataclasses.replace(plan, cfg=cfg)
    tok = load_tokenizer_for(cfg)
    if trained:
        model, _ = load_model(run_dir, mesh=mesh)
    else:
        model = build_model(cfg, tok.get_vocab_size(), mesh=mesh)
        model = mesh_lib.shard_model(model, mesh)
    t_eval = time.perf_counter()
    log.info("eval: held-out evaluation of %s", run_dir if trained else "an untrained model (no checkpoint in the "
                                                                        "run directory)")
    out = _evaluate_model(model, task, tok, plan, mesh)
    log.info("eval: done in %.1f s: %s", time.perf_counter() - t_eval, _brief(out))
    if jax.process_index() == 0:
        (run_dir / "eval.json").write_text(json.dumps(out, indent=2))
    return out
