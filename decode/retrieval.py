"""DiffRetriever: representative tokens of a diffusion LM as a retriever (decode_methods.md B22; ielab/diffretriever).

A text (query or passage) is wrapped in a retrieval prompt, ``K`` ``[MASK]`` positions are appended (plus ``tail``
extra masks that absorb the closing structure, so the first K hold content), and ONE bidirectional forward reads

- **dense**: the K final-normed hidden states at the mask positions, ``[B, K, D]``, L2-normalised per vector; scored
  ColBERT-style, ``maxsim(q, p) = (1/K_q) Σ_i max_j <q_i, p_j>`` (or mean-pooled cosine, ``dense_mean``);
- **sparse**: the K logit vectors max-pooled over positions, ``w_v = log(1 + relu(max_k logits[k, v]))`` with special
  tokens zeroed (PromptReps' lexical weights), ``[B, V]``; scored by the dot product ``Σ_v w_q[v] · w_p[v]``;
- ``sparse_cos`` [ours]: the same weights L2-normalised (cosine), which removes the dot product's preference for
  passages with many large weights (hubs) in a small vocabulary;
- **hybrid**: per query, both score rows min-max normalised to [0, 1] over the candidates and summed [ours; the
  reference fuses dense and sparse rankings with its own normalisation].

PromptReps' multi-token reading with an AR model needs K SEQUENTIAL forwards (generate a token, read the hidden
state / next-token logits, append, repeat); two such readers are here for comparison:

- :func:`encode_sequential`: the same diffusion model decoding the K positions left to right, one per forward
  (commit the argmax at position j, read position j+1 in the next forward), K full forwards;
- :func:`encode_autoregressive`: a causal LM with a KV cache: prefill, then K-1 one-token steps; the representation
  of step j is the hidden state / logits that predict representative j (PromptReps).

``K = 1`` of the one-pass read is the single-token read (one mask), and the first vector of every reader with the
same prompt is the same forward's read. No training here: frozen model, zero-shot (the paper also fine-tunes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.models import KVCache

__all__ = ["Reps", "append_masks", "sparse_weights", "normalise", "maxsim_scores", "mean_dense_scores",
           "sparse_scores", "minmax_rows", "hybrid_scores", "recall_at", "encode_parallel", "encode_sequential",
           "encode_autoregressive", "score_all", "SCORERS"]

_EPS = 1e-12


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Reps:
    """Representations of B texts: ``dense [B, K, D]`` (unit vectors), ``sparse [B, V]`` (non-negative lexical
    weights), ``tokens [B, K]`` (the argmax representative tokens, for inspection)."""

    dense: jax.Array
    sparse: jax.Array
    tokens: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------


def append_masks(prompt, prompt_valid, n: int, mask_id: int):
    """``[B, P]`` left-padded prompt -> ``(tokens [B, P + n], valid [B, P + n])`` with ``n`` ``mask_id`` columns."""
    b = prompt.shape[0]
    tokens = jnp.concatenate([jnp.asarray(prompt, jnp.int32), jnp.full((b, n), mask_id, jnp.int32)], axis=1)
    valid = jnp.concatenate([jnp.asarray(prompt_valid, bool), jnp.ones((b, n), bool)], axis=1)
    return tokens, valid


def normalise(x: jax.Array) -> jax.Array:
    """L2-normalise the last axis (a zero vector stays zero)."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def sparse_weights(logits: jax.Array, exclude_ids: Sequence[int] = ()) -> jax.Array:
    """PromptReps / DiffRetriever sparse vector ``[B, V]`` from K logit vectors ``[B, K, V]``:
    ``log(1 + relu(max_k logits[:, k, v]))``, zero at ``exclude_ids`` (mask and special tokens)."""
    w = jnp.log1p(jax.nn.relu(jnp.max(jnp.asarray(logits, jnp.float32), axis=1)))  # [B, V]
    if len(exclude_ids):
        w = w.at[:, jnp.asarray(tuple(exclude_ids), jnp.int32)].set(0.0)
    return w


def maxsim_scores(q: jax.Array, p: jax.Array) -> jax.Array:
    """ColBERT MaxSim ``[Q, P]``: ``(1/K_q) Σ_i max_j <q_i, p_j>`` for unit vectors ``q [Q, Kq, D]``,
    ``p [P, Kp, D]``."""
    sim = jnp.einsum("qid,pjd->qpij", q, p)  # [Q, P, Kq, Kp]
    return jnp.mean(jnp.max(sim, axis=-1), axis=-1)


def mean_dense_scores(q: jax.Array, p: jax.Array) -> jax.Array:
    """Cosine ``[Q, P]`` of the mean-pooled K vectors (the reference's single-vector promptreps mode)."""
    return normalise(jnp.mean(q, axis=1)) @ normalise(jnp.mean(p, axis=1)).T


