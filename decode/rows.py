"""Per-row buffer writes, sampling and stop handling shared by the multi-token decoding loops (speculative decoding
and EAD in :mod:`jaxtok.decode.speculative`, its continuous-batching engine :mod:`jaxtok.decode.serving`, lexical
unit decoding in :mod:`jaxtok.decode.lud`): every row of a batch sits at its own offset of a fixed buffer and draws
from its own sampling parameters (:class:`~jaxtok.sampling.RowParams`)."""

from __future__ import annotations

import contextvars

import jax
import jax.numpy as jnp

from jaxtok import sampling
from jaxtok.sampling import RowParams

from .generate import _argmax

def rows_slice(buf: jax.Array, start: jax.Array, width: int) -> jax.Array:
    """``buf [B, S, ...]`` -> ``[B, width, ...]`` taken at per-row offsets ``start [B]`` (in range by construction)."""
    def one(row, s):
        return jax.lax.dynamic_slice_in_dim(row, s, width, axis=0)

    return jax.vmap(one)(buf, start)


def rows_write(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write ``new [B, T, ...]`` into ``buf [B, S, ...]`` at per-row offsets ``start [B]``."""
    def one(row, x, s):
        return jax.lax.dynamic_update_slice_in_dim(row, x.astype(row.dtype), s, axis=0)

    return jax.vmap(one)(buf, new, start)


ALL_GREEDY = contextvars.ContextVar("jaxtok_decode_all_greedy", default=False)


def greedy_tokens(logits) -> jax.Array:
    """``argmax`` over the last axis of ``logits [..., V]`` (blocked, as generate's all-greedy path)."""
    lead = logits.shape[:-1]
    return _argmax(logits.reshape(-1, logits.shape[-1])).reshape(lead)


def sample_rows(key, logits, params: RowParams) -> jax.Array:
    """Tokens drawn from S(logits) for ``logits [B, ..., V]`` with per-row params (argmax where T = 0). While a
    loop over an all-greedy batch is traced (``ALL_GREEDY``), the argmax alone: no ``[B, ..., V]`` Gumbel draw."""
    if ALL_GREEDY.get():
        return greedy_tokens(logits)
    return params.sample(key, logits).tokens


def processed_probs(logits, params: RowParams) -> jax.Array:
    """The processed distribution S(logits) as probabilities, float32 ``[B, ..., V]``."""
    return jax.nn.softmax(params.process(logits), axis=-1)


def token_logprob(logits, tokens, params: RowParams) -> jax.Array:
    """``log S(logits)[tokens]``: log-probability of ``tokens [B, ...]`` under the processed distribution of
    ``logits [B, ..., V]`` (``log_softmax`` of :func:`jaxtok.sampling.process_logits`, float32; temperature-0 rows at
    temperature 1), the per-token log-prob :func:`jaxtok.decode.generate.generate` reports. ``[B, ...]``."""
    return sampling.token_log_probs(jax.nn.log_softmax(params.process(logits), axis=-1), tokens)


def token_prob(logits, tokens, params: RowParams) -> jax.Array:
    """``q(d) = S(logits)[d]``: the probability of the sampled drafts ``tokens [B, ...]`` under the draft
    distribution of ``logits [B, ..., V]`` (greedy rows: the untempered softmax), float32 ``[B, ...]``."""
    return jnp.take_along_axis(processed_probs(logits, params), tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def kept_tokens(emitted, nacc, count, live, stop, max_new_tokens: int):
    """Step 5's cut: how many of a round's ``emitted [B, γ+1]`` tokens each row commits -> ``(n_emit [B], hit [B])``:
    the accepted drafts and the next token, cut after the first stop token (``hit``) and at ``max_new_tokens``
    (``count [B]`` already emitted); 0 for frozen rows."""
    j = jnp.arange(emitted.shape[1])[None, :]
    n_emit = jnp.minimum(nacc + 1, max_new_tokens - count)  # [B]
    is_stop = jnp.any(emitted[..., None] == stop, axis=-1) & (j < n_emit[:, None])
    hit = jnp.any(is_stop, axis=1)
    n_emit = jnp.where(hit, sampling.first_true_index(is_stop) + 1, n_emit)
    return jnp.where(live, n_emit, 0), hit
