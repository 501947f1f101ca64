"""LUD (Lexical Unit Decoding, arXiv:2405.15208; decode_methods.md §A8): fine-tune an AR model to emit several tokens
of a *lexical unit* in one forward, from placeholder inputs, with no new head or architecture.

No code was released; the construction below is INFERRED from the paper's description (units = spans of contiguous
tokens the pretrained model predicts confidently; training data reconfigured so the same model predicts them in
parallel). Shifted convention as :mod:`~jaxtok.train.objectives.sft`: token ``t`` is predicted by the output at
column ``t - 1``; ``loss_mask[t]`` marks response tokens.

1. **Confidence** (frozen base model θ0 = ``reference``, teacher-forced, no gradient):
   ``c_t = p_θ0(x_t | x_<t)`` on response tokens.
2. **Lexical units** (:func:`lexical_units`): maximal runs of contiguous response tokens with ``c_t ≥ τ``
   (``args.threshold``); ``run_end[t]`` = one past the last token of the run holding ``t``.
3. **Windows** (:func:`window_starts`, :func:`lud_window`): a window starts at column ``s`` whose next two tokens
   ``x_{s+1}, x_{s+2}`` lie in one unit (so at least one unit token is predicted from a placeholder). Its input
   keeps ``x_≤s`` and replaces columns ``s+1 .. s+k-1`` by the placeholder id (``args.placeholder_id``, the
   character tokenizer's ``<mask>``, id 3, which no task text contains) — exactly what the decoder feeds
   (:mod:`jaxtok.decode.lud`: the newest committed token, then k-1 placeholders). Labels are the TRUE tokens
   ``x_{s+2} .. x_{s+k}`` at the placeholder outputs: weight 1 inside the unit (``t < run_end[s+1]``),
   ``args.outside_weight`` on response tokens after it (the negative examples that keep the placeholder
   confidences calibrated, which the decoder's threshold α relies on), 0 beyond the response. Columns after the
   window see placeholders in their context (never the case at decode time) and carry no loss.
   Per row ``args.windows`` starts are drawn uniformly among the eligible ones (``rng``); rows without a unit of
   length ≥ 2 give no window.
4. **Loss** (mixed, so next-token prediction and k = 1 decoding stay trained): the plain SFT cross-entropy of the
   clean sequence plus ``args.lud_weight`` × the window cross-entropy:
   ``(Σ CE_sft + λ Σ w·CE_lud) / (N_sft + λ Σ w)``.

Aux: ``token_accuracy`` (clean), ``lud_accuracy`` (placeholder outputs inside units), ``confident_frac`` (response
tokens with ``c_t ≥ τ``), ``unit_tokens`` (mean tokens per unit), ``window_rows`` (rows with a window).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.train.objectives.distill import _head
from jaxtok.train.objectives.policy_gradient import require_keys
from jaxtok.train.objectives.sft import chunked_token_stats

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class LUDArgs:
    """``threshold`` τ: a response token is confident when θ0 gives it probability ≥ τ; ``k``: window = the newest
    real token + k-1 placeholders (k outputs: the decoder's largest useful k); ``placeholder_id``: the reserved
    input id (default 3 = ``<mask>`` of the character tokenizer); ``outside_weight``: loss weight of window labels
    after the unit ends; ``lud_weight`` λ of the window loss beside the clean SFT loss; ``windows``: windows drawn
    per row per step; ``chunk_size``: tokens per float32 log-softmax chunk."""

    threshold: float = 0.9
    k: int = 8
    placeholder_id: int = 3
    outside_weight: float = 1.0
    lud_weight: float = 1.0
    windows: int = 2
    chunk_size: int = 1024

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold}: allowed [0, 1]")
        if self.k < 2:
            raise ValueError(f"k={self.k}: allowed an integer >= 2 (a window needs at least one placeholder)")
        if self.placeholder_id < 0:
            raise ValueError(f"placeholder_id={self.placeholder_id}: allowed a token id >= 0")
        if self.outside_weight < 0 or self.lud_weight < 0:
            raise ValueError(f"outside_weight={self.outside_weight}, lud_weight={self.lud_weight}: allowed >= 0")
        if self.windows < 1 or self.chunk_size < 1:
            raise ValueError(f"windows={self.windows}, chunk_size={self.chunk_size}: allowed >= 1")


# ----------------------------------------------------------------------------------------------------------------
# Training data construction (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def lexical_units(confident: jax.Array) -> jax.Array:
    """``run_end [B, T]`` int32: for a confident token ``t`` (``confident [B, T]`` bool, already restricted to
    response tokens) one past the last token of the maximal confident run holding it; ``t`` itself where not
    confident. A lexical unit is ``[start, run_end[start])`` for a run's first token."""
    _, t = confident.shape
    idx = jnp.arange(t, dtype=jnp.int32)

    def back(nxt, col):  # scan from the right: run_end[t] = run_end[t+1] if t confident and t+1 confident
        conf_t, i, conf_next = col
        end = jnp.where(conf_t, jnp.where(conf_next, nxt, i + 1), i)
        return end, end

    conf_next = jnp.concatenate([confident[:, 1:], jnp.zeros_like(confident[:, :1])], axis=1)
    init = jnp.full((confident.shape[0],), t, jnp.int32)
    _, ends = jax.lax.scan(back, init, (confident.T, jnp.broadcast_to(idx[:, None], confident.T.shape),
                                        conf_next.T), reverse=True)
    return ends.T.astype(jnp.int32)


def window_starts(confident: jax.Array) -> jax.Array:
    """``[B, T]`` bool: columns ``s`` where a window may start — ``x_{s+1}`` and ``x_{s+2}`` are both confident (one
    unit), so the first placeholder output predicts a unit token."""
    nxt = jnp.pad(confident[:, 1:], ((0, 0), (0, 1)))
    nxt2 = jnp.pad(confident[:, 2:], ((0, 0), (0, 2)))
    return nxt & nxt2


def lud_window(tokens: jax.Array, loss_mask: jax.Array, run_end: jax.Array, start: jax.Array, has: jax.Array, *,
               k: int, placeholder_id: int, outside_weight: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """One LUD window per row -> ``(inputs [B, T] int32, weights [B, T] float32)``.

    ``inputs``: ``tokens`` with columns ``start+1 .. start+k-1`` replaced by ``placeholder_id``; ``weights[t]``
    (label index: token ``t`` scored at output ``t-1``) is 1 for ``t`` in ``start+2 .. min(run_end[start+1],
    start+k+1) - 1`` (unit tokens predicted from a placeholder), ``outside_weight`` for the window's later response
    tokens (``t ≤ start + k``, ``loss_mask[t]``), 0 elsewhere and on rows with ``has`` False (inputs unchanged)."""
    b, t = tokens.shape
    col = jnp.arange(t, dtype=jnp.int32)[None, :]
    s = start[:, None].astype(jnp.int32)
    ph = has[:, None] & (col > s) & (col < s + k)
    inputs = jnp.where(ph, placeholder_id, tokens).astype(jnp.int32)
    end = jnp.take_along_axis(run_end, jnp.minimum(start + 1, t - 1)[:, None], axis=1)  # [B, 1]
    in_win = has[:, None] & (col >= s + 2) & (col <= s + k) & loss_mask.astype(bool)
    w = jnp.where(col < end, 1.0, outside_weight)
    return inputs, jnp.where(in_win, w, 0.0).astype(_F32)


def draw_starts(rng: jax.Array, eligible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A uniform start per row among ``eligible [B, T]`` (Gumbel argmax) -> ``(start [B] int32, has [B] bool)``."""
    g = jax.random.gumbel(rng, eligible.shape)
    start = jnp.argmax(jnp.where(eligible, g, -jnp.inf), axis=1).astype(jnp.int32)
    return start, jnp.any(eligible, axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------------------------


def _nll(model: nnx.Module, inputs, batch, targets, mask, chunk_size: int):
    """``(nll [B, T-1], correct [B, T-1])`` of ``targets [B, T-1]`` at outputs ``0..T-2`` of ``model(inputs)``."""
    b, t = inputs.shape
    out = model(inputs, positions=batch.get("positions"), valid=batch.get("valid"), return_logits=False,
                return_hidden=True)
    hidden = out.hidden[:, :-1].reshape(b * (t - 1), -1)
    nll, correct = chunked_token_stats(_head(model), hidden, targets.reshape(-1), mask.reshape(-1),
                                       chunk_size=chunk_size)
    return nll.reshape(b, t - 1), correct.reshape(b, t - 1)


def confidences(reference: nnx.Module, batch: dict, chunk_size: int) -> jax.Array:
    """``c [B, T]`` float32: θ0's teacher-forced probability of each token (0 at column 0 and off the response)."""
    tokens = batch["tokens"]
    mask = jnp.asarray(batch["loss_mask"], bool)
    nll, _ = _nll(reference, tokens, batch, tokens[:, 1:].astype(jnp.int32), mask[:, 1:], chunk_size)
    c = jnp.where(mask[:, 1:], jnp.exp(-nll), 0.0)
    return jax.lax.stop_gradient(jnp.pad(c, ((0, 0), (1, 0))))


@OBJECTIVES.register("lud", LUDArgs, data="sft", models=("reference",))
def lud_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: LUDArgs = LUDArgs(), *,
             reference: Optional[nnx.Module] = None):
    """LUD fine-tuning loss (module docstring): clean SFT CE + λ × placeholder-window CE on lexical units of θ0."""
    if reference is None:
        raise ConfigError("objective 'lud' needs the frozen base model that defines the lexical units: set "
                          "rollout.reference: init (the model.init_from weights)")
    require_keys(batch, ("tokens", "loss_mask"), "lud")
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    mask = jnp.asarray(batch["loss_mask"], bool)
    targets = tokens[:, 1:]
    nll, correct = _nll(model, tokens, batch, targets, mask[:, 1:], args.chunk_size)  # clean next-token CE
    n_sft = jnp.sum(mask[:, 1:]).astype(_F32)

    conf = confidences(reference, batch, args.chunk_size)
    confident = mask & (conf >= args.threshold)  # [B, T]
    run_end = lexical_units(confident)
    eligible = window_starts(confident)
    w_sum = jnp.zeros((), _F32)
    lud_sum = jnp.zeros((), _F32)
    lud_ok = jnp.zeros((), _F32)
    lud_n = jnp.zeros((), _F32)
    rows = jnp.zeros((), _F32)
    for i in range(args.windows):
        start, has = draw_starts(jax.random.fold_in(rng, i), eligible)
        inputs, w = lud_window(tokens, mask, run_end, start, has, k=args.k, placeholder_id=args.placeholder_id,
                               outside_weight=args.outside_weight)
        wl = w[:, 1:]
        nll_w, corr_w = _nll(model, inputs, batch, targets, wl > 0, args.chunk_size)
        lud_sum += jnp.sum(wl * nll_w)
        w_sum += jnp.sum(wl)
        in_unit = wl >= 1.0
        lud_ok += jnp.sum(corr_w & in_unit).astype(_F32)
        lud_n += jnp.sum(in_unit).astype(_F32)
        rows += jnp.sum(has).astype(_F32)
    lam = args.lud_weight
    starts = confident & ~jnp.pad(confident[:, :-1], ((0, 0), (1, 0)))  # first token of each unit
    aux = {"token_accuracy": (jnp.sum(correct).astype(_F32), n_sft),
           "lud_accuracy": (lud_ok, lud_n),
           "confident_frac": (jnp.sum(confident).astype(_F32), jnp.sum(mask).astype(_F32)),
           "unit_tokens": (jnp.sum(confident).astype(_F32), jnp.sum(starts).astype(_F32)),
           "window_rows": (rows, jnp.asarray(args.windows * tokens.shape[0], _F32))}
    return jnp.sum(nll) + lam * lud_sum, n_sft + lam * w_sum, aux
