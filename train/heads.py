"""Training a small head beside frozen decoders with the one train step: the SpecDec++ acceptance head and the SpecKV
predictor (draft-length policies, ``train/objectives/draft_heads.py``), the Learn2PD filter and the TraceLock
controller (diffusion commit policies, ``train/objectives/commit_heads.py``).

``jaxtok train configs/heads/<kind>.yaml`` runs an objective whose spec has a ``head`` hook
(:class:`jaxtok.specs.ObjectiveSpec`); the train loop hands it to :func:`train_head_run`:

1. ``spec.head(cfg, args, tokenizer=, task=)`` loads the frozen decoders (``model.init_from``: the target or the
   diffusion LM; ``decode.draft_init_from``: the drafter), records the head's examples on training prompts and
   builds a fresh head: a :class:`HeadRun`.
2. :func:`fit_head`: ``train.steps`` steps of :func:`jaxtok.train.step.make_train_step` on the head's parameters
   (the configured optimizer, ``optimizer.*``), each on ``data.batch_size`` examples drawn from the recorded pool
   (``numpy`` generator seeded ``train.seed``; with replacement for the draft heads, without for the commit heads,
   as their reference programs did; then the objective's host ``augment``). The objective is
   ``fn(head, batch, rng, args) -> (loss_sum, count, aux)`` like every other; the decoders never enter the step (the
   examples are features they produced).
3. The run directory gets ``head.npz`` + ``head.json`` (:func:`jaxtok.models.heads.save_head`), so
   ``decode.policy_args.head_path=<run dir>`` loads the head; ``metrics.jsonl`` (loss and lr every
   ``train.log_every`` steps) and ``summary.json`` (examples, first/last loss, held-out metrics when the objective
   holds prompts out).

A head run has no checkpoints: it trains in seconds to minutes once its examples are recorded, so a second
``jaxtok train`` into the same directory records and trains again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HeadRun:
    """What an objective's ``head`` hook returns: the fresh ``head`` of ``kind`` (a
    :data:`jaxtok.models.heads.HEAD_KINDS` name) with its constructor arguments ``ctor``; ``train`` examples (numpy
    arrays with a common first axis); optionally ``heldout`` examples, ``evaluate(head, heldout) -> dict`` (metrics
    reported in ``summary.json``), ``augment(batch, rng) -> batch`` (a host transform of each minibatch,
    TraceLock's random crops) and ``replace`` (minibatches drawn with replacement, the draft heads' reference)."""

    head: nnx.Module
    kind: str
    ctor: dict
    train: dict
    heldout: Optional[dict] = None
    evaluate: Optional[Callable[[nnx.Module, dict], dict]] = None
    augment: Optional[Callable[[dict, np.random.Generator], dict]] = None
    replace: bool = False


def merge_records(records) -> dict:
    """Concatenate example dicts (numpy arrays) along the first axis."""
    records = list(records)
    return {k: np.concatenate([r[k] for r in records]) for k in records[0]}


def prompt_batches(cfg, tokenizer, task, prompts: int) -> list:
    """``{prompt, prompt_valid, index}`` batches of ``decode.batch_size`` training prompts: ``prompts`` rounded down to
    whole batches (at least one), so every recorded batch has one compiled shape."""
    from jaxtok.data import prompt_dataset

    bsz = cfg.decode.batch_size
    ds, _ = prompt_dataset(task, "train", tokenizer, prompt_len=cfg.data.prompt_len, batch_size=bsz,
                           num_examples=max(bsz, prompts // bsz * bsz), overlong=cfg.data.overlong,
                           drop_remainder=True)
    return list(ds)


def fit_head(head: nnx.Module, loss_fn: Callable, data: Mapping[str, np.ndarray], *, steps: int,
             optimizer: Optional[optax.GradientTransformation] = None, batch_size: int = 256, seed: int = 0,
             augment: Optional[Callable[[dict, np.random.Generator], dict]] = None, replace: bool = False,
             on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Train ``head`` in place with :func:`jaxtok.train.step.make_train_step` on minibatches of ``data``.

    ``loss_fn(head, batch, rng) -> (loss_sum, count, aux)`` (an objective with its arguments bound); each step draws
    ``min(batch_size, M)`` of the ``M`` examples, without replacement unless ``replace`` (one static shape, one
    compilation), then ``augment``; ``optimizer`` defaults to Adam 3e-3. ``on_step(step, loss)`` is called after
    every step (1-based). Returns the loss of every step."""
    from jaxtok.train.step import init_train_state, make_train_step

    n = len(next(iter(data.values())))
    if n == 0:
        raise ValueError("fit_head: the data has no examples (nothing was recorded)")
    optimizer = optimizer or optax.adam(3e-3)
    graphdef, state = init_train_state(head, optimizer, seed=seed)
    step_fn = make_train_step(head, optimizer, loss_fn)
    rng = np.random.default_rng(seed)
    losses = []
    for k in range(1, steps + 1):
        idx = rng.choice(n, min(batch_size, n), replace=replace)
        batch = {name: v[idx] for name, v in data.items()}
        if augment is not None:
            batch = augment(batch, rng)
        state, metrics = step_fn(state, {name: jnp.asarray(v) for name, v in batch.items()})
        losses.append(float(metrics["loss"]))
        if on_step is not None:
            on_step(k, losses[-1])
    nnx.update(head, state.params)
    return losses


