"""ReasonMaxxer: sparse contrastive correction at entropy-gated decision points (train_methods.md §7).

Data (offline, no online generation in the paper): ``n`` base-model rollouts per problem, verified (reward 1/0);
problems whose pass rate is closest to 0.5 among those with both correct and incorrect rollouts
(:func:`select_mid_problems`), the shortest ``keep_fraction`` of their rollouts (:func:`shortest_rows`);
:func:`build_pool` does both on a host batch and attaches the per-problem advantages computed on the full
rollout set of each problem. The objective consumes a batch in the rollout layout (COMMON brief):

- ``tokens, positions, valid [B, T]``, ``loss_mask [B, T]`` (generated tokens), ``rewards [B]``,
  ``group_ids [B]`` (problem id);
- optional ``advantages [B]`` (precomputed on the pool; else computed from ``rewards``/``group_ids`` over the rows
  of the batch, which needs whole groups in the batch: ``train.micro_batches = 1``);
- optional ``base_entropy [B, T]`` (teacher-forced base-model entropy in nats, aligned with ``tokens`` like
  ``old_logprobs``); else it is computed from the frozen ``reference`` (= the base model) in the same forward that
  gives the KL anchor.

Registered as a rollout objective, so ``jaxtok train`` can also run it online: every ``rollout.inner_epochs``
steps a fresh pool of ``G`` problems × ``num_generations`` rollouts of the current policy is scored and the
decision gate reads the frozen base (``rollout.reference: init``) — mixed-outcome groups carry the signal, the
others only anchor (their advantages are 0).

Loss (``decision_objective = adv_ce``): decision tokens ``D`` = generated tokens with ``H_base(t) > τ`` (``τ_pos``
for rows with ``A > 0``, ``τ_neg`` otherwise) and ``A ≠ 0``;
``L_dec = Σ_{t∈D} w_i (−log π_θ(y_t)) / |D|`` with ``w_i = A_i`` (``β_neg · A_i`` for ``A_i < 0``);
``L_KL = mean_{t∉D} KL(π_base ‖ π_θ)`` (full vocab, float32) over valid predicted positions (prompt included unless
``kl_on_generated_only``); ``L = L_dec + λ_KL L_KL``. Variants: ``fullseq`` (every generated token with ``A ≠ 0`` is
a decision token), ``correct_sft`` (CE with weight 1 on the generated tokens of correct rows, ``A > 0``). Log-probs
and entropies are at temperature 1 (teacher-forced, as in the reference scripts).

(sum, count): the two means have different denominators, so the objective returns ``(L, 1, aux)``: the step's
``Σ loss_sum / Σ count`` is then the mean of per-(micro-)batch losses, which is what the reference trainer does
(batch 1 × gradient accumulation, each micro-batch's own means).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.policy import safe_divide
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.stats import chunked_map
from jaxtok.train.objectives.policy_gradient import dense_group_ids, require_keys

__all__ = ["ReasonMaxxerArgs", "DECISION_OBJECTIVES", "reasonmaxxer_advantages", "select_mid_problems",
           "shortest_rows", "build_pool", "decision_mask", "reasonmaxxer_terms", "reasonmaxxer_token_stats",
           "reasonmaxxer_loss"]

_F32 = jnp.float32
DECISION_OBJECTIVES = ("adv_ce", "fullseq", "correct_sft")


@dataclasses.dataclass(frozen=True)
class ReasonMaxxerArgs:
    """``decision_objective``: ``adv_ce`` | ``fullseq`` | ``correct_sft``; ``tau_pos``/``tau_neg``: entropy gates
    (nats) for correct / incorrect rows (``tau_neg = None``: same as ``tau_pos``; paper example 1.4, script
    default 0.8); ``kl_coef``: λ_KL (script 0.1, Qwen2.5-1.5B example 0.2); ``adv_clip``: |A| cap (2.5);
    ``beta_neg``: scale of negative advantages; ``kl_on_generated_only``: anchor only generated positions;
    ``chunk_size``: tokens per float32 full-vocab chunk."""

    decision_objective: str = "adv_ce"
    tau_pos: float = 1.4
    tau_neg: Optional[float] = None
    kl_coef: float = 0.1
    adv_clip: float = 2.5
    beta_neg: float = 1.0
    kl_on_generated_only: bool = False
    chunk_size: int = 1024

    def __post_init__(self):
        if self.decision_objective not in DECISION_OBJECTIVES:
            raise ConfigError(f"decision_objective={self.decision_objective!r} is not allowed; allowed: "
                              f"{list(DECISION_OBJECTIVES)}")
        for name in ("tau_pos", "tau_neg", "kl_coef", "beta_neg"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name}={v!r} must be ≥ 0")
        if self.adv_clip <= 0:
            raise ConfigError(f"adv_clip={self.adv_clip!r} must be > 0")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size={self.chunk_size!r} must be ≥ 1")


# ----------------------------------------------------------------------------------------------------------------
# data: advantages and problem selection (host or jit)


def reasonmaxxer_advantages(rewards, group_ids, clip: float = 2.5):
    """Per-problem advantage ``A_i = clip((r_i − mean_g) / max(pstd_g, 1e-8), ±clip)`` (population std, §7).
    ``[B]`` float32; 0 for zero-variance groups."""
    r = jnp.asarray(rewards, _F32)
    g = dense_group_ids(group_ids)
    seg = lambda x: jax.ops.segment_sum(x, g, num_segments=g.shape[0])  # noqa: E731
    n = seg(jnp.ones_like(r))
    mean = safe_divide(seg(r), n)[g]
    std = jnp.sqrt(safe_divide(seg((r - mean) ** 2), n))[g]
    adv = jnp.where(std > 0, (r - mean) / jnp.maximum(std, 1e-8), 0.0)
    return jnp.clip(adv, -clip, clip)


def select_mid_problems(rewards, group_ids, num_problems: int = 50) -> np.ndarray:
    """Problem ids (sorted) of the ``num_problems`` problems whose pass rate is closest to 0.5 among those with
    both correct (reward > 0) and incorrect rollouts (§7 data step 4); ties go to the smaller id."""
    if num_problems < 1:
        raise ConfigError(f"num_problems={num_problems!r} must be ≥ 1")
    correct = np.asarray(rewards) > 0
    ids = np.asarray(group_ids)
    problems = np.unique(ids)
    rate = np.array([correct[ids == p].mean() for p in problems])
    mixed = (rate > 0) & (rate < 1)
    cand, dist = problems[mixed], np.abs(rate[mixed] - 0.5)
    order = np.lexsort((cand, dist))
    return np.sort(cand[order[:num_problems]])


def shortest_rows(lengths, keep_fraction: float = 0.8) -> np.ndarray:
    """Bool mask of the ``ceil(keep_fraction · N)`` shortest rows (ties to the earlier row) (§7 data step 4)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ConfigError(f"keep_fraction={keep_fraction!r} must be in (0, 1]")
    lengths = np.asarray(lengths)
    k = int(np.ceil(keep_fraction * len(lengths) - 1e-9))
    keep = np.zeros(len(lengths), bool)
    keep[np.argsort(lengths, kind="stable")[:k]] = True
    return keep


