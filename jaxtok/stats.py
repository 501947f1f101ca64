"""Per-token statistics of student/teacher distributions over the full vocabulary, in float32.

Spec: ``train_methods.md`` §0 (conventions), §1 (OPD divergences, JSD_β, temperature, per-vocabulary-term
clipping, top-k variants, sampled-token estimators), §2 (TIP selection statistics), §3 (TRACE clip 0.05).

Every per-position function takes logits ``[..., V]`` (any float dtype, e.g. bf16; upcast to float32 inside) and
returns ``[...]`` float32. ``p_S`` is the student, ``p_T`` the teacher:

* ``entropy``           ``H = -Σ_v p_S log p_S`` in nats; ``normalized=True`` gives ``ĥ = H / ln V ∈ [0, 1]``.
* ``forward_kl``        ``FKL = KL(p_T‖p_S) = Σ_v p_T (log p_T − log p_S)`` (mean-seeking).
* ``reverse_kl``        ``RKL = KL(p_S‖p_T) = Σ_v p_S (log p_S − log p_T)`` (mode-seeking).
* ``jsd``               ``m = β p_T + (1−β) p_S``, ``JSD_β = β KL(p_T‖m) + (1−β) KL(p_S‖m)`` (TRL GKD convention);
                        the formula vanishes at both endpoints, so ``β = 0`` is special-cased to FKL and ``β = 1``
                        to RKL (``JSD_β / β → FKL`` as ``β → 0``).
* ``clip = c``          each per-vocabulary term ``p (log p − log q)`` is clamped at ``max = c`` before the sum.
* ``top_k = k``         the divergence on the teacher's top-k tokens: ``renorm`` renormalises both distributions
                        over the k entries; ``tail_bucket`` adds ``1 − Σ_topk p`` as a (k+1)-th category.
                        ``k >= V`` is the full vocabulary. Entropy is always over the full vocabulary.
* ``sampled_kl``        k1/k2/k3 estimators of ``KL(p_S‖p_T)`` from the log-probs of tokens sampled from p_S.

Memory (§0 rule 3): :func:`chunked_map` runs a per-chunk function over token chunks in a ``lax.scan`` whose body
is ``jax.checkpoint``-ed, so the float32 ``[chunk, V]`` intermediates are recomputed in the backward pass and no
``[N, V]`` float32 array is saved. :func:`token_stats` computes several statistics in one chunked pass.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxtok.registry import ConfigError

__all__ = [
    "DIVERGENCES", "TOPK_MODES", "ESTIMATORS", "STAT_NAMES", "log_probs", "token_logprobs", "entropy",
    "kl_terms", "divergence_from_log_probs", "topk_log_probs", "divergence", "forward_kl", "reverse_kl", "jsd",
    "sampled_kl", "chunked_map", "token_stats",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TOPK_MODES = ("renorm", "tail_bucket")
ESTIMATORS = ("k1", "k2", "k3")
# Names accepted by token_stats. "logp"/"teacher_logp": log-prob of the sampled token; "entropy_norm" = H / ln V;
# "jsd_norm" = JSD_0.5 / ln 2 ∈ [0, 1] (the TIP repo's selector, §2); "k1".."k3" = sampled_kl estimators.
STAT_NAMES = ("logp", "teacher_logp", "entropy", "entropy_norm", "teacher_entropy", "forward_kl", "reverse_kl",
              "jsd", "jsd_norm", "k1", "k2", "k3")
_NEEDS_TEACHER = {"teacher_logp", "teacher_entropy", "forward_kl", "reverse_kl", "jsd", "jsd_norm", "k1", "k2", "k3"}
_NEEDS_TOKENS = {"logp", "teacher_logp", "k1", "k2", "k3"}

_F32 = jnp.float32


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {list(allowed)}")


# ----------------------------------------------------------------------------------------------------------------
# Basic per-position quantities


def log_probs(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``log_softmax(logits / τ)`` in float32 (§0; τ divides the logits, no τ² rescale, §1). ``[..., V]``."""
    x = logits.astype(_F32)
    if temperature != 1.0:
        x = x / jnp.asarray(temperature, _F32)
    return jax.nn.log_softmax(x, axis=-1)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``lp[...] = log p(tokens[...])`` from ``logits [..., V]`` and ``tokens [...]`` int. ``[...]`` float32."""
    lp = log_probs(logits, temperature)
    return jnp.take_along_axis(lp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy(logits: jax.Array, temperature: float = 1.0, normalized: bool = False) -> jax.Array:
    """Shannon entropy ``-Σ_v p log p`` in nats over the full vocabulary (§0); ``normalized`` divides by ``ln V``.
    Tokens with probability 0 (``-inf`` logits) contribute 0. ``[..., V] -> [...]`` float32."""
    lp = log_probs(logits, temperature)
    finite = lp > -jnp.inf
    lp0 = jnp.where(finite, lp, 0.0)  # double-where: no NaN gradient from 0 · (-inf)
    h = -jnp.sum(jnp.where(finite, jnp.exp(lp0) * lp0, 0.0), axis=-1)
    return h / math.log(logits.shape[-1]) if normalized else h


def kl_terms(lp_p: jax.Array, lp_q: jax.Array, clip: Optional[float] = None) -> jax.Array:
    """Per-vocabulary terms ``p (log p − log q)`` of ``KL(p‖q)`` from log-probs ``[..., V]``; 0 where ``p = 0``;
    with ``clip = c`` each term is clamped at ``max = c`` (§1 ``token_clip``, TRACE §3 uses 0.05)."""
    has = lp_p > -jnp.inf
    lp_p0 = jnp.where(has, lp_p, 0.0)
    lp_q0 = jnp.where(has, lp_q, 0.0)
    terms = jnp.where(has, jnp.exp(lp_p0) * (lp_p0 - lp_q0), 0.0)
    return terms if clip is None else jnp.minimum(terms, jnp.asarray(clip, _F32))


def _kl(lp_p, lp_q, clip):
    return jnp.sum(kl_terms(lp_p, lp_q, clip), axis=-1)


def divergence_from_log_probs(kind: str, lp_s: jax.Array, lp_t: jax.Array, beta: float = 0.5,
                              clip: Optional[float] = None) -> jax.Array:
    """Divergence between student ``lp_s`` and teacher ``lp_t`` log-probs ``[..., K]`` -> ``[...]`` (§1).

    ``kind``: ``forward_kl`` = KL(p_T‖p_S), ``reverse_kl`` = KL(p_S‖p_T), ``jsd`` = JSD_β with the mixture
    ``log m = logaddexp(log p_T + log β, log p_S + log(1−β))``; ``β = 0`` → FKL and ``β = 1`` → RKL exactly."""
    _check_choice("divergence", kind, DIVERGENCES)
    if kind == "forward_kl":
        return _kl(lp_t, lp_s, clip)
    if kind == "reverse_kl":
        return _kl(lp_s, lp_t, clip)
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta={beta!r}: the JSD weight must lie in [0, 1]")
    if beta == 0.0:
        return _kl(lp_t, lp_s, clip)
    if beta == 1.0:
        return _kl(lp_s, lp_t, clip)
    lm = _mixture_log_probs(lp_s, lp_t, beta)
    return beta * _kl(lp_t, lm, clip) + (1.0 - beta) * _kl(lp_s, lm, clip)


def _mixture_log_probs(lp_s: jax.Array, lp_t: jax.Array, beta: float) -> jax.Array:
    """``log m = log(β p_T + (1−β) p_S)`` (JSD_β mixture, §1) ``[..., K]``; ``-inf`` with a zero (not NaN)
    gradient where both distributions are 0 (``logaddexp(-inf, -inf)`` has a NaN derivative; the double
    ``where`` keeps it out of the backward pass, as :func:`kl_terms` does for FKL/RKL)."""
    both_zero = (lp_s == -jnp.inf) & (lp_t == -jnp.inf)
    lp_s0 = jnp.where(both_zero, 0.0, lp_s)
    lp_t0 = jnp.where(both_zero, 0.0, lp_t)
    lm = jnp.logaddexp(lp_t0 + math.log(beta), lp_s0 + math.log1p(-beta))
    return jnp.where(both_zero, -jnp.inf, lm)


def _masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``log Σ_{mask} exp(x)`` over the last axis; ``-inf`` (with zero gradient) when nothing is left."""
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1, keepdims=True))
    m = jnp.where(m > -jnp.inf, m, 0.0)
    s = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x, m) - m), 0.0), axis=-1)
    ok = s > 0
    return jnp.where(ok, jnp.log(jnp.where(ok, s, 1.0)) + m[..., 0], -jnp.inf)


