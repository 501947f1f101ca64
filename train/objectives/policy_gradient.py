"""RL policy-gradient objective on rollout batches: PPO/GRPO, Dr.GRPO, DAPO, GSPO(-token), CTPO, CPPO, APPO.

Spec ``train_methods.md`` §6 (losses, advantages, KL, DAPO extras) and §9 (APPO future-KL loss). The loss algebra
lives in :mod:`jaxtok.policy`; this module turns a rollout batch (COMMON brief, "Rollout-driven objectives") into
its inputs:

1. one forward of the policy; per-token float32 log-probs of the sampled tokens under ``softmax(logits / τ)`` with
   ``τ = batch["temperature"]`` (the rollout's sampling temperature, so the first inner epoch has ratio 1) and the
   entropy of that distribution, chunked over tokens (no ``[B, T, V]`` float32 array);
2. optional DAPO overlong shaping of the rewards (:func:`jaxtok.policy.overlong_reward_penalty`);
3. sequence advantages from ``rewards``/``group_ids`` (:func:`jaxtok.policy.outcome_advantages`) unless the batch
   carries precomputed ``advantages`` (``[B]`` or token-level ``[B, T]``, e.g. APPO procedure-level advantages);
4. optional DAPO dynamic sampling: rows of groups whose accuracy (``batch["accuracy"]``, the task verifier; the
   unshaped rewards without it) is all equal are masked out (static shapes: no refill);
5. :func:`jaxtok.policy.policy_loss` (plus ``kl_coef · agg(k)`` against the frozen ``reference`` when set) minus
   ``entropy_coef · agg(H)``.

(sum, count) and the train step: the step minimises ``Σ loss_sum / Σ count`` over micro-batches. ``count`` is the
aggregation's own denominator (:func:`jaxtok.policy.aggregate`): tokens for ``token-mean``; sequences with at least
one loss token (``B'``) for ``seq-mean-token-mean``, ``seq-mean-token-sum`` and ``seq-mean-token-sum-norm`` (whose
per-sequence sum is divided by the constant ``L_max``: ``norm_length`` when set, else the rollout's generation
budget ``batch["max_new_tokens"]`` — never the prompt + completion width, which would tie the learning rate to
``data.prompt_len`` — and the padded length ``T`` only for a batch without that key; the 1/B' follows the Dr.GRPO
paper, verl omits it). Summing pairs over micro-batches and dividing once therefore reproduces the
full-batch loss exactly, whatever the mode.

Groups and micro-batches: advantages and the dynamic-sampling mask are computed over the rows of the batch the
objective sees. ``train.micro_batches > 1`` interleaves rows (step.py ``_split_micro``), which splits every group
across micro-batches; use ``micro_batches = 1`` with in-objective advantages, or precompute ``advantages`` on the
whole rollout batch on the host (:func:`host_advantages`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok import policy as P
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.stats import chunked_map

__all__ = ["PolicyGradientArgs", "policy_gradient_loss", "rollout_token_stats", "dense_group_ids",
           "sequence_advantages", "dynamic_sampling_mask", "filter_metric", "norm_length_of",
           "shape_overlong_rewards", "host_advantages", "require_keys"]

_F32 = jnp.float32
ROLLOUT_KEYS = ("tokens", "positions", "valid", "loss_mask", "old_logprobs", "rewards", "group_ids", "temperature")
# optional keys: "accuracy" [B] (dynamic sampling), "max_new_tokens" [B] (Dr.GRPO's L_max), "advantages",
# "row_keep", "topk_ids"/"topk_logprobs" (CPPO top-K)
_MODE_ESTIMATOR = {"dr_grpo": "dr_grpo"}  # loss_mode -> default advantage estimator (else "grpo", Bessel std)
_DYNAMIC_SAMPLING = ("dapo", "cppo")  # modes that drop zero-variance groups by default (DAPO; CPPO "mask_std_0")


@dataclasses.dataclass(frozen=True)
class PolicyGradientArgs(P.PolicyLossConfig):
    """Arguments of the ``policy_gradient`` objective: every :class:`jaxtok.policy.PolicyLossConfig` field (clip
    ε's, dual-clip, aggregation, KL coef/estimator, CTPO/CPPO/APPO knobs; ``None`` = the loss mode's default) plus:

    - ``loss_mode``: a name in :data:`jaxtok.policy.LOSS_MODES` (the registry of loss modes).
    - ``advantage_estimator``: one of :data:`jaxtok.policy.ADV_ESTIMATORS`; None -> ``dr_grpo`` for
      ``loss_mode=dr_grpo``, else ``grpo`` (Bessel std, verl). ``adv_eps``: the ε in ``(r − mean)/(std + ε)``.
    - ``dynamic_sampling``: drop (mask) rows of groups whose accuracy is all equal (max − min ≤
      ``dynamic_sampling_atol``): DAPO filters on the verifier's accuracy (``filter_groups.metric = acc``),
      ``batch["accuracy"]``, not on the length-shaped reward; a batch without it filters on the unshaped
      ``rewards``. None -> on for ``dapo`` and ``cppo``.
    - ``norm_length``: Dr.GRPO's ``L_max``; None -> the rollout's ``max_new_tokens [B]`` (module docstring).
    - ``overlong_buffer`` > 0 turns on DAPO's soft overlong punishment with ``overlong_max_length`` (the rollout's
      ``max_new_tokens``) and ``overlong_penalty_factor``; completion length = Σ loss_mask of the row.
    - ``entropy_coef``: entropy bonus ``− coef · agg(H_t)`` (current policy, at the rollout temperature).
    - ``cppo_delta_b_adaptive``: per-sequence ``δ_b = clamp(P90(D), δ_b^min, 2 δ_b^min)`` (base models, §6.5)
      with ``δ_b^min = cppo_delta_b_min``; else the fixed ``cppo_delta_b``. CPPO's ``topk_tv``/``topk_kl``
      divergences read the rollout's ``topk_ids [B, T, K]`` and ``topk_logprobs [B, T, K]``, aligned with
      ``tokens`` like ``old_logprobs`` (position t: μ's top-K of the distribution that sampled token t, at the
      rollout temperature).
    - ``chunk_size``: tokens per float32 log-softmax chunk.
    """

    loss_mode: str = "grpo"
    advantage_estimator: Optional[str] = None
    adv_eps: float = 1e-6
    dynamic_sampling: Optional[bool] = None
    dynamic_sampling_atol: float = 0.0
    overlong_buffer: int = 0
    overlong_max_length: int = 0
    overlong_penalty_factor: float = 1.0
    entropy_coef: float = 0.0
    cppo_delta_b_adaptive: bool = False
    cppo_delta_b_min: float = 0.02
    chunk_size: int = 1024

    def __post_init__(self):
        super().__post_init__()
        P._check_choice("loss_mode", self.loss_mode, P.LOSS_MODES.names())
        if self.advantage_estimator is not None:
            P._check_choice("advantage_estimator", self.advantage_estimator, P.ADV_ESTIMATORS)
        if self.overlong_buffer < 0:
            raise ConfigError(f"overlong_buffer={self.overlong_buffer!r} must be ≥ 0 (0 = off)")
        if self.overlong_buffer > 0 and not 0 < self.overlong_buffer <= self.overlong_max_length:
            raise ConfigError(f"overlong_buffer={self.overlong_buffer!r} needs overlong_max_length "
                              f"(={self.overlong_max_length!r}) ≥ overlong_buffer; set it to rollout.max_new_tokens")
        if self.entropy_coef < 0:
            raise ConfigError(f"entropy_coef={self.entropy_coef!r} must be ≥ 0")
        if self.adv_eps < 0:  # 0 is allowed: zero-variance groups get advantage exactly 0 (jaxtok.policy)
            raise ConfigError(f"adv_eps={self.adv_eps!r} must be >= 0")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size={self.chunk_size!r} must be ≥ 1")

    @property
    def estimator(self) -> str:
        return self.advantage_estimator or _MODE_ESTIMATOR.get(self.loss_mode, "grpo")

    @property
    def drop_zero_variance(self) -> bool:
        return self.loss_mode in _DYNAMIC_SAMPLING if self.dynamic_sampling is None else self.dynamic_sampling


def require_keys(batch: dict, keys, objective: str) -> None:
    """Raise ConfigError naming the missing batch keys of ``objective``."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ConfigError(f"objective {objective!r} needs batch keys {missing}; got {sorted(batch)}")


