"""Masked-diffusion (MDLM / LLaDA) and block-diffusion (BD3-LM) losses on SFT batches.

``mdlm`` (Sahoo et al. 2024; LLaDA, Nie et al. 2025): per row draw ``t ~ U(t_min, 1]``, replace every token of the
loss region by ``mask_id`` independently with probability ``t``, run the model with *bidirectional* attention and
score the original tokens at the masked positions with ``CE / t``::

    loss_sum = Σ_rows Σ_{i masked} -log p_θ(x_i | x_t) / t_row          count = Σ_rows |loss region|

``loss_sum / count`` is the per-token negative ELBO (its expectation over the masking is ``Σ_i E[CE_i]`` per
token), weighted by tokens across rows. LLaDA's SFT script instead divides each row by its own answer length and
averages rows; the token-weighted normaliser is chosen here so accumulation and multi-device reduction stay exact
(DESIGN.md, "(sum, count)").

Loss region (``scope``): ``response`` masks only the response (``loss_mask``: the target and ``<eos>``) — LLaDA's
SFT variant, the prompt is always visible; ``all`` masks every valid token after the first (pre-training).

Padded tail (``tail``; B20 Rainbow Padding): SFT rows are right-padded after ``<eos>``. ``none`` leaves the tail as
padding (never attended, never scored); ``eos`` fills it with ``<eos>`` and scores it (LLaDA: the model learns to
emit the length); ``rainbow`` fills it with the cycle ``rainbow_first_id, ..., rainbow_first_id + K - 1,
rainbow_first_id, ...`` after the single ``<eos>`` (K = ``rainbow_pads``; the task tokenizer's ``<pad_1..7>`` are ids
4..10). The filled tail becomes valid, part of the loss region, and positions are recomputed. Decoding must treat
the pad ids as terminators (``jaxtok.decode.diffusion_generate(stop_tokens=...)``).

Dream-style AR adaptation (``shift_logits``): token i is predicted from the hidden state at i-1 (decode_methods.md
§0.4), so a causal checkpoint keeps its next-token head. A model whose config already says ``shift_logits`` is
always shifted.

``bd3lm`` (Arriola et al. 2025): the sequence is cut into blocks of ``block_size`` positions (``position //
block_size``, the model's ``block_causal`` convention). Every block b gets its own ``t_b``; block b is denoised from
the *clean* blocks before it and its noised self. The model's attention kinds cannot express BD3-LM's 2L mask, so
the loss runs one copy of each row per block (copy b holds clean blocks < b, noised block b, nothing after) under
``block_causal`` attention: exact, at ``num_blocks``× the compute of one forward. Same ``(sum, count)`` contract.

Memory: float32 log-softmax over token chunks (:func:`jaxtok.train.objectives.sft.chunked_token_stats`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtok.registry import OBJECTIVES
from jaxtok.train.objectives.sft import chunked_token_stats

DEFAULT_MASK_ID = 3  # "<mask>" of the task tokenizer
DEFAULT_EOS_ID = 2
RAINBOW_FIRST_ID = 4  # "<pad_1>"; "<pad_7>" = 10


@dataclasses.dataclass(frozen=True)
class MDLMArgs:
    """Arguments of ``mdlm`` (module docstring).

    ``mask_id``: None = the model config's ``mask_token_id`` (3 when it has none). ``t_min``: lower end of the
    noise level (LLaDA's ε = 1e-3 keeps ``1/t`` bounded). ``attention``: ``bidirectional`` (MDLM/LLaDA) or
    ``block_causal`` with ``block_size`` (one-pass block-diffusion approximation: later blocks see noised earlier
    ones; use ``bd3lm`` for the exact loss)."""

    mask_id: Optional[int] = None
    scope: Literal["response", "all"] = "response"
    tail: Literal["none", "eos", "rainbow"] = "eos"
    eos_id: int = DEFAULT_EOS_ID
    rainbow_first_id: int = RAINBOW_FIRST_ID
    rainbow_pads: int = 7
    shift_logits: bool = False
    attention: Literal["bidirectional", "block_causal"] = "bidirectional"
    block_size: Optional[int] = None
    t_min: float = 1e-3
    chunk_size: int = 1024

    def __post_init__(self):
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"t_min={self.t_min}: allowed (0, 1)")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size}: must be >= 1")
        if self.rainbow_pads < 1:
            raise ValueError(f"rainbow_pads={self.rainbow_pads}: must be >= 1")
        if self.attention == "block_causal" and not (self.block_size and self.block_size > 0):
            raise ValueError(f"attention='block_causal' needs a positive block_size, got {self.block_size!r}")


@dataclasses.dataclass(frozen=True)
class BD3LMArgs(MDLMArgs):
    """Arguments of ``bd3lm``: ``block_size`` (required, the model's block-causal block length) and the ``mdlm``
    options except ``attention`` (always ``block_causal``) and ``shift_logits`` (not supported)."""

    attention: Literal["block_causal"] = "block_causal"
    block_size: Optional[int] = 4

    def __post_init__(self):
        super().__post_init__()
        if self.shift_logits:
            raise ValueError("shift_logits=True: bd3lm predicts position-aligned tokens; allowed only false")


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------------------


def fill_tail(tokens: jax.Array, valid: jax.Array, loss_mask: jax.Array, mode: str, *, eos_id: int = DEFAULT_EOS_ID,
              first_id: int = RAINBOW_FIRST_ID, num_pads: int = 7):
    """Fill the right-padded tail after each row's last valid token (B20).

    ``tokens/valid/loss_mask [B, T]`` -> the same three with the tail filled: ``eos`` writes ``eos_id``,
    ``rainbow`` writes ``first_id + (j mod num_pads)`` at tail slot j = 0, 1, ...; both make the tail valid and part of
    ``loss_mask``. ``none`` returns the inputs. Left padding (before the first valid token) is never touched. Rows
    without any valid token are left alone.
    """
    if mode == "none":
        return tokens, valid, loss_mask
    if mode not in ("eos", "rainbow"):
        raise ValueError(f"tail={mode!r}: allowed 'none', 'eos', 'rainbow'")
    seen = jnp.cumsum(valid.astype(jnp.int32), axis=1)  # [B, T]
    tail = ~valid & (seen == seen[:, -1:]) & (seen > 0)  # after the last valid token
    j = jnp.cumsum(tail.astype(jnp.int32), axis=1) - 1  # tail slot index
    fill = jnp.full_like(tokens, eos_id) if mode == "eos" else (first_id + j % num_pads).astype(tokens.dtype)
    return jnp.where(tail, fill, tokens), valid | tail, loss_mask | tail


def loss_region(valid: jax.Array, loss_mask: jax.Array, scope: str) -> jax.Array:
    """``[B, T]`` positions that may be masked and scored: the response (``loss_mask``) or every valid token after
    the row's first (``all``)."""
    if scope == "response":
        return loss_mask.astype(bool) & valid
    if scope == "all":
        first = jnp.cumsum(valid.astype(jnp.int32), axis=1) == 1
        return valid & ~(first & valid)
    raise ValueError(f"scope={scope!r}: allowed 'response', 'all'")


def sample_noise(rng: jax.Array, shape, t_min: float):
    """``t ~ U(t_min, 1]`` of ``shape``: ``1 - (1 - t_min) u``, u in [0, 1)."""
    u = jax.random.uniform(rng, shape, jnp.float32)
    return 1.0 - (1.0 - t_min) * u


def mask_tokens(rng: jax.Array, tokens: jax.Array, region: jax.Array, t: jax.Array, mask_id: int):
    """Forward process q(x_t | x_0): each ``region`` token becomes ``mask_id`` with probability ``t`` (broadcast to
    ``[B, T]``). Returns ``(noised tokens, masked [B, T] bool)``."""
    u = jax.random.uniform(rng, tokens.shape, jnp.float32)
    masked = region & (u < t)
    return jnp.where(masked, jnp.asarray(mask_id, tokens.dtype), tokens), masked


def _mask_id(model, args: MDLMArgs) -> int:
    if args.mask_id is not None:
        return int(args.mask_id)
    mid = getattr(model.cfg, "mask_token_id", None)
    return DEFAULT_MASK_ID if mid is None else int(mid)


def _prepare(batch: dict, args: MDLMArgs):
    """Tokens, valid, positions and the loss region of an SFT batch after the tail fill."""
    tokens = batch["tokens"].astype(jnp.int32)
    valid = batch["valid"].astype(bool)
    loss_mask = batch["loss_mask"].astype(bool)
    tokens, new_valid, loss_mask = fill_tail(tokens, valid, loss_mask, args.tail, eos_id=args.eos_id,
                                             first_id=args.rainbow_first_id, num_pads=args.rainbow_pads)
    if args.tail == "none" and "positions" in batch:
        positions = batch["positions"].astype(jnp.int32)
    else:
        positions = jnp.maximum(jnp.cumsum(new_valid.astype(jnp.int32), axis=1) - 1, 0)
    return tokens, new_valid, positions, loss_region(new_valid, loss_mask, args.scope)


def _scored(model: nnx.Module, inputs, positions, valid, targets, scored, *, attention, block_size, shift,
            chunk_size):
    """Per-token CE of ``targets`` where ``scored`` under the model run on ``inputs``: ``(nll [B,T], correct [B,T])``.

    ``shift``: token i is read from the hidden state at i-1 (position 0 is never scored)."""
    B, T = inputs.shape
    out = model(inputs, positions=positions, valid=valid, attention=attention, block_size=block_size,
                return_logits=False, return_hidden=True)
    hidden = out.hidden  # [B, T, D]
    if shift:
        hidden = jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1)
        scored = scored & (jnp.arange(T)[None, :] > 0)
    graphdef, state = nnx.split(model)

    def logits_fn(h):
        return nnx.merge(graphdef, state).logits(h)

    nll, correct = chunked_token_stats(logits_fn, hidden.reshape(B * T, -1), targets.reshape(-1),
                                       scored.reshape(-1), chunk_size=chunk_size)
    return nll.reshape(B, T), correct.reshape(B, T)


# ----------------------------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------------------------


@OBJECTIVES.register("mdlm", MDLMArgs, eval="diffusion")
def mdlm_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: MDLMArgs = MDLMArgs()):
    """Masked-diffusion loss ``(Σ_masked CE/t, |loss region|, aux)`` (module docstring).

    aux: ``masked_accuracy`` (argmax == target on masked tokens, as ``(sum, count)``) and ``masked_fraction``.
    """
    tokens, valid, positions, region = _prepare(batch, args)
    B, _ = tokens.shape
    k_t, k_mask = jax.random.split(rng)
    t = sample_noise(k_t, (B, 1), args.t_min)  # [B, 1]
    noised, masked = mask_tokens(k_mask, tokens, region, t, _mask_id(model, args))
    shift = bool(args.shift_logits or getattr(model.cfg, "shift_logits", False))
    nll, correct = _scored(model, noised, positions, valid, tokens, masked, attention=args.attention,
                           block_size=args.block_size, shift=shift, chunk_size=args.chunk_size)
    count = jnp.sum(region).astype(jnp.float32)
    n_masked = jnp.sum(masked).astype(jnp.float32)
    aux = {"masked_accuracy": (jnp.sum(correct).astype(jnp.float32), n_masked), "masked_fraction": n_masked}
    return jnp.sum(nll / t), count, aux