def topk_log_probs(student_logits: jax.Array, teacher_logits: jax.Array, k: int, mode: str = "renorm",
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Student and teacher log-probs on the teacher's top-k tokens (§1, extended OPSD ``compute_topk_divergence``).

    ``renorm``: ``log_softmax`` of both logit vectors gathered at the k indices -> ``[..., k]`` each.
    ``tail_bucket``: full-vocabulary log-probs at the k indices plus ``log(1 − Σ_topk p)`` as a (k+1)-th category
    (computed as a log-sum-exp over the other tokens, exact for tiny tails) -> ``[..., k+1]`` each.
    ``k >= V`` returns the full-vocabulary log-probs (no tail)."""
    _check_choice("top_k_mode", mode, TOPK_MODES)
    k = int(k)
    if k < 1:
        raise ConfigError(f"top_k={k}: must be >= 1 (or None for the full vocabulary)")
    v = teacher_logits.shape[-1]
    if k >= v:
        return log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    _, idx = jax.lax.top_k(teacher_logits.astype(_F32), k)  # [..., k]
    if mode == "renorm":
        gather = lambda x: jnp.take_along_axis(x.astype(_F32), idx, axis=-1)  # noqa: E731
        tau = jnp.asarray(temperature, _F32)
        return (jax.nn.log_softmax(gather(student_logits) / tau, axis=-1),
                jax.nn.log_softmax(gather(teacher_logits) / tau, axis=-1))
    in_top = jnp.put_along_axis(jnp.zeros(teacher_logits.shape, bool), idx, True, axis=-1, inplace=False)  # [..., V]

    def with_tail(logits):
        lp = log_probs(logits, temperature)  # [..., V]
        tail = _masked_logsumexp(lp, ~in_top)  # [...]
        return jnp.concatenate([jnp.take_along_axis(lp, idx, axis=-1), tail[..., None]], axis=-1)  # [..., k+1]

    return with_tail(student_logits), with_tail(teacher_logits)


def divergence(kind: str, student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float = 0.5,
               temperature: float = 1.0, clip: Optional[float] = None, top_k: Optional[int] = None,
               top_k_mode: str = "renorm") -> jax.Array:
    """Per-position divergence ``kind`` ∈ ``forward_kl | reverse_kl | jsd`` between ``softmax(student_logits/τ)``
    and ``softmax(teacher_logits/τ)``, both ``[..., V]``, over the full vocabulary or the teacher's top-k (§1).
    ``[...]`` float32."""
    if top_k is None:
        lp_s, lp_t = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    else:
        lp_s, lp_t = topk_log_probs(student_logits, teacher_logits, top_k, top_k_mode, temperature)
    return divergence_from_log_probs(kind, lp_s, lp_t, beta, clip)


def forward_kl(student_logits, teacher_logits, **kw) -> jax.Array:
    """``KL(p_T‖p_S)`` per position (§0); keyword options as :func:`divergence`."""
    return divergence("forward_kl", student_logits, teacher_logits, **kw)


def reverse_kl(student_logits, teacher_logits, **kw) -> jax.Array:
    """``KL(p_S‖p_T)`` per position (§0); keyword options as :func:`divergence`."""
    return divergence("reverse_kl", student_logits, teacher_logits, **kw)


def jsd(student_logits, teacher_logits, beta: float = 0.5, **kw) -> jax.Array:
    """Generalised ``JSD_β`` per position (§1; β=0 → FKL, β=1 → RKL); keyword options as :func:`divergence`."""
    return divergence("jsd", student_logits, teacher_logits, beta=beta, **kw)


def sampled_kl(logp: jax.Array, teacher_logp: jax.Array, estimator: str = "k1") -> jax.Array:
    """Sampled-token estimators of ``KL(p_S‖p_T)`` (reverse KL) from ``y ~ p_S`` (§1; Schulman's k1/k2/k3).

    With ``d = lp_T(y) − lp_S(y)``: ``k1 = −d`` (unbiased), ``k2 = d²/2`` (biased, low variance),
    ``k3 = e^d − 1 − d`` (unbiased, ≥ 0). Unclipped; :func:`jaxtok.policy.kl_penalty` is the verl-clipped
    version used as an RL penalty. ``[...]`` float32."""
    _check_choice("estimator", estimator, ESTIMATORS)
    d = teacher_logp.astype(_F32) - logp.astype(_F32)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return jnp.expm1(d) - d


# ----------------------------------------------------------------------------------------------------------------
# Chunking over tokens


def chunked_map(fn: Callable, tree, *, chunk_size: int, token_ndim: int, remat: bool = True):
    """``fn`` over chunks of tokens, as if applied to all tokens at once (§0 rule 3).

    ``tree``: a pytree of arrays whose first ``token_ndim`` axes are token axes of one common shape ``lead``
    (e.g. ``[B, T, V]`` logits and ``[B, T]`` tokens with ``token_ndim = 2``). They are flattened to ``N`` tokens,
    zero-padded to a multiple of ``chunk_size`` and scanned chunk by chunk; ``fn(chunk_tree) -> pytree`` of
    ``[C, ...]`` arrays. Returns that pytree reshaped to ``[*lead, ...]``.

    With ``remat`` the per-chunk body is ``jax.checkpoint``-ed: the backward pass saves only the chunk inputs and
    recomputes the float32 ``[C, V]`` intermediates, so no ``[N, V]`` float32 residual exists (keep the inputs in
    bf16, or pass hidden states and let ``fn`` project them, to keep the inputs small too)."""
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size}: must be >= 1")
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        raise ValueError("chunked_map: no arrays given")
    lead = leaves[0].shape[:token_ndim]
    for x in leaves:
        if x.shape[:token_ndim] != lead:
            raise ValueError(f"chunked_map: token axes differ: {x.shape[:token_ndim]} vs {lead}")
    n = math.prod(lead)
    c = max(1, min(chunk_size, n))
    n_chunks = -(-n // c)

    def split(x):  # [*lead, ...] -> [n_chunks, C, ...]
        x = x.reshape((n,) + x.shape[token_ndim:])
        x = jnp.pad(x, [(0, n_chunks * c - n)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((n_chunks, c) + x.shape[1:])

    body = jax.checkpoint(fn) if remat else fn
    xs = jax.tree.unflatten(treedef, [split(x) for x in leaves])
    out = jax.lax.map(body, xs)  # leaves [n_chunks, C, ...]
    return jax.tree.map(lambda y: y.reshape((n_chunks * c,) + y.shape[2:])[:n].reshape(lead + y.shape[2:]), out)


def token_stats(student_logits: jax.Array, teacher_logits: Optional[jax.Array] = None,
                tokens: Optional[jax.Array] = None, *, names: Sequence[str], chunk_size: int = 512,
                beta: float = 0.5, temperature: float = 1.0, clip: Optional[float] = None,
                top_k: Optional[int] = None, top_k_mode: str = "renorm") -> dict[str, jax.Array]:
    """Several per-token statistics in one chunked float32 pass (§1, §2). Returns ``{name: [...]}``.

    Args:
      student_logits: ``[..., V]`` (e.g. ``[B, T, V]``, any float dtype).
      teacher_logits: ``[..., V]``, needed by the teacher/divergence/estimator names.
      tokens: ``[...]`` int sampled tokens, needed by ``logp``, ``teacher_logp``, ``k1``..``k3``.
      names: subset of :data:`STAT_NAMES`. Divergences honour ``beta``, ``clip``, ``top_k``/``top_k_mode``
        (``jsd_norm`` is JSD_0.5 / ln 2 on the same support); entropies are always over the full vocabulary;
        the sampled-token log-probs are always full-vocabulary.
      chunk_size: tokens per chunk (static).
    """
    names = tuple(names)
    for name in names:
        _check_choice("stat", name, STAT_NAMES)
    if teacher_logits is None and _NEEDS_TEACHER.intersection(names):
        raise ConfigError(f"stats {sorted(_NEEDS_TEACHER.intersection(names))} need teacher_logits (got None)")
    if tokens is None and _NEEDS_TOKENS.intersection(names):
        raise ConfigError(f"stats {sorted(_NEEDS_TOKENS.intersection(names))} need tokens (got None)")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {teacher_logits.shape} must match student_logits {student_logits.shape}")
    vocab = student_logits.shape[-1]

    def one(chunk):  # chunk: s [C, V], t [C, V] | None, y [C] | None
        s, t, y = chunk["s"], chunk.get("t"), chunk.get("y")
        lp_s = log_probs(s, temperature)  # [C, V] f32
        lp_t = None if t is None else log_probs(t, temperature)  # [C, V] f32
        out = {}
        if {"entropy", "entropy_norm"}.intersection(names):
            h = entropy(s, temperature)  # [C]
            out["entropy"], out["entropy_norm"] = h, h / math.log(vocab)
        if "teacher_entropy" in names:
            out["teacher_entropy"] = entropy(t, temperature)
        if y is not None:
            gather = lambda lp: jnp.take_along_axis(lp, y[:, None].astype(jnp.int32), axis=-1)[:, 0]  # noqa: E731
            out["logp"] = gather(lp_s)
            if lp_t is not None:
                out["teacher_logp"] = gather(lp_t)
                for est in ESTIMATORS:
                    out[est] = sampled_kl(out["logp"], out["teacher_logp"], est)
        if {"forward_kl", "reverse_kl", "jsd", "jsd_norm"}.intersection(names):
            if top_k is None:
                ds, dt = lp_s, lp_t
            else:
                ds, dt = topk_log_probs(s, t, top_k, top_k_mode, temperature)
            for kind in ("forward_kl", "reverse_kl", "jsd"):
                if kind in names:
                    out[kind] = divergence_from_log_probs(kind, ds, dt, beta, clip)
            if "jsd_norm" in names:
                out["jsd_norm"] = divergence_from_log_probs("jsd", ds, dt, 0.5, clip) / math.log(2.0)
        return {name: out[name] for name in names}

    tree = {"s": student_logits}
    if teacher_logits is not None:
        tree["t"] = teacher_logits
    if tokens is not None:
        tree["y"] = tokens
    return chunked_map(one, tree, chunk_size=chunk_size, token_ndim=student_logits.ndim - 1)