# ----------------------------------------------------------------------------------------------------------------
# forward


def rollout_token_stats(model: nnx.Module, batch: dict, *, temperature=None, chunk_size: int = 1024,
                        with_entropy: bool = True, topk_ids: Optional[jax.Array] = None) -> dict:
    """Per-token float32 statistics of ``model`` on a rollout batch, aligned with ``tokens`` (column 0 is 0).

    ``logp[b, t] = log softmax(logits[b, t-1] / τ_b)[tokens[b, t]]`` (``τ = temperature`` ``[B]``, default
    ``batch["temperature"]``), ``entropy[b, t]`` of that distribution (nats) and, with ``topk_ids [B, T, K]``,
    ``topk_logp [B, T, K]`` at those ids. The log-softmax runs in float32 over chunks of tokens inside a
    rematerialised scan (:func:`jaxtok.stats.chunked_map`). Values are not masked; callers apply ``loss_mask``."""
    tokens = batch["tokens"]
    B, T = tokens.shape
    tau = jnp.asarray(batch["temperature"] if temperature is None else temperature, _F32)
    tau = jnp.broadcast_to(tau, (B,))
    hidden = model(tokens, positions=batch.get("positions"), valid=batch.get("valid"), return_logits=False,
                   return_hidden=True).hidden  # [B, T, D]
    graphdef, state = nnx.split(model)

    def one(chunk):  # hidden at t-1 scores token t
        logits = nnx.merge(graphdef, state).logits(chunk["hidden"]).astype(_F32)  # [C, V]
        tau = jnp.where(chunk["tau"] > 0, chunk["tau"], 1.0)  # chunk padding rows carry τ = 0 (NaN gradients)
        logp = jax.nn.log_softmax(logits / tau[:, None], axis=-1)
        out = {"logp": jnp.take_along_axis(logp, chunk["target"][:, None], axis=-1)[:, 0]}
        if with_entropy:
            out["entropy"] = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        if "topk" in chunk:
            out["topk_logp"] = jnp.take_along_axis(logp, chunk["topk"], axis=-1)  # [C, K]
        return out

    tree = {"hidden": hidden[:, :-1], "target": tokens[:, 1:].astype(jnp.int32),
            "tau": jnp.broadcast_to(tau[:, None], (B, T - 1))}
    if topk_ids is not None:
        tree["topk"] = jnp.asarray(topk_ids, jnp.int32)[:, 1:]
    out = chunked_map(one, tree, chunk_size=chunk_size, token_ndim=2)  # [B, T-1, ...]
    return jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1), out)


