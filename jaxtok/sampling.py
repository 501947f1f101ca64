"""Token sampling: logit transforms, Gumbel sampling in log space, speculative rejection-sampling math and the
static-shape helpers every decode loop uses (decode_methods.md §0.1, §0.3, §A1).

Everything here is a pure array function in float32. Filters are masks in log space: a removed token gets logit
``-inf``, so ``log_softmax`` of the processed logits is the exact log-probability of the distribution sampled from.
Sampling draws ``argmax(logits + Gumbel)`` and never forms ``exp(logits)``.

Sampling parameters may be Python numbers or traced arrays broadcastable to the batch shape ``logits.shape[:-1]``
(e.g. ``[B]`` per-row values for ``[B, V]`` logits), so changing them does not recompile a jitted loop. The decode
loops take them as one :class:`SamplingParams` (validated, hashable), which enters a jitted loop as per-row
:class:`RowParams`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

_TINY = float(jnp.finfo(jnp.float32).tiny)


# ----------------------------------------------------------------------------------------------------------------
# Static-shape helpers (§0.3)
# ----------------------------------------------------------------------------------------------------------------


def rank_desc(scores: jax.Array) -> jax.Array:
    """Rank of each entry along the last axis, 0 = largest; ties broken by index (stable). ``[..., N]`` int32."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def topk_mask(scores: jax.Array, k, valid: Optional[jax.Array] = None) -> jax.Array:
    """Boolean mask of the ``k`` best entries of ``scores [..., N]`` among ``valid`` ones; ``k`` may be traced
    (scalar or ``[...]`` per row). Exactly ``min(k, #valid)`` entries are True (ties broken by index)."""
    if valid is None:
        valid = jnp.ones(scores.shape, bool)
    ranks = rank_desc(jnp.where(valid, scores, -jnp.inf))
    return (ranks < jnp.expand_dims(jnp.asarray(k, jnp.int32), -1)) & valid


def count_leading_true(mask: jax.Array) -> jax.Array:
    """Number of leading True entries along the last axis, ``[..., N] -> [...]`` int32 (accepted draft prefix)."""
    return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def first_true_index(mask: jax.Array) -> jax.Array:
    """Index of the first True along the last axis, or ``N`` when there is none. ``[..., N] -> [...]`` int32."""
    n = mask.shape[-1]
    return jnp.where(jnp.any(mask, axis=-1), jnp.argmax(mask, axis=-1), n).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# Logit transforms (masks in log space, float32)
# ----------------------------------------------------------------------------------------------------------------


def _per_row(x, dtype) -> jax.Array:
    """A scalar or batch-shaped parameter, with a trailing axis so it broadcasts against ``[..., V]``."""
    return jnp.expand_dims(jnp.asarray(x, dtype), -1)


def _sorted_desc(logits: jax.Array) -> jax.Array:
    return -jnp.sort(-logits, axis=-1)


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    """``logits / T`` in float32. Rows with ``T <= 0`` (greedy) are left at ``T = 1`` (as vLLM does): the sampler
    takes their argmax, and their log-probs are those of the untempered distribution. No division by zero."""
    t = _per_row(temperature, jnp.float32)
    return logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)


def mask_top_k(logits: jax.Array, k) -> jax.Array:
    """Top-k filter: keep the logits ``>=`` the k-th largest (ties at the threshold kept, as in HF); ``k <= 0`` or
    ``k >= V`` keeps everything. ``k`` may be traced."""
    v = logits.shape[-1]
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), logits.shape[:-1])
    k = jnp.where((k <= 0) | (k > v), v, k)
    kth = jnp.take_along_axis(_sorted_desc(logits), jnp.expand_dims(k - 1, -1), axis=-1)  # [..., 1]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def mask_top_p(logits: jax.Array, top_p) -> jax.Array:
    """Nucleus (top-p) filter (Holtzman et al. 2020): keep the smallest prefix of tokens, by decreasing
    probability, whose mass reaches ``top_p`` (the most likely token is always kept; ties at the threshold kept).
    ``top_p >= 1`` is the identity."""
    p = _per_row(top_p, jnp.float32)
    srt = _sorted_desc(logits.astype(jnp.float32))  # [..., V]
    probs = jax.nn.softmax(srt, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
    keep = (mass_before < p) | (p >= 1.0)
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)  # [..., 1]
    thr = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
    return jnp.where(logits >= thr, logits, -jnp.inf)


