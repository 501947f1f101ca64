"""On-policy rollouts for distillation and RL objectives (train_methods.md §0).

One rollout turns a left-padded prompt batch ``{prompt [G, P], prompt_valid [G, P], index [G]}`` into the batch a
rollout objective consumes (``B = G · n`` rows, the ``n`` completions of a prompt contiguous):

1. :func:`expand_groups` repeats every prompt ``n = rollout.num_generations`` times;
2. the jitted sampler :func:`jaxtok.decode.generate.generate` completes them with the current policy (or, for the
   GKD-style ``off_policy_fraction`` of prompt groups, with the teacher);
3. :func:`assemble` lays prompt and completion side by side in the SFT convention (``loss_mask[t]``: token ``t``
   is a completion token predicted from position ``t-1``);
4. :func:`score_rollout` recomputes the behaviour log-probs and entropies (and, for CPPO's top-K divergences, the
   top-K ids and log-probs) with one forward of the training model at the sampling temperature and without
   top-k/top-p filters, so the objective's first inner epoch sees ratio 1 exactly (verl's "recompute old
   log-prob");
5. :func:`jaxtok.train.rewards.score` rewards the decoded completions on the host, and the objective's ``prepare``
   hook (entry meta, e.g. TRACE's span annotator) adds its own arrays.

The result (:class:`Rollout`) holds host numpy arrays; the loop places them on the mesh once and runs
``rollout.inner_epochs`` optimizer steps on them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok import mesh as mesh_lib
from jaxtok.stats import chunked_map
from jaxtok.tasks.tokenizer import SpecialTokens, decode


@dataclasses.dataclass
class Rollout:
    """A scored rollout batch: ``batch`` (numpy arrays, the objective's input), the decoded ``completions`` and
    their task ``examples`` (host side), and scalar ``info`` for the metrics log."""

    batch: dict
    completions: list
    examples: list
    info: dict


def expand_groups(prompts: dict, n: int) -> dict:
    """Repeat every row ``n`` times (rows of one prompt contiguous): ``[G, ...] -> [G·n, ...]``."""
    return {k: np.repeat(np.asarray(v), n, axis=0) for k, v in prompts.items()}


def assemble(prompt: np.ndarray, prompt_valid: np.ndarray, completion: np.ndarray,
             completion_valid: np.ndarray) -> dict:
    """Prompt ``[B, P]`` (left-padded) + completion ``[B, N]`` -> ``tokens, positions, valid, loss_mask [B, P+N]``.

    Positions count valid tokens (``cumsum(valid) - 1``, 0 on padding), matching generation's positions, so the
    scoring forward sees the same inputs as the sampler did."""
    tokens = np.concatenate([prompt, completion], axis=1).astype(np.int32)  # [B, T]
    valid = np.concatenate([prompt_valid, completion_valid], axis=1).astype(bool)  # [B, T]
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)  # [B, T]
    loss_mask = np.concatenate([np.zeros_like(prompt_valid, bool), completion_valid.astype(bool)], axis=1)
    return {"tokens": tokens, "positions": positions, "valid": valid, "loss_mask": loss_mask}


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "topk"))
def _score_jit(graphdef, state, tokens, positions, valid, temperature, *, chunk_size, topk=0):
    model = nnx.merge(graphdef, state)
    hidden = model(tokens, positions=positions, valid=valid, return_logits=False, return_hidden=True).hidden
    B, T = tokens.shape

    def one(chunk):  # hidden at t-1 scores token t
        logits = model.logits(chunk["hidden"]).astype(jnp.float32) / chunk["temperature"][:, None]  # [C, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(logp, chunk["target"][:, None], axis=-1)[:, 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        out = {"logp": lp, "entropy": ent}
        if topk:
            out["topk_logp"], out["topk_ids"] = jax.lax.top_k(logp, topk)  # [C, K]
        return out

    tree = {"hidden": hidden[:, :-1], "target": tokens[:, 1:],
            "temperature": jnp.broadcast_to(temperature[:, None], (B, T - 1))}
    out = chunked_map(one, tree, chunk_size=chunk_size, token_ndim=2, remat=False)  # [B, T-1, ...]
    return jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], 1), out)  # [B, T, ...]


def score_rollout(model: nnx.Module, batch: dict, temperature: np.ndarray, *, mesh=None, chunk_size: int = 1024,
                  topk: int = 0) -> dict:
    """Behaviour statistics of a rollout batch under ``softmax(logits[t-1] / temperature)`` (no top-k/top-p
    filters), aligned with ``tokens`` and 0 off ``loss_mask``: ``old_logprobs [B, T]`` (of ``tokens[t]``) and
    ``entropy [B, T]`` (nats), float32; with ``topk = K > 0`` also ``topk_ids [B, T, K]`` int32 and
    ``topk_logprobs [B, T, K]`` float32, the K most likely tokens of that distribution (CPPO's top-K TV/KL, §6.5;
    computed by the same forward as ``old_logprobs`` so the first inner epoch has divergence 0 exactly). The float32
    log-softmax runs over token chunks (no ``[B, T, V]`` float32 array)."""
    graphdef, state = nnx.split(model)
    placed = mesh_lib.put_batch({k: batch[k] for k in ("tokens", "positions", "valid")}
                                | {"temperature": np.asarray(temperature, np.float32)}, mesh)
    out = _score_jit(graphdef, state, placed["tokens"], placed["positions"], placed["valid"], placed["temperature"],
                     chunk_size=chunk_size, topk=int(topk))
    mask = np.asarray(batch["loss_mask"], bool)
    res = {"old_logprobs": np.where(mask, fetch(out["logp"]), 0.0).astype(np.float32),
           "entropy": np.where(mask, fetch(out["entropy"]), 0.0).astype(np.float32)}
    if topk:
        res["topk_ids"] = np.where(mask[..., None], fetch(out["topk_ids"]), 0).astype(np.int32)
        res["topk_logprobs"] = np.where(mask[..., None], fetch(out["topk_logp"]), 0.0).astype(np.float32)
    return res


def score_tokens(model: nnx.Module, batch: dict, temperature: np.ndarray, *, mesh=None, chunk_size: int = 1024):
    """``(old_logprobs, entropy)`` ``[B, T]`` float32 of :func:`score_rollout` (per-token log-prob of
    ``tokens[t]`` under ``softmax(logits[t-1] / temperature)`` and that distribution's entropy, 0 off
    ``loss_mask``)."""
    out = score_rollout(model, batch, temperature, mesh=mesh, chunk_size=chunk_size)
    return out["old_logprobs"], out["entropy"]


def fetch(x: jax.Array) -> np.ndarray:
    """A host numpy copy of a global array (gathered across processes when it is not fully addressable)."""
    if jax.process_count() > 1 and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def accuracy(task, completions, examples) -> np.ndarray:
    """``1`` where the task's verifier accepts the completion's answer (``task.reward >= 1``), else 0. ``[B]``
    float32."""
    return np.array([task.reward(c, e) >= 1.0 for c, e in zip(completions, examples)], np.float32)


def sampler_trainer_mismatch(old_logprobs: np.ndarray, sampler_logprobs: np.ndarray, mask: np.ndarray) -> dict:
    """How far the sampler's per-token log-probs are from the trainer's recomputation of the same tokens
    (:func:`jaxtok.policy.sampler_mismatch`, over ``mask``, the policy's own completion tokens), as rollout info:
    ``rollout/sampler_abs_logp_diff`` = mean ``|lp_train − lp_sampler|`` and ``rollout/sampler_kl`` = mean k3
    estimate of ``KL(sampler ‖ trainer)``. Both are 0 up to float error when the rollout samples without top-k/top-p
    filters (the invariant ``tests/test_logprob_consistency.py`` checks); filters make them positive by design."""
    from jaxtok.policy import sampler_mismatch

    out = sampler_mismatch(jnp.asarray(old_logprobs), jnp.asarray(sampler_logprobs), jnp.asarray(mask))
    return {"rollout/sampler_abs_logp_diff": float(out["abs_logp_diff"]), "rollout/sampler_kl": float(out["kl"])}


def _sample(model, prompt, prompt_valid, settings, rng, sp: SpecialTokens, mesh):
    from jaxtok.decode.generate import generate

    out = generate(model, prompt, prompt_valid, max_new_tokens=settings.max_new_tokens,
                   temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, rng=rng,
                   stop_tokens=sp.eos_ids, pad_id=sp.pad, mesh=mesh)
    return fetch(out.tokens), fetch(out.valid), fetch(out.logprobs)


def collect(model: nnx.Module, prompts: dict, *, task, tokenizer, settings, rng: jax.Array, mesh=None,
            teacher: Optional[nnx.Module] = None, prepare: Optional[Callable] = None,
            chunk_size: int = 1024, topk: int = 0) -> Rollout:
    """One scored rollout batch (module docstring); ``settings`` is the config's ``rollout`` section.

    Batch keys: ``tokens, positions, valid, loss_mask [B, T]``, ``old_logprobs, entropy [B, T]`` float32,
    ``sampler_logprobs [B, T]`` (the sampler's own log-probs, with its filters: APPO's rollout-engine log-prob),
    ``rewards [B]`` float32, ``accuracy [B]`` float32 (1 where the task's verifier accepts the answer: what DAPO's
    dynamic sampling compares), ``max_new_tokens [B]`` int32 (the generation budget ``rollout.max_new_tokens``:
    Dr.GRPO's ``L_max``), ``group_ids [B]`` int32, ``temperature [B]`` float32, ``on_policy [B]`` bool
    (False for rows the teacher completed), with ``topk = K > 0`` ``topk_ids [B, T, K]`` int32 and
    ``topk_logprobs [B, T, K]`` float32 (:func:`score_rollout`), plus whatever ``prepare`` returns.

    ``info`` (logged with every step's metrics): ``rollout/reward_mean``, ``rollout/exact_match``,
    ``rollout/length_mean``, ``rollout/entropy_mean`` and the sampler/trainer mismatch on the policy's own sampled
    tokens (:func:`sampler_trainer_mismatch`).
    """
    sp = SpecialTokens.of(tokenizer)
    n = settings.num_generations
    rows = expand_groups(prompts, n)
    G = len(prompts["prompt"])
    k_student, k_teacher, k_mix = jax.random.split(rng, 3)
    completion, completion_valid, sampler_lp = _sample(model, rows["prompt"], rows["prompt_valid"], settings, k_student,
                                                       sp, mesh)
    on_policy = np.ones(G * n, bool)
    if settings.off_policy_fraction > 0:
        if teacher is None:
            raise ValueError("rollout.off_policy_fraction > 0 needs a teacher (rollout.teacher_init_from)")
        groups = np.asarray(jax.random.uniform(k_mix, (G,))) < settings.off_policy_fraction
        if groups.any():
            t_tok, t_valid, t_lp = _sample(teacher, rows["prompt"], rows["prompt_valid"], settings, k_teacher, sp,
                                           mesh)
            on_policy = ~np.repeat(groups, n)
            completion = np.where(on_policy[:, None], completion, t_tok)
            completion_valid = np.where(on_policy[:, None], completion_valid, t_valid)
            sampler_lp = np.where(on_policy[:, None], sampler_lp, t_lp)
    batch = assemble(rows["prompt"], rows["prompt_valid"], completion, completion_valid)
    batch["sampler_logprobs"] = np.concatenate([np.zeros_like(rows["prompt"], np.float32), sampler_lp], axis=1)
    temperature = np.full((G * n,), settings.temperature, np.float32)
    batch.update(score_rollout(model, batch, temperature, mesh=mesh, chunk_size=chunk_size, topk=topk))
    from jaxtok.data import examples_of
    from jaxtok.train.rewards import score

    examples = examples_of(task, "train", rows)
    completions = [decode(tokenizer, completion[b][completion_valid[b]]) for b in range(G * n)]
    batch.update(rewards=score(task, completions, examples, settings.rewards),
                 accuracy=accuracy(task, completions, examples),
                 max_new_tokens=np.full((G * n,), settings.max_new_tokens, np.int32),
                 group_ids=(np.arange(G * n) // n).astype(np.int32), temperature=temperature, on_policy=on_policy)
    if prepare is not None:
        extra = prepare(batch, completions, examples, task, tokenizer)
        clash = set(extra) & set(batch)
        if clash:
            raise ValueError(f"prepare hook returned keys that already exist in the rollout batch: {sorted(clash)}")
        batch.update(extra)
    lengths = completion_valid.sum(axis=1)
    info = {"rollout/reward_mean": float(batch["rewards"].mean()),
            "rollout/exact_match": float(batch["accuracy"].mean()),
            "rollout/length_mean": float(lengths.mean()),
            "rollout/entropy_mean": float(batch["entropy"].sum() / max(batch["loss_mask"].sum(), 1))}
    info.update(sampler_trainer_mismatch(batch["old_logprobs"], batch["sampler_logprobs"],
                                         batch["loss_mask"] & on_policy[:, None]))
    return Rollout(batch=batch, completions=completions, examples=examples, info=info)