def train_head_run(plan, run_dir: str | Path, *, tokenizer, task) -> dict:
    """``jaxtok train`` of an objective with a ``head`` hook (see the module docstring) from the run plan
    (:class:`jaxtok.plan.RunPlan`: config, objective entry, parsed arguments); returns the summary."""
    from jaxtok.config import build_optimizer, build_schedule, learning_rate
    from jaxtok.models.heads import save_head
    from jaxtok.observe import open_observer

    cfg, args = plan.cfg, plan.objective_args
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    log.info("build: recording the examples of head objective %r", cfg.objective.name)
    run = plan.spec.head(cfg, args, tokenizer=tokenizer, task=task)
    n = len(next(iter(run.train.values())))
    log.info("build: %d training examples%s in %.1f s", n,
             f", {len(next(iter(run.heldout.values())))} held out" if run.heldout else "", time.perf_counter() - t0)
    loss_fn = functools.partial(plan.objective.fn, args=args)
    total = cfg.train.steps
    schedule = build_schedule(cfg.optimizer, total)
    lead = jax.process_index() == 0
    out = open_observer(cfg, run_dir, enabled=lead)

    def on_step(step: int, loss: float) -> None:
        if step % cfg.train.log_every == 0 or step == total:
            out.write(step, {"loss": loss, "lr": learning_rate(schedule, step)})

    try:
        losses = fit_head(run.head, loss_fn, run.train, steps=total, optimizer=build_optimizer(cfg.optimizer, total),
                          batch_size=cfg.data.batch_size, seed=cfg.train.seed, augment=run.augment, replace=run.replace,
                          on_step=on_step)
        summary: dict[str, Any] = {"step": total, "train/loss": losses[-1], "kind": run.kind, "examples": int(n),
                                   "first_loss": losses[0], "last_loss": losses[-1], "head": run.ctor}
        if run.heldout is not None and run.evaluate is not None:
            summary["heldout_examples"] = int(len(next(iter(run.heldout.values()))))
            summary["heldout"] = run.evaluate(run.head, run.heldout)
            out.write(total, {f"eval/{k}": v for k, v in _flat(summary["heldout"]).items()})
    finally:
        out.close()
    if lead:
        save_head(run.head, run_dir, run.kind, **run.ctor)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("train: %s head in %s (loss %.4f -> %.4f); decode with decode.policy_args.head_path=%s", run.kind,
             run_dir, losses[0], losses[-1], run_dir)
    return summary


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (numbers only)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out