def mask_min_p(logits: jax.Array, min_p) -> jax.Array:
    """Min-p filter (Nguyen et al. 2024): keep tokens with ``p(x) >= min_p * max p``, i.e.
    ``logit - max logit >= log(min_p)``. ``min_p = 0`` is the identity, ``min_p = 1`` keeps the argmax (and ties)."""
    log_thr = jnp.log(_per_row(min_p, jnp.float32))  # log 0 = -inf keeps everything
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits - top >= log_thr, logits, -jnp.inf)


def process_logits(logits: jax.Array, temperature=1.0, top_k=None, top_p=None, min_p=None) -> jax.Array:
    """The sampling transform S: temperature, then top-k, top-p, min-p (HF's order). A filter given as ``None``
    is skipped at trace time. Returns float32 logits with ``-inf`` on removed tokens."""
    out = apply_temperature(logits, temperature)
    if top_k is not None:
        out = mask_top_k(out, top_k)
    if top_p is not None:
        out = mask_top_p(out, top_p)
    if min_p is not None:
        out = mask_min_p(out, min_p)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sampling parameters
# ----------------------------------------------------------------------------------------------------------------

Value = Union[float, int, tuple, jax.Array, None]  # a scalar, one value per row, or None (a filter off)


def host_value(x) -> Optional[np.ndarray]:
    """The host value of ``x``, or None when it is traced or spans several hosts (then checks are skipped)."""
    if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return None
    return np.asarray(x)


def _freeze(name: str, x) -> Value:
    """A sampling value as :class:`SamplingParams` stores it: None (filter off), a ``jax.Array`` as given (it may
    be traced or sharded), otherwise a Python number (a scalar) or a tuple of Python numbers (one per row), so
    that parameters given as numbers or host arrays are hashable."""
    if x is None and name == "temperature":
        raise ValueError("temperature=None: allowed values >= 0 (0 = greedy)")
    if x is None or isinstance(x, jax.Array):
        return x
    a = np.asarray(x)
    if a.ndim == 0:
        return a.item()
    if a.ndim == 1:
        return tuple(a.tolist())
    raise ValueError(f"{name}={x!r}: allowed a scalar or one value per row ([B])")


def _check_range(name: str, value, lo, hi, allowed: str, lo_open=False, integer=False) -> None:
    v = None if value is None else host_value(value)
    if v is None:
        return
    v = v.astype(np.float64)
    bad = (v <= lo if lo_open else v < lo) | (v > hi) | ~np.isfinite(v)
    if integer:
        bad = bad | (v != np.round(v))
    if np.any(bad):
        raise ValueError(f"{name}={value!r}: allowed {allowed}")


def _is_on(value, neutral) -> bool:
    """A filter is compiled in when any entry differs from its neutral value (or when the value is traced)."""
    if value is None:
        return False
    v = host_value(value)
    return v is None or bool(np.any(v != neutral))