@OBJECTIVES.register("bd3lm", BD3LMArgs, eval="diffusion")
def bd3lm_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: BD3LMArgs = BD3LMArgs()):
    """Block-diffusion loss ``(Σ_b Σ_{masked in b} CE/t_b, |loss region|, aux)`` (module docstring): every row is
    copied once per block b (clean blocks < b, block b noised at its own ``t_b``, later blocks invalid) and run under
    ``block_causal`` attention; only block b of copy b is scored."""
    tokens, valid, positions, region = _prepare(batch, args)
    B, T = tokens.shape
    bs = int(args.block_size)
    nb = math.ceil(T / bs)
    blk = positions // bs  # [B, T] block of each position (the model's block_causal convention)
    k_t, k_mask = jax.random.split(rng)
    t = sample_noise(k_t, (nb, B, 1), args.t_min)  # [nb, B, 1]
    b_idx = jnp.arange(nb)[:, None, None]  # [nb, 1, 1]
    in_b = (blk[None] == b_idx) & region[None]  # [nb, B, T]
    noised, masked = mask_tokens(k_mask, jnp.broadcast_to(tokens, (nb, B, T)), in_b, t, _mask_id(model, args))
    copy_valid = valid[None] & (blk[None] <= b_idx)  # [nb, B, T]
    flat = lambda a: a.reshape((nb * B,) + a.shape[2:])  # noqa: E731
    nll, correct = _scored(model, flat(noised), flat(jnp.broadcast_to(positions, (nb, B, T))), flat(copy_valid),
                           flat(jnp.broadcast_to(tokens, (nb, B, T))), flat(masked), attention="block_causal",
                           block_size=bs, shift=False, chunk_size=args.chunk_size)
    weighted = nll.reshape(nb, B, T) / t
    count = jnp.sum(region).astype(jnp.float32)
    n_masked = jnp.sum(masked).astype(jnp.float32)
    aux = {"masked_accuracy": (jnp.sum(correct).astype(jnp.float32), n_masked), "masked_fraction": n_masked}
    return jnp.sum(weighted), count, aux
