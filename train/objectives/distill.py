"""Selective on-policy distillation: OPD with token selection (TIP), TRACE span routing, SHRED unlearning.

Spec ``train_methods.md`` §1 (OPD), §2 (TIP), §3 (TRACE), §4 (SHRED). Per-token statistics come from
:mod:`jaxtok.stats`, selection rules from :data:`jaxtok.registry.SELECTIONS` (:mod:`jaxtok.select`), the GRPO part of
TRACE from :mod:`jaxtok.policy`.

Shifted convention: every per-token array below is ``[B, T-1]`` — the hidden state at column ``t`` scores token
``tokens[:, t+1]`` and ``loss_mask[:, t+1]`` says whether that token carries the loss.

``opd`` (rollout data, frozen ``teacher``):

1. one forward of the student (with gradient) and of the teacher (``stop_gradient``) to final hidden states;
2. *selection pass* (no gradient): the statistics the rule needs (``args.needs()``: student entropy, FKL/RKL/JSD to
   the teacher, ...) in float32 over token chunks (:func:`jaxtok.stats.token_stats` per chunk of hidden states
   projected by the LM heads, so no ``[B, T, V]`` array), then ``weights [B, T-1]`` from the rule;
3. *gradient pass*: for rules that keep a fraction ``rho`` (random, entropy_sample, entropy_topk, soft_or, q3) the
   student and teacher logits are computed only at the ``K = ceil(ρ·N)`` selected positions (``N`` = positions
   of the call, or of each row with ``per_row``): the selected hidden states are gathered (the same
   gather-then-matmul as ``Decoder(logits_at=...)``, on the hidden state of the one forward, so the student runs
   once) and the float32 loss runs over ``K`` rows only; the ``(K, V)`` float32 intermediates replace ``(N, V)``.
   Other rules (all, quadrant, spans) use the full chunked path. Both paths give the same loss and gradient.
4. ``(loss_sum, count)`` by :func:`jaxtok.select.selected_loss` (``normalize_by``: ``selected`` = mean over the kept
   tokens as the TIP repo, ``all`` = over every loss token), or the reward-weighted per-sample mean (§1).

Granularity: the rule sees the rows of one call. The train step calls the objective once per micro-batch, so the
selection is per micro-batch (the TIP repo); ``selection.granularity: batch`` means the same thing with
``train.micro_batches = 1`` (whole-batch selection), which the config should then use.

``trace`` (rollout data, ``teacher``, ``prepare`` = :func:`trace_annotate`): GRPO on all tokens with the span
tokens' GRPO weight ``1 − λ_k/w0``, plus ``λ_k`` times forward KL on key spans of correct rollouts and reverse KL on
error spans of incorrect rollouts, per-vocabulary terms clipped at 0.05, spans capped at 25 % of each row. The step
``k`` comes from the batch field ``step`` (``[B]`` int32, the number of optimizer updates done before this one; the
``ObjectiveSpec.batch_step`` asks the loop for it) when present, else from ``args.step`` (a constant: tests and
fixed-λ runs). The teacher is, as in the paper, the student itself (``teacher: self``): a copy of its parameters
synced every ``teacher_sync_every`` steps while λ > 0 and dropped once λ = 0 (:mod:`jaxtok.train.self_teacher`,
``ObjectiveSpec.self_teacher``), conditioned on the privileged prompt (``privileged_template``: the prompt plus the
annotator's diagnostic label, or the reference) and scoring the same completion tokens; ``teacher: external`` is a
frozen ``rollout.teacher_init_from`` model instead.

``shred`` (SFT data of the forget set, frozen ``reference`` = the original model θ0, ``rollout.reference: init``):
forward KL from the demoted top-K target of θ0 to the student on every response token after ``skip_tokens``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok import policy as P
from jaxtok import select as sel
from jaxtok import stats
from jaxtok.registry import OBJECTIVES, SELECTIONS, ConfigError, Selection
from jaxtok.stats import chunked_map
from jaxtok.train.objectives.policy_gradient import require_keys, rollout_token_stats, sequence_advantages

__all__ = [
    "OPD_LOSSES", "SAMPLED_WEIGHTS", "OPDArgs", "opd_token_loss", "reward_weights", "selection_weights", "opd_loss",
    "TraceArgs", "SPAN_NONE", "SPAN_KEY", "SPAN_ERROR", "TRACE_DIAGNOSES", "trace_lambda", "trace_kl_end",
    "trace_teacher_sync", "trace_annotate", "annotate_completion", "diagnose_completion", "privileged_width",
    "trace_privileged_inputs", "trace_loss", "ShredArgs", "shred_targets", "shred_token_kl", "shred_loss",
]

_F32 = jnp.float32
OPD_LOSSES = ("reverse_kl", "forward_kl", "jsd", "sampled_token")
SAMPLED_WEIGHTS = ("reinforce", "gated", "weighted")
_OPD_KEYS = ("tokens", "positions", "valid", "loss_mask", "temperature")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {list(allowed)}")


# ----------------------------------------------------------------------------------------------------------------
# shared plumbing


def _shifted(batch: dict):
    """``targets [B, T-1]`` int32, ``mask [B, T-1]`` bool, ``tau [B, T-1]`` f32 (the rollout temperature)."""
    tokens = jnp.asarray(batch["tokens"])
    B, T = tokens.shape
    tau = jnp.broadcast_to(jnp.asarray(batch.get("temperature", 1.0), _F32), (B,))
    return (tokens[:, 1:].astype(jnp.int32), jnp.asarray(batch["loss_mask"], bool)[:, 1:],
            jnp.broadcast_to(tau[:, None], (B, T - 1)))


def _hidden(model: nnx.Module, batch: dict) -> jax.Array:
    """Final-normed hidden states at columns ``0..T-2`` (each scores the next token). ``[B, T-1, D]``."""
    out = model(batch["tokens"], positions=batch.get("positions"), valid=batch.get("valid"), return_logits=False,
                return_hidden=True)
    return out.hidden[:, :-1]


def _head(model: nnx.Module):
    """``hidden [..., D] -> logits [..., V]`` f32 of ``model`` usable inside scans (functional split/merge)."""
    graphdef, state = nnx.split(model)
    return lambda h: nnx.merge(graphdef, state).logits(h)


def _scaled(logits, tau):
    """``logits / τ`` per row; chunk padding rows carry τ = 0 and get τ = 1 (no NaN in their gradients)."""
    tau = jnp.where(tau > 0, tau, 1.0)
    return logits.astype(_F32) / tau[..., None]


# ----------------------------------------------------------------------------------------------------------------
# OPD / TIP (§1, §2)


@dataclasses.dataclass(frozen=True)
class OPDArgs:
    """Arguments of ``opd`` (§1, §2).

    - ``divergence``: ``reverse_kl`` (repo default) | ``forward_kl`` | ``jsd`` (``beta``; 0 → FKL, 1 → RKL) |
      ``sampled_token``: ``−w_t · lp_S(y_t)`` with ``Δ_t = lp_T(y_t) − lp_S(y_t)`` and ``w_t = sg(Δ_t)``
      (``reinforce``), ``sg(sigmoid(gate_scale·Δ_t))`` (``gated``) or ``sg(p_S(y_t)·Δ_t)`` (``weighted``).
    - ``token_clip``: clamp each per-vocabulary KL term at this value (None: off).
    - ``top_k`` / ``top_k_mode``: divergence on the teacher's top-k (``renorm`` | ``tail_bucket``); None: full.
    - ``reward_beta`` β_r: reward-weighted OPD, per-sample weights ``N·softmax(r/β_r)``, loss ``Σ w_i L_i / Σ w_i``
      with ``L_i`` the per-sample token mean (None or 0: off).
    - ``selection``: ``{rule: <SELECTIONS name>, ...that rule's arguments}`` (``rho``, ``alpha``, ``gamma``,
      ``per_row``, ``normalize_by``, ``granularity``, ...) in the config, parsed into a
      :class:`~jaxtok.registry.Selection` (``rule``, ``args``); default ``{rule: all}`` (plain OPD).
    - ``selected_logits``: compute the gradient-pass logits only at the selected positions (rules with ``rho``).
    - ``quadrant_stats``: report the Q1..Q4 token shares (median thresholds of ĥ and RKL) as ``q1``..``q4``.
    - ``chunk_size``: tokens per float32 chunk.
    """

    divergence: str = "reverse_kl"
    beta: float = 0.5
    sampled_weight: str = "reinforce"
    gate_scale: float = 5.0
    token_clip: Optional[float] = None
    top_k: Optional[int] = None
    top_k_mode: str = "renorm"
    reward_beta: Optional[float] = None
    selection: Selection = dataclasses.field(default_factory=lambda: Selection.parse({"rule": "all"}, "selection"))
    selected_logits: bool = True
    quadrant_stats: bool = True
    chunk_size: int = 512

    def __post_init__(self):
        _choice("divergence", self.divergence, OPD_LOSSES)
        _choice("sampled_weight", self.sampled_weight, SAMPLED_WEIGHTS)
        _choice("top_k_mode", self.top_k_mode, stats.TOPK_MODES)
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta={self.beta!r}: the JSD weight must lie in [0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k!r}: must be >= 1 (or null for the full vocabulary)")
        if self.token_clip is not None and self.token_clip <= 0:
            raise ConfigError(f"token_clip={self.token_clip!r}: must be > 0 (or null for no clipping)")
        if self.reward_beta is not None and self.reward_beta < 0:
            raise ConfigError(f"reward_beta={self.reward_beta!r}: must be >= 0 (0 or null: off)")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size={self.chunk_size!r}: must be >= 1")
        if not isinstance(self.selection, Selection):
            raise ConfigError(f"selection={self.selection!r}: a parsed Selection (a config mapping {{rule: ..., "
                              f"...}} is parsed by OBJECTIVES.parse_args, or build it with Selection.parse)")


def opd_token_loss(student_logits: jax.Array, teacher_logits: jax.Array, tokens: jax.Array,
                   args: OPDArgs = OPDArgs()) -> jax.Array:
    """Per-position OPD loss ``[...]`` f32 from logits ``[..., V]`` already divided by the temperature (§1).

    KL kinds: :func:`jaxtok.stats.divergence` (full vocabulary or teacher top-k, per-term clip). ``sampled_token``:
    the score-function surrogate ``−sg(w_t)·lp_S(y_t)`` whose gradient estimates that of the reverse KL."""
    t = jax.lax.stop_gradient(teacher_logits)
    if args.divergence != "sampled_token":
        return stats.divergence(args.divergence, student_logits, t, beta=args.beta, clip=args.token_clip,
                                top_k=args.top_k, top_k_mode=args.top_k_mode)
    lp_s = stats.token_logprobs(student_logits, tokens)
    delta = jax.lax.stop_gradient(stats.token_logprobs(t, tokens) - lp_s)
    if args.sampled_weight == "reinforce":
        w = delta
    elif args.sampled_weight == "gated":
        w = jax.nn.sigmoid(args.gate_scale * delta)
    else:
        w = jax.lax.stop_gradient(jnp.exp(lp_s)) * delta
    return -w * lp_s


def reward_weights(rewards: jax.Array, rows: jax.Array, reward_beta: float) -> jax.Array:
    """Reward-weighted OPD (§1, ``opd.reward_beta``): ``w_i = N · softmax_i(r_i / β_r)`` over the ``N`` rows with
    ``rows[i]`` True (0 elsewhere). ``[B]`` f32; β_r → ∞ gives 1 on every row."""
    logits = jnp.where(rows, jnp.asarray(rewards, _F32) / reward_beta, -jnp.inf)
    n = jnp.sum(rows.astype(_F32))
    p = jax.nn.softmax(jnp.where(jnp.any(rows), logits, 0.0))
    return jnp.where(rows, n * p, 0.0)


def _stat_pass(names, hs, ht, y, tau, s_head, t_head, chunk_size):
    """No-gradient statistics ``{name: [B, T-1]}`` over chunks of hidden states (§2 pass 1)."""
    if not names:
        return {}

    def one(c):
        s = _scaled(s_head(c["hs"]), c["tau"])  # [C, V] f32
        t = _scaled(t_head(c["ht"]), c["tau"])
        return stats.token_stats(s, t, c["y"], names=names, chunk_size=s.shape[0])

    tree = {"hs": jax.lax.stop_gradient(hs), "ht": jax.lax.stop_gradient(ht), "y": y, "tau": tau}
    return jax.lax.stop_gradient(chunked_map(one, tree, chunk_size=chunk_size, token_ndim=2, remat=False))


def selection_weights(args: OPDArgs, stat_arrays: Mapping[str, jax.Array], mask: jax.Array, key) -> jax.Array:
    """``weights [B, T-1]`` f32 of the configured rule (0 off ``mask``)."""
    fn = SELECTIONS.get(args.selection.rule)
    return jax.lax.stop_gradient(jnp.where(mask, fn(stat_arrays, mask, key, args.selection.args), 0.0))


def _static_keep(args: OPDArgs, n: int) -> Optional[int]:
    """Static bound ``ceil(ρ·n)`` on the kept positions of a rule with ``rho`` (None: no bound, full path)."""
    rho = getattr(args.selection.args, "rho", None)
    if not args.selected_logits or rho is None or args.selection.rule == "all":
        return None
    return int(min(n, max(1, math.ceil(float(rho) * n))))


def _gather_rows(weights: jax.Array, k: int, per_row: bool) -> jax.Array:
    """Flat indices ``[K']`` into ``B·(T-1)`` covering every position with weight > 0 (when at most ``k`` of the
    call, or of each row with ``per_row``, are selected); filler indices carry weight 0."""
    B, T1 = weights.shape
    hit = (weights > 0).astype(_F32)
    if per_row:
        _, idx = jax.lax.top_k(hit, k)  # [B, k]
        return (idx + jnp.arange(B)[:, None] * T1).reshape(-1)
    _, idx = jax.lax.top_k(hit.reshape(-1), k)
    return idx


def _token_losses(args: OPDArgs, hs, ht, y, tau, s_head, t_head, token_ndim):
    """Per-position loss over chunks of hidden states (rematerialised: no ``[N, V]`` f32 residual)."""

    def one(c):
        s = _scaled(s_head(c["hs"]), c["tau"])
        t = _scaled(t_head(c["ht"]), c["tau"])
        return opd_token_loss(s, t, c["y"], args)

    tree = {"hs": hs, "ht": jax.lax.stop_gradient(ht), "y": y, "tau": tau}
    return chunked_map(one, tree, chunk_size=args.chunk_size, token_ndim=token_ndim)


@OBJECTIVES.register("opd", OPDArgs, data="rollout", models=("teacher",))
def opd_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: OPDArgs = OPDArgs(), *,
             teacher: Optional[nnx.Module] = None):
    """OPD / TIP loss on a rollout batch (module docstring, §1–2). Returns ``(loss_sum, count, aux)``.

    Aux (``(sum, count)`` pairs): ``selected_frac`` (kept / loss tokens), ``q1``..``q4`` (quadrant shares),
    ``selection_overflow`` (selected positions beyond the static bound: always 0), ``reward_mean``."""
    if teacher is None:
        raise ConfigError("objective 'opd' needs the frozen teacher model (rollout.teacher_init_from)")
    require_keys(batch, _OPD_KEYS, "opd")
    use_rewards = bool(args.reward_beta)
    if use_rewards:
        require_keys(batch, ("rewards",), "opd (reward_beta)")
    y, mask, tau = _shifted(batch)
    B, T1 = y.shape
    hs = _hidden(model, batch)  # [B, T-1, D] with gradient
    ht = jax.lax.stop_gradient(_hidden(teacher, batch))  # [B, T-1, D']
    s_head, t_head = _head(model), _head(teacher)

    sargs = args.selection.args
    needs = tuple(sargs.needs())
    from_batch = {k: jnp.asarray(batch[k])[:, 1:] for k in needs if k not in stats.STAT_NAMES and k in batch}
    missing = [k for k in needs if k not in stats.STAT_NAMES and k not in batch]
    if missing:
        raise ConfigError(f"selection rule {args.selection.rule!r} needs {missing}: neither a statistic "
                          f"({list(stats.STAT_NAMES)}) nor a batch key (got {sorted(batch)})")
    names = [k for k in needs if k in stats.STAT_NAMES]
    if args.quadrant_stats:
        names += [k for k in ("entropy_norm", "reverse_kl") if k not in names]
    stat_arrays = _stat_pass(tuple(names), hs, ht, y, tau, s_head, t_head, args.chunk_size)
    weights = selection_weights(args, {**stat_arrays, **from_batch}, mask, rng)  # [B, T-1]

    aux = {}
    n_mask = jnp.sum(mask.astype(_F32))
    k = _static_keep(args, T1 if sargs.per_row else B * T1)
    if k is None:
        losses = _token_losses(args, hs, ht, y, tau, s_head, t_head, token_ndim=2)  # [B, T-1]
    else:
        idx = _gather_rows(weights, k, sargs.per_row)  # [K']
        flat = lambda x: x.reshape((B * T1,) + x.shape[2:])[idx]  # noqa: E731
        l_sel = _token_losses(args, flat(hs), flat(ht), flat(y), flat(tau), s_head, t_head, token_ndim=1)
        losses = jnp.zeros((B * T1,), _F32).at[idx].set(l_sel).reshape(B, T1)
        kept = jnp.zeros((B * T1,), bool).at[idx].set(True).reshape(B, T1)
        aux["selection_overflow"] = (jnp.sum((weights > 0) & ~kept).astype(_F32), jnp.ones((), _F32))

    if use_rewards:
        w = jnp.where(mask, weights, 0.0)
        row_sum = jnp.sum(jnp.where(w > 0, w * losses, 0.0), axis=-1)  # [B]
        row_cnt = jnp.sum(w if sargs.normalize_by == "selected" else mask.astype(_F32), axis=-1)
        rows = row_cnt > 0
        rw = reward_weights(batch["rewards"], rows, args.reward_beta)
        loss_sum = jnp.sum(rw * P.safe_divide(row_sum, row_cnt))
        count = jnp.sum(rw)
        aux["reward_mean"] = (jnp.sum(jnp.asarray(batch["rewards"], _F32)), jnp.full((), B, _F32))
    else:
        loss_sum, count = sel.selected_loss(losses, weights, mask, sargs.normalize_by)
    aux["selected_frac"] = (jnp.sum(weights), n_mask)
    if args.quadrant_stats:
        quad = sel.quadrants(stat_arrays["entropy_norm"], stat_arrays["reverse_kl"], mask)
        shares = sel.quadrant_shares(quad)
        aux.update({f"q{i + 1}": (shares[i], n_mask) for i in range(4)})
    return loss_sum, count, aux


# ----------------------------------------------------------------------------------------------------------------
# TRACE (§3)

SPAN_NONE, SPAN_KEY, SPAN_ERROR = 0, 1, 2
_KL_OR_NONE = ("forward_kl", "reverse_kl", "none")
TRACE_TEACHERS = ("self", "external")
TRACE_TEMPLATE = "diagnosis:{label}\n{prompt}"  # the paper's form: prompt + the annotator's type label c
TRACE_TEMPLATE_FIELDS = ("prompt", "label", "target", "answer")
# coarse diagnostic labels c of the rule-based annotator (:func:`diagnose_completion`); synthetic-tokenizer characters
TRACE_DIAGNOSES = ("correct", "no answer", "extra step", "missing step", "answer error", "wrong operation",
                   "copy error", "wrong operand", "sign error", "carry error", "arithmetic error", "step error")


@dataclasses.dataclass(frozen=True)
class TraceArgs:
    """Arguments of ``trace`` (§3).

    - KL schedule: ``λ_k = kl_weight`` for ``k < hold_steps``, then linear to 0 over ``decay_steps``, 0 after
      (paper: 0.5, 10, 30). ``step``: the step ``k`` when the batch has no ``step`` field.
    - ``key_divergence`` (on key spans of correct rollouts, paper's strong base: ``forward_kl``) and
      ``error_divergence`` (on error spans of incorrect rollouts, weak base: ``reverse_kl``); ``none`` drops a
      branch. ``token_clip``: per-vocabulary term clip (0.05); ``coverage_cap``: span tokens per row (0.25).
    - GRPO: ``eps_low``/``eps_high`` (DAPO clip-higher 0.2/0.28), ``dual_clip_c``, ``aggregation`` (a
      :data:`jaxtok.policy.AGG_MODES` name), ``advantage_estimator``/``adv_eps`` (:func:`sequence_advantages`).
    - ``teacher``: ``self`` (the paper: the student's own parameters, copied into the teacher every
      ``teacher_sync_every`` steps (10) while λ > 0; no teacher once λ = 0) or ``external`` (the frozen
      ``rollout.teacher_init_from`` model: the earlier, non-paper variant).
    - ``privileged_template``: the teacher's prompt text, filled with the example's ``{prompt}``, the annotator's
      diagnostic label ``{label}`` (:data:`TRACE_DIAGNOSES`; never the span text or its location), or the
      reference ``{target}`` / ``{answer}`` (the paper's "reference" option); ``"{prompt}"`` = no privileged
      context (the teacher sees the student's own input). ``privileged_len``: the teacher prompt width in tokens
      (None: the prompt width plus what the template can add).
    """

    kl_weight: float = 0.5
    hold_steps: int = 10
    decay_steps: int = 30
    step: int = 0
    key_divergence: str = "forward_kl"
    error_divergence: str = "reverse_kl"
    token_clip: Optional[float] = 0.05
    coverage_cap: float = 0.25
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: Optional[float] = 3.0
    aggregation: str = "seq-mean-token-mean"
    advantage_estimator: str = "grpo"
    adv_eps: float = 1e-6
    chunk_size: int = 512
    teacher: str = "self"
    teacher_sync_every: int = 10
    privileged_template: str = TRACE_TEMPLATE
    privileged_len: Optional[int] = None

    def __post_init__(self):
        _choice("teacher", self.teacher, TRACE_TEACHERS)
        if self.teacher_sync_every < 1:
            raise ConfigError(f"teacher_sync_every={self.teacher_sync_every!r}: must be >= 1")
        _check_template(self.privileged_template)
        if self.privileged_len is not None and self.privileged_len < 1:
            raise ConfigError(f"privileged_len={self.privileged_len!r}: must be >= 1 (or null: automatic)")
        _choice("key_divergence", self.key_divergence, _KL_OR_NONE)
        _choice("error_divergence", self.error_divergence, _KL_OR_NONE)
        _choice("aggregation", self.aggregation, P.AGG_MODES)
        _choice("advantage_estimator", self.advantage_estimator, P.ADV_ESTIMATORS)
        if self.kl_weight < 0:
            raise ConfigError(f"kl_weight={self.kl_weight!r}: must be >= 0")
        if self.hold_steps < 0 or self.decay_steps < 0 or self.step < 0:
            raise ConfigError(f"hold_steps={self.hold_steps!r}, decay_steps={self.decay_steps!r}, "
                              f"step={self.step!r}: must be >= 0")
        if self.token_clip is not None and self.token_clip <= 0:
            raise ConfigError(f"token_clip={self.token_clip!r}: must be > 0 (or null)")
        if not 0.0 <= self.coverage_cap <= 1.0:
            raise ConfigError(f"coverage_cap={self.coverage_cap!r}: allowed [0, 1]")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ConfigError(f"dual_clip_c={self.dual_clip_c!r}: must be > 1 (or null)")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size={self.chunk_size!r}: must be >= 1")


def _check_template(template: str) -> None:
    """``privileged_template`` must contain ``{prompt}`` and name only :data:`TRACE_TEMPLATE_FIELDS`."""
    import string

    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"privileged_template={template!r}: {e}") from None
    bad = names - set(TRACE_TEMPLATE_FIELDS)
    if "prompt" not in names or bad:
        raise ConfigError(f"privileged_template={template!r}: must contain {{prompt}} and only the fields "
                          f"{list(TRACE_TEMPLATE_FIELDS)} (got {sorted(names)})")


def trace_kl_end(args: "TraceArgs") -> int:
    """The first step ``k`` from which ``λ_k = 0`` for good (§3: 40 by default; 0 when ``kl_weight = 0``): from
    there on the teacher is neither synced nor run."""
    return 0 if args.kl_weight == 0 else args.hold_steps + args.decay_steps


def trace_teacher_sync(args: "TraceArgs") -> Optional[tuple[int, int]]:
    """``ObjectiveSpec.self_teacher``: ``(sync period N, first step without teacher)`` for the paper's self-teacher
    (``teacher: self``), None for the external frozen teacher (:mod:`jaxtok.train.self_teacher`)."""
    return (args.teacher_sync_every, trace_kl_end(args)) if args.teacher == "self" else None


def trace_lambda(step, kl_weight: float = 0.5, hold_steps: int = 10, decay_steps: int = 30) -> jax.Array:
    """TRACE KL weight (§3): ``w0`` for ``k < hold``, ``w0·(1 − (k−hold)/decay)`` for ``hold ≤ k < hold+decay``,
    0 after. ``step`` may be traced. f32 scalar (or the shape of ``step``)."""
    k = jnp.asarray(step, _F32)
    frac = (k - hold_steps) / max(decay_steps, 1)
    lam = jnp.where(k < hold_steps, 1.0, jnp.clip(1.0 - frac, 0.0, 1.0))
    return jnp.asarray(kl_weight, _F32) * jnp.where(k >= hold_steps + decay_steps, 0.0, lam)


def _teacher_hidden(teacher, batch) -> jax.Array:
    """The teacher's final hidden states aligned with the student's shifted columns ``[B, T-1, D']``.

    The teacher reads ``[privileged prompt (P', left-padded) ; completion (N)]`` (``teacher_tokens`` /
    ``teacher_positions`` / ``teacher_valid [B, T' = P'+N]``, :func:`trace_privileged_inputs`; absent: the
    student's own input) and the student ``[prompt (P) ; completion (N)]`` with ``P' ≥ P``: both end with the same
    ``N`` completion columns, so student column ``t`` and teacher column ``t + T' − T`` score the same token under
    the same prefix ``y_<t``; the last ``T−1`` shifted teacher columns are kept (prompt columns carry no loss)."""
    if "teacher_tokens" not in batch:
        return _hidden(teacher, batch)
    T, T2 = jnp.shape(batch["tokens"])[1], jnp.shape(batch["teacher_tokens"])[1]
    if T2 < T:
        raise ValueError(f"teacher_tokens width {T2} < tokens width {T}: the privileged prompt must not be "
                         f"narrower than the student's")
    out = teacher(batch["teacher_tokens"], positions=batch["teacher_positions"], valid=batch["teacher_valid"],
                  return_logits=False, return_hidden=True)
    return out.hidden[:, T2 - T:-1]  # [B, T-1, D']


def _span_kl(model, teacher, batch, args: TraceArgs):
    """Clipped ``fkl``/``rkl`` of the student to the teacher ``[B, T]`` (aligned with tokens, column 0 is 0); the
    teacher scores the same completion under its privileged prompt (:func:`_teacher_hidden`)."""
    y, _, tau = _shifted(batch)
    hs = _hidden(model, batch)  # [B, T-1, D]
    ht = jax.lax.stop_gradient(_teacher_hidden(teacher, batch))
    s_head, t_head = _head(model), _head(teacher)

    def one(c):
        lp_s = stats.log_probs(_scaled(s_head(c["hs"]), c["tau"]))  # [C, V]
        lp_t = stats.log_probs(jax.lax.stop_gradient(_scaled(t_head(c["ht"]), c["tau"])))
        return {"fkl": stats.divergence_from_log_probs("forward_kl", lp_s, lp_t, clip=args.token_clip),
                "rkl": stats.divergence_from_log_probs("reverse_kl", lp_s, lp_t, clip=args.token_clip)}

    out = chunked_map(one, {"hs": hs, "ht": ht, "tau": tau}, chunk_size=args.chunk_size, token_ndim=2)
    return jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1), out)


def _trace_stats(model, teacher, batch, lam, args: TraceArgs):
    """``logp [B, T]`` of the sampled tokens by :func:`policy_gradient.rollout_token_stats` (the GRPO path, so
    λ = 0 is exactly GRPO) and the span KLs, computed under ``lax.cond(λ > 0)``: once λ reaches 0 the teacher
    and the KL forward are skipped (§3). While λ > 0 the student runs twice (GRPO log-probs, KL). ``teacher=None``
    (the self-teacher after λ reached 0: the loop no longer passes it) has no KL branch at all."""
    st = rollout_token_stats(model, batch, chunk_size=args.chunk_size)
    if teacher is None:
        zeros = jnp.zeros(jnp.shape(batch["tokens"]), _F32)
        return {"logp": st["logp"], "entropy": st["entropy"], "fkl": zeros, "rkl": zeros}
    s_graph, s_state = nnx.split(model)
    t_graph, t_state = nnx.split(teacher)
    shape = jnp.shape(batch["tokens"])

    def with_kl(states):
        return _span_kl(nnx.merge(s_graph, states[0]), nnx.merge(t_graph, states[1]), batch, args)

    def without(states):
        return {"fkl": jnp.zeros(shape, _F32), "rkl": jnp.zeros(shape, _F32)}

    kl = jax.lax.cond(lam > 0, with_kl, without, (s_state, t_state))
    return {"logp": st["logp"], "entropy": st["entropy"], **kl}


# -- rule-based annotator for the synthetic tasks (the entry's ``prepare`` hook) ---------------------------------


def _step_chars(text: str):
    """``[(start, end)]`` of the ``;``-separated scratchpad steps of ``text`` (before the last ``>``) and the span
    of the answer after the last ``>`` (None when there is none)."""
    from jaxtok.tasks.base import ANSWER_MARK, scratchpad_steps

    steps = scratchpad_steps(text)
    if ANSWER_MARK in text:
        cut = text.rindex(ANSWER_MARK)
        return steps, (cut + 1, len(text))
    return steps, None


def annotate_completion(completion: str, target: str, correct: bool) -> list[tuple[int, int, int]]:
    """Character spans ``[(start, end, code)]`` of one completion against the verified solution ``target`` (§3,
    rule-based stand-in for the annotator model; tasks whose steps are ``;``-separated before ``>answer``).

    Correct completions: *key* spans = the result of each scratchpad step (the text after its last ``=``, the
    whole step when it has none) and the final answer. Incorrect completions: one *error* span = the first step
    that departs from the solution's step at the same index, from the first character where it departs to its end
    (``85-63=19`` against ``85-63=22``: ``19``, not the correctly copied operands — which, as the step's first
    tokens, the 25 % span cap would otherwise keep alone); or, when every step matches, the answer — or the text
    after the last matching step when there is no ``>``."""
    steps, answer = _step_chars(completion)
    if correct:
        out = []
        for s, e in steps:
            seg = completion[s:e]
            start = s + seg.rindex("=") + 1 if "=" in seg else s
            if start < e:
                out.append((start, e, SPAN_KEY))
        if answer is not None and answer[0] < answer[1]:
            out.append((answer[0], answer[1], SPAN_KEY))
        return out
    ref_steps, _ = _step_chars(target)
    for i, (s, e) in enumerate(steps):
        ref = target[ref_steps[i][0]:ref_steps[i][1]] if i < len(ref_steps) else None
        if completion[s:e] != ref:
            return [(_departure(completion[s:e], ref) + s, max(e, s + 1), SPAN_ERROR)] if s < len(completion) else []
    if answer is not None:
        return [(answer[0], max(answer[1], answer[0] + 1), SPAN_ERROR)] if answer[0] < len(completion) else []
    return []


def _departure(step: str, ref: Optional[str]) -> int:
    """Index in ``step`` of its first character that differs from the solution's step ``ref`` (its last character
    when ``step`` is a proper prefix of ``ref``; 0 without a solution step)."""
    if ref is None or not step:
        return 0
    k = next((i for i, (a, b) in enumerate(zip(step, ref)) if a != b), min(len(step), len(ref)))
    return min(k, len(step) - 1)


def _step_error_type(step: str, ref: Optional[str]) -> str:
    """Coarse type (:data:`TRACE_DIAGNOSES`) of a departing scratchpad step ``a∘b=r`` against the solution's
    ``a'∘'b'=r'`` at the same index: ``wrong operation`` (∘ ≠ ∘'), ``copy error`` (the carried value a ≠ a'),
    ``wrong operand`` (b ≠ b'), else on the result: ``sign error`` (r = −r'), ``carry error`` (|r − r'| a power of
    ten ≥ 10), ``arithmetic error``; ``step error`` when either step is not of that form."""
    import re

    form = r"(-?\d+)([+\-*/])(-?\d+)=(-?\d+)"  # re caches the compiled pattern
    m, r = re.fullmatch(form, step), re.fullmatch(form, ref) if ref is not None else None
    if m is None or r is None:
        return "step error"
    (a, op, b, res), (a2, op2, b2, res2) = m.groups(), r.groups()
    if op != op2:
        return "wrong operation"
    if a != a2:
        return "copy error"
    if b != b2:
        return "wrong operand"
    x, y = int(res), int(res2)
    if x == y:
        return "step error"
    if x == -y:
        return "sign error"
    d = str(abs(x - y))
    return "carry error" if len(d) > 1 and d == "1" + "0" * (len(d) - 1) else "arithmetic error"


def diagnose_completion(completion: str, target: str, correct: bool) -> str:
    """The annotator's coarse diagnostic label ``c`` of one completion (§3; rule-based stand-in for the annotator
    model, same step comparison as :func:`annotate_completion`): ``correct``; for incorrect completions the type
    of the first departing step (:func:`_step_error_type`), ``extra step`` (beyond the solution's steps),
    ``no answer`` (every step matches, no ``>answer``), ``missing step`` (fewer steps, wrong answer) or
    ``answer error``. A type only: never the span text or its location."""
    if correct:
        return "correct"
    steps, answer = _step_chars(completion)
    ref_steps, _ = _step_chars(target)
    for i, (s, e) in enumerate(steps):
        if i >= len(ref_steps):
            return "extra step"
        ref = target[ref_steps[i][0]:ref_steps[i][1]]
        if completion[s:e] != ref:
            return _step_error_type(completion[s:e], ref)
    if answer is None:
        return "no answer"
    return "missing step" if len(steps) < len(ref_steps) else "answer error"


def _privileged_example(example, label: str, template: str):
    """``example`` with its prompt replaced by ``template`` filled in (§3 teacher context): plain-text prompts
    become the filled template; chat prompts get it in their last user message (``{prompt}`` = its content)."""
    def fill(text):
        return template.format(prompt=text, label=label, target=example.target, answer=example.answer)

    if isinstance(example.prompt, str):
        return dataclasses.replace(example, prompt=fill(example.prompt))
    msgs = [dict(m) for m in example.prompt]
    users = [i for i, m in enumerate(msgs) if m.get("role") == "user"] or [len(msgs) - 1]
    msgs[users[-1]]["content"] = fill(msgs[users[-1]]["content"])
    return dataclasses.replace(example, prompt=msgs)


def privileged_width(prompt_len: int, completion_len: int, tokenizer, template: str = TRACE_TEMPLATE) -> int:
    """Static width ``P'`` (tokens) of the teacher's privileged prompts: the student's prompt width ``P``, the
    template's own text, the longest diagnostic label when it shows ``{label}``, and the completion width ``N`` per
    ``{target}``/``{answer}`` (a reference longer than the completion budget needs ``privileged_len``)."""
    from jaxtok.tasks.tokenizer import encode

    extra = len(encode(tokenizer, template.format(prompt="", label="", target="", answer="")))
    if "{label}" in template:
        extra += max(len(encode(tokenizer, c)) for c in TRACE_DIAGNOSES)
    extra += completion_len * (template.count("{target}") + template.count("{answer}"))
    return prompt_len + extra


def trace_privileged_inputs(batch: dict, examples: list, labels: list, tokenizer,
                            args: "TraceArgs" = None) -> dict:
    """The self-teacher's input (§3): ``teacher_tokens``, ``teacher_positions``, ``teacher_valid [B, P'+N]`` =
    the privileged prompt (``args.privileged_template`` filled with the example and its diagnostic label
    ``labels[b]``, left-padded to ``P'``) followed by the same ``N`` completion columns as ``tokens`` (from the
    first ``loss_mask`` column on), positions counting valid tokens as in the rollout. ``P' = args.privileged_len``
    or :func:`privileged_width`, at least ``P``, so :func:`_teacher_hidden` aligns the completion columns. The
    template ``"{prompt}"`` without ``privileged_len`` returns ``{}``: the teacher reads the student's own input."""
    from jaxtok.data import prompt_ids
    from jaxtok.tasks.tokenizer import SpecialTokens

    args = args if args is not None else TraceArgs()
    tokens, loss_mask = np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"], bool)
    B, T = tokens.shape
    cols = np.nonzero(loss_mask.any(axis=0))[0]
    P = int(cols[0]) if cols.size else T  # the prompt width (completions start at the same column in every row)
    if args.privileged_template == "{prompt}" and args.privileged_len in (None, P):
        return {}
    width = max(P, args.privileged_len or privileged_width(P, T - P, tokenizer, args.privileged_template))
    prompt = np.full((B, width), SpecialTokens.of(tokenizer).pad, np.int32)  # [B, P'] left-padded
    prompt_valid = np.zeros((B, width), bool)
    for b, (ex, label) in enumerate(zip(examples, labels)):
        ids = prompt_ids(tokenizer, _privileged_example(ex, label, args.privileged_template))
        if len(ids) > width:
            raise ConfigError(f"objective.args.privileged_len={width}: the privileged prompt of row {b} has "
                              f"{len(ids)} tokens; raise privileged_len")
        prompt[b, width - len(ids):] = ids
        prompt_valid[b, width - len(ids):] = True
    valid = np.concatenate([prompt_valid, loss_mask[:, P:]], axis=1)  # [B, P'+N]
    return {"teacher_tokens": np.concatenate([prompt, tokens[:, P:]], axis=1).astype(np.int32),
            "teacher_positions": np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32),
            "teacher_valid": valid}


def _piece_lengths(tokenizer, ids) -> list[int]:
    """Characters each token contributes to the decoded text (0 for special tokens)."""
    return [len(tokenizer.decode([int(i)], skip_special_tokens=True)) for i in ids]


def trace_annotate(batch: dict, texts: list, examples: list, task, tokenizer, args: "TraceArgs" = None) -> dict:
    """TRACE ``prepare`` hook (the loop passes the objective's ``args``, ``ObjectiveSpec.prepare_args``): ``spans
    [B, T]`` int8 (:data:`SPAN_KEY` on key spans of correct rollouts, :data:`SPAN_ERROR` on the first departing
    step of incorrect ones, 0 elsewhere), from the decoded completions and the tasks' verified ``example.target``
    (:func:`annotate_completion`), plus the teacher's privileged input built from each row's diagnostic label
    (:func:`diagnose_completion`, :func:`trace_privileged_inputs`). Character spans map to the completion tokens
    (``loss_mask`` columns, in order) that cover them; text stops at the first end-of-sequence token, like
    :func:`jaxtok.tasks.tokenizer.decode`."""
    from jaxtok.tasks.tokenizer import SpecialTokens

    eos = SpecialTokens.of(tokenizer).eos
    tokens, loss_mask = np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"], bool)
    spans = np.zeros(tokens.shape, np.int8)
    cache: dict[int, int] = {}
    labels = []
    for b, (text, ex) in enumerate(zip(texts, examples)):
        cols = np.nonzero(loss_mask[b])[0]
        ids = tokens[b, cols]
        stop = np.nonzero(ids == eos)[0]
        if stop.size:
            cols, ids = cols[:stop[0]], ids[:stop[0]]
        for i in set(ids.tolist()) - set(cache):
            cache[i] = _piece_lengths(tokenizer, [i])[0]
        ends = np.cumsum([cache[int(i)] for i in ids])
        starts = ends - np.asarray([cache[int(i)] for i in ids])
        correct = task.reward(text, ex) >= 1.0
        labels.append(diagnose_completion(text, ex.target, correct))
        for s, e, code in annotate_completion(text, ex.target, correct):
            hit = (starts < e) & (ends > s) & (ends > starts)
            spans[b, cols[hit]] = code
    return {"spans": spans, **trace_privileged_inputs(batch, examples, labels, tokenizer, args)}



@OBJECTIVES.register("trace", TraceArgs, data="rollout", models=("teacher",), prepare=trace_annotate,
                     prepare_args=True, self_teacher=trace_teacher_sync, batch_step=True, group_advantages=True)
def trace_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: TraceArgs = TraceArgs(), *,
               teacher: Optional[nnx.Module] = None):
    """TRACE (§3): ``L = agg(w_t · ℓ^GRPO_t) + λ_k · Σ_y L_span(y)`` in the aggregation's units, where
    ``L_span(y) = Σ_{t∈S_y} KL_t / |y|`` (sequence aggregations) or ``Σ_{t∈S_y} KL_t`` over the token count
    (``token-mean``); ``w_t = 1 − λ_k/w0`` on routed span tokens, 1 elsewhere. ``batch["spans"] [B, T]`` int8
    (:data:`SPAN_KEY` / :data:`SPAN_ERROR`, from :func:`trace_annotate`) is capped at ``coverage_cap`` per row.

    ``teacher``: the self-teacher (the student's synced copy, ``teacher: self``) or the external frozen model; it
    reads ``teacher_tokens``/``teacher_positions``/``teacher_valid`` (the privileged prompt + the same completion)
    when the batch has them. ``teacher=None`` with ``teacher: self`` is the run after λ reached 0, where the loop
    drops the teacher: λ is 0 and the loss is GRPO exactly.

    Aux: ``pg_loss``, ``span_kl`` (per span token), ``kl_lambda``, ``key_frac``/``error_frac`` (span tokens per
    loss token), ``clip_frac``, ``reward_mean``."""
    if teacher is None and args.teacher == "external":
        raise ConfigError("objective 'trace' with teacher: external needs the frozen teacher model "
                          "(rollout.teacher_init_from)")
    require_keys(batch, ("tokens", "positions", "valid", "loss_mask", "old_logprobs", "rewards", "group_ids",
                         "temperature", "spans"), "trace")
    del rng
    step = jnp.asarray(batch["step"]).reshape(-1)[0] if "step" in batch else args.step
    lam = trace_lambda(step, args.kl_weight, args.hold_steps, args.decay_steps)
    if teacher is None:  # self-teacher dropped (λ_k = 0 for every k ≥ trace_kl_end): pure GRPO
        lam = jnp.zeros_like(lam)
    st = _trace_stats(model, teacher, batch, lam, args)
    mask = jnp.asarray(batch["loss_mask"], _F32)  # [B, T]
    spans = jnp.asarray(batch["spans"])
    capped = sel.cap_spans(spans != SPAN_NONE, mask > 0, args.coverage_cap) > 0  # [B, T]
    key = capped & (spans == SPAN_KEY) & (args.key_divergence != "none")
    err = capped & (spans == SPAN_ERROR) & (args.error_divergence != "none")
    kl_of = {"forward_kl": st["fkl"], "reverse_kl": st["rkl"], "none": jnp.zeros_like(st["fkl"])}
    kl = jnp.where(key, kl_of[args.key_divergence], 0.0) + jnp.where(err, kl_of[args.error_divergence], 0.0)
    routed = key | err

    adv = sequence_advantages(batch["rewards"], batch["group_ids"], args.advantage_estimator, eps=args.adv_eps)
    ratio = P.token_ratio(st["logp"], batch["old_logprobs"], mask)
    pg, clipped, _ = P.ppo_clip_loss(ratio, jnp.broadcast_to(adv[:, None], mask.shape), args.eps_low,
                                     args.eps_high, args.dual_clip_c)
    w0 = max(args.kl_weight, 1e-30)
    w = jnp.where(routed, 1.0 - lam / w0, 1.0)
    pg_sum, count = P.aggregate(w * pg, mask, args.aggregation)

    kl_rows = jnp.sum(jnp.where(routed, kl, 0.0), axis=-1)  # [B]
    if args.aggregation == "token-mean":
        span_sum = jnp.sum(kl_rows)
    else:
        span_sum = jnp.sum(P.safe_divide(kl_rows, jnp.sum(mask, axis=-1)))
    loss_sum = pg_sum + jnp.where(lam > 0, lam * span_sum, 0.0)
    n_tok = jnp.sum(mask)
    one = jnp.ones((), _F32)
    aux = {"pg_loss": (pg_sum, count), "span_kl": (jnp.sum(kl_rows), jnp.sum(routed.astype(_F32))),
           "kl_lambda": (lam, one), "key_frac": (jnp.sum(key.astype(_F32)), n_tok),
           "error_frac": (jnp.sum(err.astype(_F32)), n_tok), "clip_frac": (jnp.sum(clipped * mask), n_tok),
           "entropy": (jnp.sum(jax.lax.stop_gradient(st["entropy"]) * mask), n_tok),
           "reward_mean": (jnp.sum(jnp.asarray(batch["rewards"], _F32)), jnp.full((), mask.shape[0], _F32))}
    return loss_sum, count, aux


# ----------------------------------------------------------------------------------------------------------------
# SHRED (§4)


@dataclasses.dataclass(frozen=True)
class ShredArgs:
    """Arguments of ``shred`` (§4): ``variant`` A (demote ``x_t``) or B (demote ``x_t`` and the nucleus of mass
    ``nucleus`` of θ0), ``forget_fraction`` P of the lowest-probability tokens per instance, ``top_k`` K of the
    target support, ``skip_tokens`` leading response tokens excluded (besides the prompt, which ``loss_mask``
    already excludes), ``empty_target``: ``skip`` the position or use ``uniform`` over the top-K when the demotion
    removes every top-K token, ``student_renorm_topk``: renormalise the student over the top-K too (ablation)."""

    variant: Literal["A", "B"] = "A"
    forget_fraction: float = 0.5
    top_k: int = 5
    nucleus: float = 0.9
    skip_tokens: int = 0
    empty_target: Literal["skip", "uniform"] = "skip"
    student_renorm_topk: bool = False
    chunk_size: int = 512

    def __post_init__(self):
        _choice("variant", self.variant, ("A", "B"))
        _choice("empty_target", self.empty_target, ("skip", "uniform"))
        if not 0.0 <= self.forget_fraction <= 1.0:
            raise ConfigError(f"forget_fraction={self.forget_fraction!r}: allowed [0, 1]")
        if not 0.0 < self.nucleus <= 1.0:
            raise ConfigError(f"nucleus={self.nucleus!r}: allowed (0, 1]")
        if self.top_k < 1 or self.skip_tokens < 0 or self.chunk_size < 1:
            raise ConfigError(f"top_k={self.top_k!r} (>= 1), skip_tokens={self.skip_tokens!r} (>= 0), "
                              f"chunk_size={self.chunk_size!r} (>= 1)")


def shred_targets(topk_logp: jax.Array, topk_ids: jax.Array, tokens: jax.Array, forget: jax.Array,
                  variant: str = "A", nucleus: float = 0.9, empty_target: str = "skip"):
    """SHRED stage-2 target (§4) on θ0's top-K (sorted descending; full-vocabulary log-probs ``[..., K]``).

    Demotion set ``V_t``: ``{x_t}`` (A) or ``{x_t} ∪ nucleus_π`` (B: the top tokens up to and including the one
    whose cumulative mass reaches π) on forget positions, ∅ elsewhere. ``q_t ∝ p_θ0 · 1[v ∈ I_t \\ V_t]``.
    Returns ``(log_q [..., K]`` with ``-inf`` on removed entries, ``ok [...]`` bool``)``; ``ok`` is False where
    nothing survives and ``empty_target = skip`` (``uniform``: q is uniform over ``I_t`` there)."""
    lp = topk_logp.astype(_F32)
    demote = topk_ids == tokens[..., None]
    if variant == "B":
        before = jnp.cumsum(jnp.exp(lp), axis=-1) - jnp.exp(lp)  # mass of the strictly higher-ranked tokens
        demote = demote | (before < nucleus)
    keep = ~(demote & forget[..., None])
    ok = jnp.any(keep, axis=-1)
    z = _logsumexp(jnp.where(keep, lp, -jnp.inf))
    log_q = jnp.where(keep, lp - jnp.where(ok, z, 0.0)[..., None], -jnp.inf)
    if empty_target == "uniform":
        log_q = jnp.where(ok[..., None], log_q, -math.log(lp.shape[-1]))
        ok = jnp.ones_like(ok)
    return log_q, ok


def _logsumexp(x: jax.Array) -> jax.Array:
    """``log Σ exp(x)`` over the last axis, ``-inf`` when every entry is ``-inf`` (no NaN)."""
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(x - m), axis=-1)
    return jnp.where(s > 0, jnp.log(jnp.where(s > 0, s, 1.0)) + m[..., 0], -jnp.inf)


def shred_token_kl(student_logits: jax.Array, log_q: jax.Array, topk_ids: jax.Array,
                   renorm_topk: bool = False) -> jax.Array:
    """``KL(q_t ‖ p_θ'(·|x_<t)) = Σ_{v∈supp q} q (log q − log p_θ'(v))`` with the full student softmax (or its
    renormalisation over the top-K ids). ``[..., V]``, ``[..., K]`` -> ``[...]`` f32."""
    if renorm_topk:
        lp_s = jax.nn.log_softmax(jnp.take_along_axis(student_logits.astype(_F32), topk_ids, axis=-1), axis=-1)
    else:
        lp_s = jnp.take_along_axis(stats.log_probs(student_logits), topk_ids, axis=-1)  # [..., K]
    return jnp.sum(stats.kl_terms(log_q, lp_s), axis=-1)


def _shred_reference(reference, batch, y, k, chunk_size):
    """θ0's ``logp [B, T-1]`` of the tokens and top-K ``(log-probs, ids) [B, T-1, K]``, no gradient."""
    head = _head(reference)

    def one(c):
        lp = stats.log_probs(head(c["h"]))  # [C, V]
        top_lp, top_ids = jax.lax.top_k(lp, k)
        return {"logp": jnp.take_along_axis(lp, c["y"][:, None], axis=-1)[:, 0], "top_lp": top_lp, "top_ids": top_ids}

    h = jax.lax.stop_gradient(_hidden(reference, batch))
    return jax.lax.stop_gradient(chunked_map(one, {"h": h, "y": y}, chunk_size=chunk_size, token_ndim=2,
                                             remat=False))


@OBJECTIVES.register("shred", ShredArgs, data="sft", models=("reference",))
def shred_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: ShredArgs = ShredArgs(), *,
               reference: Optional[nnx.Module] = None):
    """SHRED (§4) on SFT batches of the forget set: ``(Σ_{t∈T} KL(q_t ‖ p_θ'), |T|, aux)`` with ``T`` the response
    tokens after ``skip_tokens`` (minus skipped empty targets). ``reference`` = θ0 (``rollout.reference: init``).
    Aux: ``forget_frac`` (share of T demoted), ``target_x_mass`` (θ0's mass on x_t kept in the target)."""
    del rng
    if reference is None:
        raise ConfigError("objective 'shred' needs the frozen original model: set rollout.reference: init")
    require_keys(batch, ("tokens", "loss_mask"), "shred")
    y, mask, _ = _shifted(batch)
    in_t = mask & (jnp.cumsum(mask, axis=-1) > args.skip_tokens)  # [B, T-1]
    k = min(args.top_k, model.cfg.vocab_size)
    ref = _shred_reference(reference, batch, y, k, args.chunk_size)
    forget = sel.lowest_prob(ref["logp"], in_t, args.forget_fraction, per_row=True) > 0
    log_q, ok = shred_targets(ref["top_lp"], ref["top_ids"], y, forget, args.variant, args.nucleus,
                              args.empty_target)
    use = in_t & ok
    head = _head(model)

    def one(c):
        return shred_token_kl(head(c["h"]), c["log_q"], c["ids"], args.student_renorm_topk)

    kl = chunked_map(one, {"h": _hidden(model, batch), "log_q": log_q, "ids": ref["top_ids"]},
                     chunk_size=args.chunk_size, token_ndim=2)  # [B, T-1]
    n = jnp.sum(use.astype(_F32))
    q_x = jnp.sum(jnp.where(ref["top_ids"] == y[..., None], jnp.exp(log_q), 0.0), axis=-1)
    aux = {"forget_frac": (jnp.sum((forget & in_t).astype(_F32)), jnp.sum(in_t.astype(_F32))),
           "target_x_mass": (jnp.sum(jnp.where(use, q_x, 0.0)), n)}
    return jnp.sum(jnp.where(use, kl, 0.0)), n, aux