def build_pool(batch: dict, *, num_problems: int = 50, keep_fraction: float = 0.8, adv_clip: float = 2.5) -> dict:
    """The ReasonMaxxer training pool from a host rollout batch of ``n`` rollouts per problem: rows of the selected
    mid-pass-rate problems, trimmed to their shortest ``keep_fraction``, with ``advantages [B']`` computed on each
    selected problem's full rollout set (before trimming). All ``[B, ...]`` arrays are indexed alike."""
    problems = select_mid_problems(batch["rewards"], batch["group_ids"], num_problems)
    in_sel = np.isin(np.asarray(batch["group_ids"]), problems)
    adv = np.asarray(reasonmaxxer_advantages(np.asarray(batch["rewards"])[in_sel],
                                             np.asarray(batch["group_ids"])[in_sel], adv_clip))
    lengths = np.asarray(batch["loss_mask"]).sum(axis=1)[in_sel]
    keep = shortest_rows(lengths, keep_fraction)
    rows = np.flatnonzero(in_sel)[keep]
    out = {k: np.asarray(v)[rows] for k, v in batch.items()}
    out["advantages"] = adv[keep].astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the loss


def decision_mask(base_entropy, gen_mask, advantages, args: ReasonMaxxerArgs):
    """Decision tokens ``[B, T]`` bool: generated, ``A ≠ 0`` and (``adv_ce``) ``H_base > τ_pos`` on rows with
    ``A > 0`` / ``> τ_neg`` on the others; all such generated tokens for ``fullseq``; the generated tokens of
    ``A > 0`` rows for ``correct_sft``."""
    adv = jnp.asarray(advantages, _F32)[:, None]
    gen = jnp.asarray(gen_mask, bool)
    if args.decision_objective == "correct_sft":
        return gen & (adv > 0)
    if args.decision_objective == "fullseq":
        return gen & (adv != 0)
    tau_neg = args.tau_pos if args.tau_neg is None else args.tau_neg
    tau = jnp.where(adv > 0, args.tau_pos, tau_neg)
    return gen & (adv != 0) & (jnp.asarray(base_entropy, _F32) > tau)