def sparse_scores(q: jax.Array, p: jax.Array) -> jax.Array:
    """Lexical dot product ``[Q, P]`` of sparse weights ``q [Q, V]``, ``p [P, V]``."""
    return jnp.asarray(q, jnp.float32) @ jnp.asarray(p, jnp.float32).T


def minmax_rows(s: jax.Array) -> jax.Array:
    """Each row of ``s [Q, P]`` mapped to [0, 1] (a constant row becomes 0)."""
    lo = jnp.min(s, axis=-1, keepdims=True)
    hi = jnp.max(s, axis=-1, keepdims=True)
    return (s - lo) / jnp.maximum(hi - lo, _EPS)


def hybrid_scores(q: Reps, p: Reps) -> jax.Array:
    """``minmax(maxsim) + minmax(sparse)`` per query row ``[Q, P]`` (module docstring)."""
    return minmax_rows(maxsim_scores(q.dense, p.dense)) + minmax_rows(sparse_scores(q.sparse, p.sparse))


SCORERS = {
    "dense": lambda q, p: maxsim_scores(q.dense, p.dense),
    "dense_mean": lambda q, p: mean_dense_scores(q.dense, p.dense),
    "sparse": lambda q, p: sparse_scores(q.sparse, p.sparse),
    "sparse_cos": lambda q, p: sparse_scores(normalise(q.sparse), normalise(p.sparse)),  # ours: length-normalised
    "hybrid": hybrid_scores,
}


def recall_at(scores, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """``recall@k`` for one relevant passage per query: the share of queries whose passage ``relevant[q]`` ranks in
    the top k of ``scores[q]`` (``[Q, P]``). Ties count against the query (its passage must beat every tied
    candidate: rank = #candidates scoring >= it, itself included), so a constant scorer gets recall 0, not 1.
    Also ``mrr`` (mean reciprocal rank under the same tie rule)."""
    s = np.asarray(scores, np.float64)
    rel = np.asarray(relevant, np.int64)
    own = s[np.arange(len(rel)), rel]
    rank = np.sum(s >= own[:, None], axis=1)  # 1 = strictly best
    out = {f"recall@{k}": float(np.mean(rank <= k)) for k in ks}
    out["mrr"] = float(np.mean(1.0 / rank))
    return out


def score_all(q: Reps, p: Reps, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """``{scorer: recall_at(...)}`` for every scorer of :data:`SCORERS`."""
    return {name: recall_at(fn(q, p), relevant, ks) for name, fn in SCORERS.items()}


# ----------------------------------------------------------------------------------------------------------------
# Readers (jitted; the model's graph is static, its state traced)
# ----------------------------------------------------------------------------------------------------------------


def _read_cols(p: int, k: int, shift: bool) -> jax.Array:
    """Columns whose hidden state predicts mask positions ``p .. p+k-1`` (Dream-style shifted models: one earlier)."""
    return p + jnp.arange(k, dtype=jnp.int32) - (1 if shift else 0)


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "tail", "mask_id", "exclude_ids"))
def _parallel(graphdef, state, prompt, prompt_valid, *, k, tail, mask_id, exclude_ids):
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    tokens, valid = append_masks(prompt, prompt_valid, k + tail, mask_id)  # [B, P+K+tail]
    cols = jnp.broadcast_to(_read_cols(p, k, model.cfg.shift_logits), (b, k))
    out = model(tokens, valid=valid, attention="bidirectional", return_hidden=True,
                logits_at=cols + (1 if model.cfg.shift_logits else 0))  # logits_at shifts back itself
    hidden = jnp.take_along_axis(out.hidden, cols[..., None], axis=1)  # [B, K, D]
    logits = out.logits.at[..., mask_id].set(-jnp.inf)  # [B, K, V]
    return Reps(normalise(hidden), sparse_weights(logits, exclude_ids), jnp.argmax(logits, -1).astype(jnp.int32))