# ----------------------------------------------------------------------------------------------------------------
# advantages, dynamic sampling, overlong shaping


def dense_group_ids(group_ids) -> jax.Array:
    """Group ids relabelled ``0..G-1`` (``[B]`` int32, jit-safe with a static bound of ``B`` groups), so segment
    sums work on any subset of rows whatever the original ids."""
    g = jnp.asarray(group_ids, jnp.int32)
    _, inverse = jnp.unique(g, size=g.shape[0], fill_value=jnp.iinfo(jnp.int32).max, return_inverse=True)
    return inverse.reshape(g.shape).astype(jnp.int32)


def sequence_advantages(rewards, group_ids, estimator: str = "grpo", *, eps: float = 1e-6, valid=None):
    """Outcome advantages ``[B]`` of the rows of one batch (§6.2), groups by ``group_ids`` (any int labels)."""
    g = dense_group_ids(group_ids)
    return P.outcome_advantages(estimator, rewards, g, g.shape[0], valid=valid, eps=eps)


def dynamic_sampling_mask(rewards, group_ids, atol: float = 0.0):
    """DAPO dynamic sampling as a row mask ``[B]`` bool: False for rows of groups whose values (the accuracy, see
    :func:`filter_metric`) are all equal."""
    g = dense_group_ids(group_ids)
    return P.zero_variance_group_mask(rewards, g, g.shape[0], atol=atol)


def shape_overlong_rewards(rewards, lengths, max_length: int, buffer_length: int,
                           penalty_factor: float = 1.0) -> np.ndarray:
    """DAPO soft overlong punishment (§6.2) as a host reward transform: ``r + penalty(|y|)``, float32 ``[B]``.

    ``lengths``: completion lengths in tokens; the penalty is 0 up to ``max_length − buffer_length``, falls
    linearly to ``−penalty_factor`` at ``max_length`` and stays there
    (:func:`jaxtok.policy.overlong_reward_penalty`)."""
    pen = P.overlong_reward_penalty(np.asarray(lengths, np.float32), max_length, buffer_length, penalty_factor)
    return (np.asarray(rewards, np.float32) + np.asarray(pen)).astype(np.float32)


def filter_metric(batch: dict):
    """What DAPO dynamic sampling compares within a group (§6.2): the verifier's ``accuracy [B]`` (DAPO
    ``filter_groups.metric = acc``), else the unshaped ``rewards [B]`` — never the overlong-shaped reward, whose
    length penalty would keep groups that are all right or all wrong. ``[B]`` float32."""
    return jnp.asarray(batch["accuracy"] if "accuracy" in batch else batch["rewards"], _F32)