class RowParams(NamedTuple):
    """:class:`SamplingParams` inside a jitted loop: per-row ``[B]`` arrays (float32; top-k int32), traced, with
    None for a filter that is off (skipped at trace time). Built by :meth:`SamplingParams.per_row`."""

    temperature: jax.Array
    top_k: Optional[jax.Array] = None
    top_p: Optional[jax.Array] = None
    min_p: Optional[jax.Array] = None

    @property
    def filtered(self) -> bool:
        """Whether any of top-k / top-p / min-p is on."""
        return any(x is not None for x in (self.top_k, self.top_p, self.min_p))

    def _for(self, logits: jax.Array) -> "RowParams":
        """The ``[B]`` values reshaped to broadcast against the batch shape of ``logits [B, ..., V]``."""
        nd = logits.ndim - 1

        def ex(x):
            if x is None or jnp.ndim(x) == 0:
                return x
            return jnp.reshape(x, jnp.shape(x) + (1,) * (nd - jnp.ndim(x)))

        return RowParams(*(ex(x) for x in self))

    def process(self, logits: jax.Array, temperature=None) -> jax.Array:
        """S(logits) for ``logits [B, ..., V]``: float32, ``-inf`` on removed tokens (:func:`process_logits`);
        ``temperature`` overrides T (e.g. 1.0: the filters alone, as greedy rows report their log-probs)."""
        p = self._for(logits)
        return process_logits(logits, p.temperature if temperature is None else temperature, p.top_k, p.top_p,
                              p.min_p)

    def sample(self, key: jax.Array, logits: jax.Array) -> "Sample":
        """One draw from S(logits) per row of ``logits [B, ..., V]`` (:func:`sample`; argmax where T = 0)."""
        p = self._for(logits)
        return sample(key, logits, p.temperature, p.top_k, p.top_p, p.min_p)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The sampling transform S and the draw from it, as every decode loop applies it (decode_methods.md §0.1).

    S(logits) = min-p ∘ top-p ∘ top-k (logits / T) (HF's order; :func:`process_logits`); a token is drawn from
    ``softmax(S(logits))`` by the Gumbel-max trick (:func:`gumbel_argmax`), or is the argmax where ``T = 0``.

    Attributes:
      temperature: T >= 0, ``softmax(logits / T)``; 0 = greedy (the T -> 0 limit: argmax, log-probs reported at
        T = 1, :func:`apply_temperature`).
      top_k: k >= 0, keep the k largest logits (Fan et al. 2018; ties at the threshold kept); 0 = off.
      top_p: p in (0, 1], nucleus sampling (Holtzman et al. 2020): keep the smallest prefix by decreasing
        probability whose mass reaches p; 1 = off.
      min_p: in [0, 1], min-p sampling (Nguyen et al. 2024): keep tokens with ``p(x) >= min_p · max p``; 0 = off.

    Each value is a Python number, one value per row (a tuple or host array ``[B]``, stored as a tuple of Python
    numbers), or a ``jax.Array`` (kept as given; traced or multi-host values are not checked). Params given as
    numbers or host arrays are hashable, so they can be a static argument. Invalid values raise ValueError naming
    the field and the allowed range.

    A jitted loop gets them as :class:`RowParams` (:meth:`per_row`): the values are traced (new values do not
    recompile); which filters are on and whether the batch is all greedy (:attr:`all_greedy`) are decided on the
    host and are part of the compiled program.
    """

    temperature: Value = 1.0
    top_k: Value = 0
    top_p: Value = 1.0
    min_p: Value = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):  # frozen: normalise in place
            object.__setattr__(self, f.name, _freeze(f.name, getattr(self, f.name)))
        _check_range("temperature", self.temperature, 0.0, np.inf, "values >= 0 (0 = greedy)")
        _check_range("top_k", self.top_k, 0, np.inf, "integers >= 0 (0 = off)", integer=True)
        _check_range("top_p", self.top_p, 0.0, 1.0, "values in (0, 1] (1 = off)", lo_open=True)
        _check_range("min_p", self.min_p, 0.0, 1.0, "values in [0, 1] (0 = off)")

    @property
    def all_greedy(self) -> bool:
        """True when every row's temperature is known on the host and <= 0 (then no Gumbel noise is drawn)."""
        t = host_value(self.temperature)
        return t is not None and bool(np.all(t <= 0))

    def per_row(self, b: int) -> RowParams:
        """The params as per-row ``[b]`` arrays for a jitted loop; a filter at its neutral value (top_k 0, top_p 1,
        min_p 0) becomes None, so it is skipped at trace time and costs nothing in the loop."""

        def rows(x, dtype, neutral=None):
            if neutral is not None and not _is_on(x, neutral):
                return None
            return jnp.broadcast_to(jnp.asarray(x, dtype), (b,))

        return RowParams(rows(self.temperature, jnp.float32), rows(self.top_k, jnp.int32, 0),
                         rows(self.top_p, jnp.float32, 1.0), rows(self.min_p, jnp.float32, 0.0))


GREEDY = SamplingParams(temperature=0.0)  # argmax decoding (log-probs reported at T = 1)


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


def gumbel_argmax(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw from ``softmax(logits)`` per row: ``argmax(logits + g)``, ``g = -log(-log u)``, ``u`` in
    ``[tiny, 1)`` so never 0 (§0.1, log-space form; no ``exp(logits)``). ``-inf`` logits are never drawn."""
    u = jax.random.uniform(key, logits.shape, jnp.float32, minval=_TINY, maxval=1.0)
    return jnp.argmax(logits.astype(jnp.float32) - jnp.log(-jnp.log(u)), axis=-1).astype(jnp.int32)


def token_log_probs(log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_probs [..., V]`` gathered at ``tokens [...]`` -> ``[...]``."""
    return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy_from_log_probs(log_probs: jax.Array) -> jax.Array:
    """Shannon entropy ``-sum p log p`` over the last axis in float32; removed (``-inf``) tokens contribute 0."""
    lp = log_probs.astype(jnp.float32)
    p = jnp.exp(lp)
    return -jnp.sum(jnp.where(p > 0, p * lp, 0.0), axis=-1)


class Sample(NamedTuple):
    """``tokens [...]`` int32, ``logprobs [...]`` of the tokens and ``log_probs [..., V]`` of the processed
    distribution (temperature/top-k/top-p/min-p applied; greedy rows at temperature 1)."""

    tokens: jax.Array
    logprobs: jax.Array
    log_probs: jax.Array


def sample(key: jax.Array, logits: jax.Array, temperature=1.0, top_k=None, top_p=None, min_p=None) -> Sample:
    """Sample one token per row from ``S(logits)`` (see :func:`process_logits`); rows with ``temperature <= 0``
    take the argmax (greedy, the limit T -> 0), computed without dividing by the temperature."""
    processed = process_logits(logits, temperature, top_k, top_p, min_p)  # [..., V]
    log_probs = jax.nn.log_softmax(processed, axis=-1)
    drawn = gumbel_argmax(key, processed)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # the top token survives every filter
    tokens = jnp.where(jnp.asarray(temperature) > 0, drawn, greedy)
    return Sample(tokens, token_log_probs(log_probs, tokens), log_probs)


# ----------------------------------------------------------------------------------------------------------------
# Speculative verification (§A1)
# ----------------------------------------------------------------------------------------------------------------


class Verdict(NamedTuple):
    """Result of verifying one round of drafts per row.

    ``tokens [B, γ+1]``: the accepted drafts, then the recovered/bonus token, then ``pad_id``;
    ``num_accepted [B]``: accepted drafts (``tokens`` holds ``num_accepted + 1`` real tokens);
    ``next_token [B]``: the recovered (at the first rejection) or bonus (all accepted) token.
    """

    tokens: jax.Array
    num_accepted: jax.Array
    next_token: jax.Array


def _emit(draft_tokens: jax.Array, num_accepted: jax.Array, next_token: jax.Array, pad_id: int) -> jax.Array:
    """``[B, γ+1]``: drafts before ``num_accepted``, ``next_token`` at it, ``pad_id`` after."""
    b, g = draft_tokens.shape
    padded = jnp.concatenate([draft_tokens.astype(jnp.int32), jnp.full((b, 1), pad_id, jnp.int32)], axis=1)
    j = jnp.arange(g + 1)[None, :]
    n = num_accepted[:, None]
    return jnp.where(j < n, padded, jnp.where(j == n, next_token[:, None], pad_id)).astype(jnp.int32)


def residual_distribution(p: jax.Array, q: jax.Array) -> jax.Array:
    """``normalize(max(0, p - q))`` over the last axis (§A1 step 4), float32. Where the residual has no mass
    (``p == q`` up to rounding: a rejection there has probability ~0), fall back to ``p`` itself (as S2D2 does;
    never to token 0)."""
    p = p.astype(jnp.float32)
    res = jnp.maximum(p - q.astype(jnp.float32), 0.0)
    mass = jnp.sum(res, axis=-1, keepdims=True)
    degenerate = mass <= _TINY
    return jnp.where(degenerate, p, res / jnp.where(degenerate, 1.0, mass))


def speculative_accept(
    key: jax.Array,
    draft_tokens: jax.Array,
    draft_probs: jax.Array,
    target_probs: jax.Array,
    draft_valid: Optional[jax.Array] = None,
    pad_id: int = 0,
) -> Verdict:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023), §A1.1 steps 3-5, per row.

    Draft ``d_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))`` (and never when ``q_i(d_i) = 0``);
    ``n`` = length of the accepted prefix; the next token is drawn from ``normalize(max(0, p_{n+1} - q_{n+1}))``.
    Invalid drafts (``draft_valid`` False, e.g. beyond a row's own γ) are always rejected and get ``q = 0``, so
    the same formula yields the bonus token ``~ p_{n+1}`` after a fully accepted prefix (§A1.4).

    Args:
      key: PRNG key for the round.
      draft_tokens: ``[B, γ]`` drafted ids, drawn from ``draft_probs``.
      draft_probs: ``q [B, γ, V]`` processed draft distributions (same transform S as the target).
      target_probs: ``p [B, γ+1, V]`` processed target distributions at the γ drafts and the bonus slot.
      draft_valid: ``[B, γ]`` bool, default all True.
      pad_id: filler after the emitted tokens.
    """
    b, g = draft_tokens.shape
    if draft_probs.shape[:2] != (b, g) or target_probs.shape[:2] != (b, g + 1):
        raise ValueError(
            f"speculative_accept: draft_tokens {draft_tokens.shape} needs draft_probs [B, γ, V] and target_probs "
            f"[B, γ+1, V], got {draft_probs.shape} and {target_probs.shape}"
        )
    valid = jnp.ones((b, g), bool) if draft_valid is None else draft_valid.astype(bool)
    q = jnp.where(valid[..., None], draft_probs.astype(jnp.float32), 0.0)  # [B, γ, V]
    p = target_probs.astype(jnp.float32)  # [B, γ+1, V]
    key_accept, key_next = jax.random.split(key)
    idx = draft_tokens[..., None].astype(jnp.int32)
    q_d = jnp.take_along_axis(q, idx, axis=-1)[..., 0]  # [B, γ]
    p_d = jnp.take_along_axis(p[:, :g], idx, axis=-1)[..., 0]  # [B, γ]
    r = jax.random.uniform(key_accept, (b, g), jnp.float32)  # [0, 1)
    accepted = valid & (q_d > 0) & (r * q_d < p_d)  # P = min(1, p/q) without dividing
    n = count_leading_true(accepted)  # [B]
    q_pad = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)  # [B, γ+1, V]; slot γ has q = 0 -> bonus
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [B, V]
    q_n = jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0]  # [B, V]
    next_token = gumbel_argmax(key_next, jnp.log(residual_distribution(p_n, q_n)))
    return Verdict(_emit(draft_tokens, n, next_token, pad_id), n, next_token)


def speculative_accept_greedy(
    draft_tokens: jax.Array,
    target_scores: jax.Array,
    draft_valid: Optional[jax.Array] = None,
    pad_id: int = 0,
) -> Verdict:
    """Greedy verification (§A1.2): ``a_i = argmax target_i``; drafts are accepted while ``d_i == a_i``; the next
    token is ``a_{n+1}`` (the correction, or the bonus). Token-identical to target greedy decoding for any drafter.

    ``draft_tokens [B, γ]``, ``target_scores [B, γ+1, V]`` (logits or probabilities), ``draft_valid [B, γ]``.
    """
    b, g = draft_tokens.shape
    if target_scores.shape[:2] != (b, g + 1):
        raise ValueError(
            f"speculative_accept_greedy: draft_tokens {draft_tokens.shape} needs target_scores [B, γ+1, V], "
            f"got {target_scores.shape}"
        )
    valid = jnp.ones((b, g), bool) if draft_valid is None else draft_valid.astype(bool)
    a = jnp.argmax(target_scores, axis=-1).astype(jnp.int32)  # [B, γ+1]
    n = count_leading_true(valid & (draft_tokens == a[:, :g]))
    next_token = jnp.take_along_axis(a, n[:, None], axis=1)[:, 0]
    return Verdict(_emit(draft_tokens, n, next_token, pad_id), n, next_token)