def reasonmaxxer_terms(logp, kl, decision, kl_mask, advantages, args: ReasonMaxxerArgs):
    """``L = L_dec + λ_KL L_KL`` from per-token arrays (module docstring; §7). Returns ``(loss, aux)``.

    ``logp [B, T]``: log π_θ of the target tokens; ``kl [B, T]``: ``KL(π_base ‖ π_θ)`` per position;
    ``decision [B, T]`` bool; ``kl_mask [B, T]`` bool (anchor positions before removing decisions);
    ``advantages [B]``. Non-decision tokens get gradient only through the KL term; empty sets give 0."""
    d = jnp.asarray(decision, _F32)
    adv = jnp.asarray(advantages, _F32)[:, None]
    if args.decision_objective == "correct_sft":
        w = jnp.ones_like(adv)
    else:
        w = jnp.where(adv < 0, args.beta_neg * adv, adv)
    n_dec = jnp.sum(d)
    dec_sum = jnp.sum(jnp.where(d > 0, -w * jnp.asarray(logp, _F32), 0.0))
    dec = safe_divide(dec_sum, n_dec)
    anchor = jnp.asarray(kl_mask, _F32) * (1.0 - d)
    n_kl = jnp.sum(anchor)
    kl_mean = safe_divide(jnp.sum(jnp.where(anchor > 0, jnp.asarray(kl, _F32), 0.0)), n_kl)
    loss = dec + args.kl_coef * kl_mean
    one = jnp.ones((), _F32)
    aux = {"decision_loss": (dec, one), "kl_anchor": (jax.lax.stop_gradient(kl_mean), one),
           "decision_tokens": (n_dec, one), "anchor_tokens": (n_kl, one),
           "pos_decision_tokens": (jnp.sum(d * (adv > 0)), one)}
    return loss, aux