def norm_length_of(batch: dict, args: PolicyGradientArgs):
    """Dr.GRPO's ``L_max`` (§6.2, ``seq-mean-token-sum-norm``): ``args.norm_length`` when set, else the rollout's
    generation budget ``batch["max_new_tokens"] [B]`` (``rollout.max_new_tokens``), else None (the padded
    length, :func:`jaxtok.policy.aggregate`)."""
    if args.norm_length is not None or "max_new_tokens" not in batch:
        return args.norm_length
    return jnp.asarray(batch["max_new_tokens"], _F32)  # [B]


def host_advantages(batch: dict, args: PolicyGradientArgs) -> dict:
    """Whole-batch ``advantages [B]`` and ``row_keep [B]`` (dynamic sampling) computed on the host rollout batch,
    for runs that split it into micro-batches (module docstring). Applies the same overlong shaping and estimator
    as the objective; merge the result into the batch before it is split."""
    rewards = _shaped_rewards(jnp.asarray(batch["rewards"]), jnp.asarray(batch["loss_mask"]), args)
    adv = sequence_advantages(rewards, batch["group_ids"], args.estimator, eps=args.adv_eps)
    keep = (dynamic_sampling_mask(filter_metric(batch), batch["group_ids"], args.dynamic_sampling_atol)
            if args.drop_zero_variance else jnp.ones(adv.shape, bool))
    return {"advantages": np.asarray(adv, np.float32), "row_keep": np.asarray(keep, bool)}


def _shaped_rewards(rewards, loss_mask, args: PolicyGradientArgs):
    r = jnp.asarray(rewards, _F32)
    if args.overlong_buffer > 0:
        lengths = jnp.sum(jnp.asarray(loss_mask, _F32), axis=-1)
        r = r + P.overlong_reward_penalty(lengths, args.overlong_max_length, args.overlong_buffer,
                                          args.overlong_penalty_factor)
    return r


# ----------------------------------------------------------------------------------------------------------------
# the objective

_TOKEN_MEANS = ("clip_frac", "dual_clip_frac", "ratio_mean", "approx_kl", "entropy", "cppo_token_reject_frac",
                "cppo_budget_reject_frac", "cppo_mask_mean", "divergence_mean", "appo_future_factor_mean")


def _aux(diag: dict, count, cfg: P.PolicyLossConfig) -> dict:
    """policy_loss diagnostics as step aux ``(sum, count)`` pairs (exact under accumulation, except the ratio
    min/max and APPO's dropped-sequence count, which average over micro-batches)."""
    n = diag["num_tokens"]
    aux = {k: (diag[k] * n, n) for k in _TOKEN_MEANS if k in diag}
    aux["pg_loss"] = (diag["pg_loss"] * count, count)
    if "kl_loss" in diag:
        aux["kl_loss"] = (diag["kl_loss"] * count, count)
    for k in ("ratio_min", "ratio_max", "appo_dropped_seqs"):
        if k in diag:
            aux[k] = (diag[k], jnp.ones((), _F32))
    for i in range(cfg.num_position_buckets):
        aux[f"clip_frac_pos{i}"] = (diag["clip_count_by_bucket"][i], diag["token_count_by_bucket"][i])
    return aux


def _cppo_inputs(args: P.PolicyLossConfig, stats: dict, batch: dict, mask):
    """CPPO divergence ``D_t`` (binary from the sampled token, top-K from the stored rollout top-K) and ``δ_b``."""
    lp, old = stats["logp"], batch["old_logprobs"]
    if args.cppo_divergence.startswith("topk"):
        in_topk = jnp.any(jnp.asarray(batch["topk_ids"]) == batch["tokens"][..., None], axis=-1)
        div = P.cppo_divergence(args.cppo_divergence, lp, old, batch["topk_logprobs"], stats["topk_logp"], in_topk)
    else:
        div = P.cppo_divergence(args.cppo_divergence, lp, old)
    div = jnp.where(mask > 0, div, 0.0)
    delta_b = P.cppo_adaptive_delta_b(div, mask > 0, args.cppo_delta_b_min) if args.cppo_delta_b_adaptive else None
    return div, delta_b


def needs_rollout_topk(args: PolicyGradientArgs) -> bool:
    """Whether the rollout must store ``topk_ids``/``topk_logprobs`` (CPPO with ``topk_tv``/``topk_kl``);
    ``ObjectiveSpec.rollout_topk``, read by the loop (:func:`jaxtok.config.rollout_topk`)."""
    return args.loss_mode == "cppo" and args.cppo_divergence.startswith("topk")