def encode_parallel(model, prompt, prompt_valid, *, k: int, tail: int = 0, mask_id: Optional[int] = None,
                    exclude_ids: Sequence[int] = ()) -> Reps:
    """DiffRetriever's read: ``K + tail`` masks appended, ONE bidirectional forward, the first K positions read
    (dense hidden states, sparse max-pooled logits). ``prompt [B, P]`` left-padded."""
    _check(k, tail)
    graphdef, state = nnx.split(model)
    mask_id = _mask_id(model, mask_id)
    return _parallel(graphdef, state, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_valid, bool), k=int(k),
                     tail=int(tail), mask_id=mask_id, exclude_ids=tuple(int(t) for t in exclude_ids))


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "tail", "mask_id", "exclude_ids"))
def _sequential(graphdef, state, prompt, prompt_valid, *, k, tail, mask_id, exclude_ids):
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    shift = 1 if model.cfg.shift_logits else 0
    tokens, valid = append_masks(prompt, prompt_valid, k + tail, mask_id)

    def step(j, carry):
        x, hid, lg = carry
        col = jnp.full((b, 1), p + j - shift, jnp.int32)
        out = model(x, valid=valid, attention="bidirectional", return_hidden=True, logits_at=col + shift)
        h = jnp.take_along_axis(out.hidden, col[..., None], axis=1)[:, 0]  # [B, D]
        logit = out.logits[:, 0].at[:, mask_id].set(-jnp.inf)  # [B, V]
        x = x.at[:, p + j].set(jnp.argmax(logit, -1).astype(jnp.int32))  # commit position j (left to right)
        return x, hid.at[:, j].set(h), lg.at[:, j].set(logit)

    d, v = model.cfg.hidden_size, model.cfg.vocab_size
    init = (tokens, jnp.zeros((b, k, d), jnp.float32), jnp.zeros((b, k, v), jnp.float32))
    x, hid, lg = jax.lax.fori_loop(0, k, step, init)
    return Reps(normalise(hid), sparse_weights(lg, exclude_ids), x[:, p:p + k])


def encode_sequential(model, prompt, prompt_valid, *, k: int, tail: int = 0, mask_id: Optional[int] = None,
                      exclude_ids: Sequence[int] = ()) -> Reps:
    """The AR-style read with the same diffusion model: K forwards; forward j reads mask position j (hidden state,
    logits) with positions < j already committed to their argmax, then commits j. Forward 0 is the one-pass read's
    forward, so vector 0 equals :func:`encode_parallel`'s vector 0."""
    _check(k, tail)
    graphdef, state = nnx.split(model)
    mask_id = _mask_id(model, mask_id)
    return _sequential(graphdef, state, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_valid, bool), k=int(k),
                       tail=int(tail), mask_id=mask_id, exclude_ids=tuple(int(t) for t in exclude_ids))


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "exclude_ids"))
def _autoregressive(graphdef, state, prompt, prompt_valid, *, k, exclude_ids):
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    cache = KVCache.init(model.cfg, b, p + k)
    last = jnp.full((b, 1), p - 1, jnp.int32)
    out = model(prompt, valid=prompt_valid, cache=cache, return_hidden=True, logits_at=last)
    h0, l0 = out.hidden[:, -1], out.logits[:, 0]  # [B, D], [B, V]: predict representative 0

    def step(j, carry):
        c, hid, lg = carry
        tok = jnp.argmax(lg[:, j - 1], -1).astype(jnp.int32)[:, None]  # representative j-1
        o = model(tok, cache=c, return_hidden=True)
        return o.cache, hid.at[:, j].set(o.hidden[:, 0]), lg.at[:, j].set(o.logits[:, 0])

    d, v = model.cfg.hidden_size, model.cfg.vocab_size
    hid = jnp.zeros((b, k, d), jnp.float32).at[:, 0].set(h0)
    lg = jnp.zeros((b, k, v), jnp.float32).at[:, 0].set(l0)
    _, hid, lg = jax.lax.fori_loop(1, k, step, (out.cache, hid, lg))
    return Reps(normalise(hid), sparse_weights(lg, exclude_ids), jnp.argmax(lg, -1).astype(jnp.int32))


def encode_autoregressive(model, prompt, prompt_valid, *, k: int, exclude_ids: Sequence[int] = ()) -> Reps:
    """PromptReps multi-token read with a causal LM (KV cache): the prompt's last hidden state / next-token logits
    are representative 0; greedy-append it and read the next, K forwards in all (prefill + K-1 one-token steps)."""
    _check(k, 0)
    if model.cfg.shift_logits:
        raise ValueError("encode_autoregressive needs a causal LM without shift_logits (the KV cache path)")
    graphdef, state = nnx.split(model)
    return _autoregressive(graphdef, state, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_valid, bool),
                           k=int(k), exclude_ids=tuple(int(t) for t in exclude_ids))


def _check(k, tail):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: allowed a positive integer (number of representative positions)")
    if isinstance(tail, bool) or not isinstance(tail, (int, np.integer)) or tail < 0:
        raise ValueError(f"tail={tail!r}: allowed an integer >= 0 (extra masks after the K read ones)")


def _mask_id(model, mask_id):
    if mask_id is not None:
        return int(mask_id)
    if model.cfg.mask_token_id is None:
        raise ValueError("the model config has no mask_token_id: pass mask_id= (a diffusion LM's [MASK] id)")
    return int(model.cfg.mask_token_id)