def reasonmaxxer_token_stats(model: nnx.Module, batch: dict, reference: Optional[nnx.Module], *,
                             chunk_size: int = 1024) -> dict:
    """Per-token float32 ``logp`` (policy, target token), and with a ``reference``: ``kl = KL(π_ref ‖ π_θ)``
    (full vocab) and ``base_entropy`` (nats) of the reference. ``[B, T]`` aligned with ``tokens`` (column 0 = 0);
    chunked and rematerialised like :func:`jaxtok.train.objectives.policy_gradient.rollout_token_stats`."""
    tokens = batch["tokens"]
    fwd = dict(positions=batch.get("positions"), valid=batch.get("valid"), return_logits=False, return_hidden=True)
    tree = {"hidden": model(tokens, **fwd).hidden[:, :-1], "target": tokens[:, 1:].astype(jnp.int32)}
    graphdef, state = nnx.split(model)
    if reference is not None:
        tree["ref_hidden"] = jax.lax.stop_gradient(reference(tokens, **fwd).hidden[:, :-1])
        ref_graphdef, ref_state = nnx.split(reference)

    def one(chunk):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, state).logits(chunk["hidden"]).astype(_F32), axis=-1)
        out = {"logp": jnp.take_along_axis(logp, chunk["target"][:, None], axis=-1)[:, 0]}
        if "ref_hidden" in chunk:
            ref_logits = nnx.merge(ref_graphdef, ref_state).logits(chunk["ref_hidden"]).astype(_F32)
            ref_logp = jax.lax.stop_gradient(jax.nn.log_softmax(ref_logits, axis=-1))  # [C, V]
            p_ref = jnp.exp(ref_logp)
            out["kl"] = jnp.sum(p_ref * (ref_logp - logp), axis=-1)
            out["base_entropy"] = -jnp.sum(p_ref * ref_logp, axis=-1)
        return out

    out = chunked_map(one, tree, chunk_size=chunk_size, token_ndim=2)
    return jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1), out)


@OBJECTIVES.register("reasonmaxxer", ReasonMaxxerArgs, data="rollout", models=("reference",),
                     group_advantages=True)
def reasonmaxxer_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: ReasonMaxxerArgs = ReasonMaxxerArgs(),
                      *, reference: Optional[nnx.Module] = None):
    """ReasonMaxxer loss ``(L, 1, aux)`` on a pool / rollout batch (module docstring). ``reference`` is the frozen
    base model (``rollout.reference: init``): required for the KL anchor (``kl_coef > 0``) and, when the batch has
    no ``base_entropy``, for the entropy gate."""
    del rng
    require_keys(batch, ("tokens", "valid", "loss_mask", "rewards", "group_ids"), "reasonmaxxer")
    gate_needs_ref = args.decision_objective == "adv_ce" and "base_entropy" not in batch
    if reference is None and (args.kl_coef > 0 or gate_needs_ref):
        raise ConfigError("reasonmaxxer needs the frozen base model as the reference (rollout.reference: init) "
                          f"for its KL anchor (kl_coef={args.kl_coef}) and entropy gate (no base_entropy in batch)")
    use_ref = reference is not None and (args.kl_coef > 0 or gate_needs_ref)
    stats = reasonmaxxer_token_stats(model, batch, reference if use_ref else None, chunk_size=args.chunk_size)
    gen = jnp.asarray(batch["loss_mask"], bool)
    valid = jnp.asarray(batch["valid"], bool)
    if "advantages" in batch:
        adv = jnp.asarray(batch["advantages"], _F32)
    else:
        adv = reasonmaxxer_advantages(batch["rewards"], batch["group_ids"], args.adv_clip)
    entropy = batch["base_entropy"] if "base_entropy" in batch else stats.get("base_entropy", jnp.zeros(gen.shape))
    decision = decision_mask(entropy, gen, adv, args)
    predicted = valid & jnp.concatenate([jnp.zeros_like(valid[:, :1]), valid[:, :-1]], axis=1)  # t and t-1 valid
    kl_mask = gen if args.kl_on_generated_only else predicted
    kl = stats.get("kl", jnp.zeros(gen.shape, _F32))
    loss, aux = reasonmaxxer_terms(stats["logp"], kl, decision, kl_mask, adv, args)
    n_gen = jnp.sum(gen.astype(_F32))
    aux["decision_frac"] = (aux["decision_tokens"][0], n_gen)
    return loss, jnp.ones((), _F32), aux