@OBJECTIVES.register("policy_gradient", PolicyGradientArgs, data="rollout", models=("reference",),
                     group_advantages=host_advantages, rollout_topk=needs_rollout_topk)
def policy_gradient_loss(model: nnx.Module, batch: dict, rng: jax.Array,
                         args: PolicyGradientArgs = PolicyGradientArgs(), *, reference: Optional[nnx.Module] = None):
    """Policy-gradient loss of ``args.loss_mode`` on a rollout batch (module docstring, spec §6/§9).

    Returns ``(loss_sum, count, aux)``; ``count`` is the aggregation's denominator (tokens or sequences).
    ``reference`` (frozen initial policy, ``rollout.reference``) is needed only when ``kl_coef > 0``; its
    log-probs use the same temperature. Aux: ``pg_loss``, ``kl_loss``, ``entropy_loss``, ``clip_frac``,
    ``dual_clip_frac``, ``clip_frac_pos{i}`` (by valid-position bucket), ``ratio_mean/min/max``, ``approx_kl``,
    ``entropy``, mode-specific entries (CPPO rejections, APPO factor), ``reward_mean``, ``adv_abs_mean`` and
    ``kept_rows`` (share of rows surviving dynamic sampling)."""
    del rng
    require_keys(batch, ROLLOUT_KEYS, "policy_gradient")
    cfg = args.resolve(args.loss_mode)
    needs_topk = args.loss_mode == "cppo" and cfg.cppo_divergence.startswith("topk")
    if needs_topk:
        require_keys(batch, ("topk_ids", "topk_logprobs"), f"policy_gradient (cppo_divergence={cfg.cppo_divergence})")
    if cfg.kl_coef > 0 and reference is None:
        raise ConfigError(f"kl_coef={cfg.kl_coef} needs the frozen reference model: set rollout.reference "
                          "(init | <run dir>), or kl_coef=0")
    stats = rollout_token_stats(model, batch, chunk_size=args.chunk_size,
                                topk_ids=batch["topk_ids"] if needs_topk else None)
    mask = jnp.asarray(batch["loss_mask"], _F32)  # [B, T]
    B = mask.shape[0]

    rewards = _shaped_rewards(batch["rewards"], mask, args)
    if "advantages" in batch:
        adv = jnp.asarray(batch["advantages"], _F32)  # [B] or [B, T]
    else:
        adv = sequence_advantages(rewards, batch["group_ids"], args.estimator, eps=args.adv_eps)  # [B]
    if "row_keep" in batch:
        keep = jnp.asarray(batch["row_keep"], bool)
    elif args.drop_zero_variance:
        keep = dynamic_sampling_mask(filter_metric(batch), batch["group_ids"], args.dynamic_sampling_atol)
    else:
        keep = jnp.ones((B,), bool)
    mask = mask * keep[:, None].astype(_F32)

    ref_logp = None
    if cfg.kl_coef > 0:
        ref_logp = jax.lax.stop_gradient(rollout_token_stats(reference, batch, chunk_size=args.chunk_size,
                                                             with_entropy=False)["logp"])
    divergence = delta_b = None
    if args.loss_mode == "cppo":
        divergence, delta_b = _cppo_inputs(cfg, stats, batch, mask)
    norm_length = norm_length_of(batch, cfg)
    loss_sum, count, diag = P.policy_loss(args.loss_mode, stats["logp"], batch["old_logprobs"], adv, mask, cfg,
                                          ref_logp, entropy=stats["entropy"], divergence=divergence,
                                          delta_b=delta_b, norm_length=norm_length)
    aux = _aux(diag, count, cfg)
    if args.entropy_coef > 0:
        ent_sum, _ = P.aggregate(stats["entropy"], mask, cfg.aggregation, norm_length)
        loss_sum = loss_sum - args.entropy_coef * ent_sum
        aux["entropy_loss"] = (-ent_sum, count)
    ones = jnp.full((), B, _F32)
    adv_rows = adv if adv.ndim == 1 else P.masked_mean(jnp.abs(adv), mask, axis=-1)
    aux["reward_mean"] = (jnp.sum(rewards), ones)
    aux["adv_abs_mean"] = (jnp.sum(jnp.abs(adv_rows) * keep), jnp.sum(keep.astype(_F32)))
    aux["kept_rows"] = (jnp.sum(keep.astype(_F32)), ones)
    return loss_sum, count, aux
