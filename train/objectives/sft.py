"""Supervised fine-tuning: next-token cross-entropy on response tokens.

``loss = Σ_t loss_mask[t] · CE(p_θ(· | x_<t), x_t)``, returned as ``(sum, count)`` with ``count = Σ loss_mask``.
With label smoothing ε: ``CE = (1-ε)·(-log p(x_t)) + ε·mean_v(-log p(v))``.

Memory: the log-softmax runs in float32 over chunks of ``chunk_size`` tokens inside a rematerialised
(``jax.checkpoint``) scan (:func:`jaxtok.stats.chunked_map`), so only ``[chunk_size, V]`` float32 logits are alive at a time in the forward and the
backward pass, instead of ``[B, T, V]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtok.registry import OBJECTIVES
from jaxtok.stats import chunked_map


@dataclasses.dataclass(frozen=True)
class SFTArgs:
    """``chunk_size``: tokens per float32 log-softmax chunk; ``label_smoothing`` ε in [0, 1)."""

    chunk_size: int = 1024
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size}: must be >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing}: allowed [0, 1)")


def chunked_token_stats(logits_fn, hidden: jax.Array, targets: jax.Array, mask: jax.Array, *, chunk_size: int,
                        label_smoothing: float = 0.0):
    """Per-token float32 cross-entropy and argmax-correctness without materialising all logits.

    Runs :func:`jaxtok.stats.chunked_map` (a rematerialised scan over token chunks).

    Args:
      logits_fn: ``[C, D] -> [C, V]`` logits (closes over the LM head).
      hidden: ``[N, D]`` hidden states; targets ``[N]`` int32; mask ``[N]`` bool.
    Returns:
      ``(nll [N] float32, correct [N] bool)``, zero / False where ``mask`` is False.
    """

    def one(chunk):
        logp = jax.nn.log_softmax(logits_fn(chunk["hidden"]).astype(jnp.float32), axis=-1)  # [C, V]
        nll = -jnp.take_along_axis(logp, chunk["targets"][:, None], axis=-1)[:, 0]
        if label_smoothing:
            nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
        correct = jnp.argmax(logp, axis=-1) == chunk["targets"]
        return {"nll": jnp.where(chunk["mask"], nll, 0.0), "correct": chunk["mask"] & correct}

    out = chunked_map(one, {"hidden": hidden, "targets": targets, "mask": mask}, chunk_size=chunk_size, token_ndim=1)
    return out["nll"], out["correct"]


def _shifted(model: nnx.Module, batch: dict):
    """Hidden states at t-1 and targets/masks at t, flattened: ``[N, D]``, ``[N]``, ``[N]`` with N = B·(T-1)."""
    tokens = batch["tokens"]
    out = model(tokens, positions=batch.get("positions"), valid=batch.get("valid"), return_logits=False,
                return_hidden=True)
    B, T = tokens.shape
    hidden = out.hidden[:, :-1].reshape(B * (T - 1), -1)  # [N, D]
    targets = tokens[:, 1:].reshape(-1).astype(jnp.int32)  # [N]
    mask = batch["loss_mask"][:, 1:].reshape(-1).astype(bool)  # [N]
    return hidden, targets, mask


def _token_stats(model, batch, args: SFTArgs):
    hidden, targets, mask = _shifted(model, batch)
    graphdef, state = nnx.split(model)

    def logits_fn(h):
        return nnx.merge(graphdef, state).logits(h)

    nll, correct = chunked_token_stats(logits_fn, hidden, targets, mask, chunk_size=args.chunk_size,
                                       label_smoothing=args.label_smoothing)
    return nll, correct, mask


@OBJECTIVES.register("sft", SFTArgs)
def sft_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: SFTArgs = SFTArgs()):
    """SFT loss ``(Σ masked CE, Σ loss_mask, aux)``; aux ``token_accuracy`` is token-weighted (a plain sum)."""
    del rng
    nll, correct, mask = _token_stats(model, batch, args)
    return jnp.sum(nll), jnp.sum(mask).astype(jnp.float32), {"token_accuracy": jnp.sum(correct).astype(jnp.float32)}


def sft_metrics(model: nnx.Module, batch: dict, args: SFTArgs = SFTArgs()) -> dict:
    """Teacher-forced eval metrics as ``(sum, count)`` pairs: ``loss`` (per token), ``token_accuracy`` (argmax ==
    target) and ``exact_match`` (rows whose every response token is predicted correctly; rows without response
    tokens are not counted)."""
    nll, correct, mask = _token_stats(model, batch, args)
    B = batch["tokens"].shape[0]
    row_mask = mask.reshape(B, -1)
    row_ok = jnp.all(correct.reshape(B, -1) | ~row_mask, axis=-1)
    has = jnp.any(row_mask, axis=-1)
    n = jnp.sum(mask).astype(jnp.float32)
    return {"loss": (jnp.sum(nll), n), "token_accuracy": (jnp.sum(correct).astype(jnp.float32), n),
            "exact_match": (jnp.sum(row_ok & has).astype(jnp.float32), jnp.sum(has).astype(jnp.float32))}
