"""CJ-GRPO: GRPO over the recorded unmasking trajectory of a masked diffusion LM (train_methods.md §10).

A rollout is decoded by :func:`jaxtok.decode.diffusion.diffusion_generate` (any commit policy; EOSER / ASS give the
paper's setting), which records ``commit_step [B, N]``: the step at which each generated position was revealed.
The state before step ``s`` is ``x^(s)`` = prompt + the positions committed at steps ``< s`` (others ``mask_id``);
the tokens committed at step ``s`` (``pos_s``) were sampled from the model's distribution on ``x^(s)``. For each
step and each ``j ∈ pos_s`` (spec: forward on the intermediate state)::

    ρ_{s,j} = π_θ(x_j | x^(s)) / π_old(x_j | x^(s))
    ℓ_{s,j} = −min(ρ A, clip(ρ, 1−ε, 1+ε) A) + β·k3(π_θ ‖ π_ref)
    L = (1/S) Σ_s [Σ_j ℓ_{s,j} / |pos_s|]          (per-step token mean over the batch, mean over steps)

``π(x_j | x^(s)) = softmax(logits_j / τ)`` with the mask token excluded, as the sampler proposes (τ = the sampling
temperature, 1 when decoding greedily). Advantages: the reference code uses ``A = r − mean_group`` (``dr_grpo``,
default); Algorithm 1 divides by the std (``grpo``). ``aggregation``: ``step-mean`` (above; ``(sum, count)`` =
``(Σ_s step mean, #non-empty steps)``, so accumulation averages step means over micro-batches) or ``token-mean``
over all (s, j).

The rollout batch (:func:`collect_cj_grpo`, the loop's collector for this objective) has the contract's keys:
``tokens, positions, valid, loss_mask [B, P+N]`` (prompt + final completion; ``loss_mask`` = completion tokens up
to and including the first terminator), ``old_logprobs [B, P+N]`` (per position, under the sampling policy on the
position's own state, so the first inner epoch has ratio 1), ``rewards``, ``group_ids``, ``temperature [B]`` plus
``gen_mask [B, P+N]`` (the generated region) and ``commit_step [B, P+N]`` int32 (dense step ranks 0..K-1 over the
batch, −1 on the prompt / never committed). The loss runs one forward per step up to ``max_steps`` (static; steps
without commits in the batch are skipped with ``lax.cond``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok import policy as P
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.train.objectives.policy_gradient import require_keys, sequence_advantages

__all__ = ["CJGRPOArgs", "trajectory_states", "dense_step_ranks", "trajectory_logprobs", "cj_grpo_terms",
           "cj_grpo_loss", "collect_cj_grpo"]

_F32 = jnp.float32
DEFAULT_MASK_ID = 3
CJ_KEYS = ("tokens", "valid", "loss_mask", "old_logprobs", "rewards", "group_ids", "temperature", "gen_mask",
           "commit_step")


@dataclasses.dataclass(frozen=True)
class CJGRPOArgs:
    """Loss: ``eps`` (clip ε, 0.5 in the reference yaml), ``kl_coef`` β (0.04; needs ``rollout.reference``),
    ``advantage_estimator`` (``dr_grpo``: r − mean, the code; ``grpo``: / std, the paper), ``aggregation``
    (``step-mean`` | ``token-mean``), ``max_steps`` (static cap on trajectory steps; None = ``gen_len``, always enough; empty steps skip their forward
    but the backward pass keeps residuals for every one of the ``max_steps`` slots, so set it to the policy's step
    count — ASS on ``n`` positions: ``max(1, floor(log2 n))`` — to cut activation memory: 16 → 5 took a 512-row
    testbed batch from 14 GB to 5.5 GB; a trajectory that needs more raises).
    Sampling (collector): ``gen_len``, commit ``policy`` (e.g. ``ass``, ``eoser``, ``llada``) with
    ``policy_args``, ``steps`` / ``block_len`` overrides, ``mask_id`` (None: the model config's). ``trajectory``:
    ``consistent`` (CJ-GRPO: each token scored on the intermediate state it was sampled from) or ``one_step`` (the
    paper's skip-step baseline, diffu-GRPO style: every token scored from the fully masked completion x_0; the
    rollout log then also gives both mean log-probs, ``rollout/logp_traj_mean`` / ``rollout/logp_onestep_mean``,
    whose gap is the mismatch CJ-GRPO removes)."""

    eps: float = 0.5
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    advantage_estimator: str = "dr_grpo"
    adv_eps: float = 1e-6
    aggregation: str = "step-mean"
    max_steps: Optional[int] = None
    gen_len: int = 16
    policy: str = "ass"
    policy_args: dict = dataclasses.field(default_factory=dict)
    steps: Optional[int] = None
    block_len: Optional[int] = None
    mask_id: Optional[int] = None
    trajectory: str = "consistent"

    def __post_init__(self):
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps={self.eps!r} must be in (0, 1)")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef={self.kl_coef!r} must be ≥ 0")
        P._check_choice("kl_estimator", self.kl_estimator, P.KL_ESTIMATORS)
        P._check_choice("advantage_estimator", self.advantage_estimator, P.ADV_ESTIMATORS)
        P._check_choice("aggregation", self.aggregation, ("step-mean", "token-mean"))
        P._check_choice("trajectory", self.trajectory, ("consistent", "one_step"))
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps!r} must be ≥ 1 (or null = the generation length)")
        if self.gen_len < 1:
            raise ConfigError(f"gen_len={self.gen_len!r} must be ≥ 1")

    def __hash__(self):  # policy_args is a dict; the args are a static jit argument in tests/benches
        return hash((self.eps, self.kl_coef, self.kl_estimator, self.advantage_estimator, self.adv_eps,
                     self.aggregation, self.max_steps, self.gen_len, self.policy,
                     tuple(sorted(self.policy_args.items())), self.steps, self.block_len, self.mask_id,
                     self.trajectory))


def _mask_id(model, args: CJGRPOArgs) -> int:
    if args.mask_id is not None:
        return args.mask_id
    m = getattr(model.cfg, "mask_token_id", None)
    return DEFAULT_MASK_ID if m is None else m


# ----------------------------------------------------------------------------------------------------------------
# trajectory


def dense_step_ranks(commit_step) -> np.ndarray:
    """Host: commit steps relabelled by their rank among the distinct steps used in the batch (−1 stays −1), so
    ``K`` used steps become ``0..K-1`` and the state order is unchanged (``x^(k)`` shows ranks ``< k``)."""
    cs = np.asarray(commit_step)
    used = np.unique(cs[cs >= 0])
    return np.where(cs >= 0, np.searchsorted(used, cs), -1).astype(np.int32)


def trajectory_states(tokens, gen_mask, commit_step, step, mask_id: int):
    """``x^(step)`` ``[B, T]``: prompt as is; generated positions committed at a step ``< step`` show their token,
    the rest ``mask_id``."""
    shown = (commit_step >= 0) & (commit_step < step)
    return jnp.where(jnp.asarray(gen_mask, bool) & ~shown, mask_id, tokens)


def trajectory_logprobs(model: nnx.Module, batch: dict, *, mask_id: int, num_steps: int, attention="bidirectional",
                        reference: Optional[nnx.Module] = None):
    """Per position ``j`` committed at step ``s``: ``log softmax(logits_j(x^(s)) / τ)[x_j]`` (mask token excluded),
    float32 ``[B, T]`` (0 elsewhere), and the same under ``reference`` when given. One forward per step
    ``s < num_steps`` (skipped when no row commits at ``s``)."""
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    gen = jnp.asarray(batch["gen_mask"], bool)
    cs = jnp.asarray(batch["commit_step"], jnp.int32)
    valid = jnp.asarray(batch["valid"], bool) | gen  # every generated slot is present while denoising
    tau = jnp.asarray(batch["temperature"], _F32)
    tau = jnp.where(tau > 0, tau, 1.0)[:, None, None]
    models = [model] + ([reference] if reference is not None else [])
    defs = [nnx.split(m) for m in models]

    def score(m, x):
        logits = m(x, valid=valid, attention=attention).logits.astype(_F32)  # [B, T, V] position-aligned
        logits = logits.at[..., mask_id].set(-jnp.inf)
        logp = jax.nn.log_softmax(logits / tau, axis=-1)
        return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]

    def body(acc, s):
        sel = gen & (cs == s)
        x = trajectory_states(tokens, gen, cs, s, mask_id)

        def run(_):
            outs = []
            for i, (g, st) in enumerate(defs):
                lp = score(nnx.merge(g, st), x)
                outs.append(jax.lax.stop_gradient(lp) if i else lp)
            return tuple(jnp.where(sel, lp, 0.0) for lp in outs)

        zeros = tuple(jnp.zeros(tokens.shape, _F32) for _ in defs)
        out = jax.lax.cond(jnp.any(sel), run, lambda _: zeros, None)
        return tuple(a + o for a, o in zip(acc, out)), None

    init = tuple(jnp.zeros(tokens.shape, _F32) for _ in defs)
    out, _ = jax.lax.scan(body, init, jnp.arange(num_steps))
    return out[0], (out[1] if reference is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# loss


def cj_grpo_terms(logp, old_logp, advantages, loss_mask, commit_step, num_steps: int, args: CJGRPOArgs,
                  ref_logp=None):
    """CJ-GRPO ``(loss_sum, count, aux)`` from per-position log-probs (module docstring). ``advantages`` ``[B]``;
    ``commit_step`` ranks select ``pos_s``; empty steps and empty batches give 0."""
    m = jnp.asarray(loss_mask, _F32)
    adv = jnp.broadcast_to(jnp.asarray(advantages, _F32)[:, None], m.shape)
    ratio = P.token_ratio(logp, old_logp, m)
    loss, clipped, _ = P.ppo_clip_loss(ratio, adv, args.eps, args.eps, None)
    if args.kl_coef > 0:
        loss = loss + args.kl_coef * P.kl_penalty(logp, ref_logp, args.kl_estimator)
    loss = jnp.where(m > 0, loss, 0.0)
    steps = jax.nn.one_hot(jnp.asarray(commit_step), num_steps, dtype=_F32) * m[..., None]  # [B, T, S]
    per_step_sum = jnp.einsum("bt,bts->s", loss, steps)
    per_step_n = jnp.sum(steps, axis=(0, 1))
    if args.aggregation == "step-mean":
        loss_sum, count = jnp.sum(P.safe_divide(per_step_sum, per_step_n)), jnp.sum((per_step_n > 0).astype(_F32))
    else:
        loss_sum, count = jnp.sum(loss), jnp.sum(m)
    n = jnp.sum(m)
    aux = {"clip_frac": (jnp.sum(clipped * m), n), "ratio_mean": (jnp.sum(jax.lax.stop_gradient(ratio) * m), n),
           "steps_used": (jnp.sum((per_step_n > 0).astype(_F32)), jnp.ones((), _F32))}
    if args.kl_coef > 0:
        kl = jax.lax.stop_gradient(P.kl_penalty(logp, ref_logp, args.kl_estimator))
        aux["kl"] = (jnp.sum(kl * m), n)
    return loss_sum, count, aux


# ----------------------------------------------------------------------------------------------------------------
# collector (``ObjectiveSpec.collect``)


def collect_cj_grpo(model: nnx.Module, prompts: dict, *, task, tokenizer, settings, rng: jax.Array, mesh=None,
                    teacher=None, prepare=None, args: CJGRPOArgs = CJGRPOArgs()) -> Any:
    """One CJ-GRPO rollout batch: ``settings.num_generations`` diffusion decodes per prompt with the commit
    policy of ``args`` at ``settings.temperature``, the trajectory's dense step ranks, the old log-probs per
    position on its own state, and the rewards of the decoded completions (module docstring)."""
    del teacher, prepare
    from jaxtok.data import examples_of
    from jaxtok.decode.diffusion import diffusion_generate
    from jaxtok.tasks.tokenizer import SpecialTokens, decode
    from jaxtok.train.rewards import score
    from jaxtok.train.rollout import Rollout, expand_groups, fetch

    sp = SpecialTokens.of(tokenizer)
    n = settings.num_generations
    rows = expand_groups(prompts, n)
    B, Pn = rows["prompt"].shape
    mask_id = _mask_id(model, args)
    res = diffusion_generate(model, rows["prompt"], rows["prompt_valid"], gen_len=args.gen_len, policy=args.policy,
                             policy_args=dict(args.policy_args), steps=args.steps, block_len=args.block_len,
                             temperature=float(settings.temperature), rng=rng, mask_id=mask_id, pad_id=sp.pad)
    gen_tok, gen_valid, cs = fetch(res.tokens), fetch(res.valid), fetch(res.commit_step)
    ranks = dense_step_ranks(cs)
    num_steps = args.max_steps or args.gen_len
    if ranks.max(initial=-1) >= num_steps:
        raise ConfigError(f"cj_grpo max_steps={args.max_steps}: the trajectory used {ranks.max() + 1} steps")
    zeros_p = np.zeros((B, Pn), bool)
    prompt = np.where(rows["prompt_valid"], rows["prompt"], sp.pad)
    batch = {"tokens": np.concatenate([prompt, gen_tok], 1).astype(np.int32),
             "valid": np.concatenate([rows["prompt_valid"], gen_valid], 1).astype(bool),
             "loss_mask": np.concatenate([zeros_p, gen_valid], 1).astype(bool),
             "gen_mask": np.concatenate([zeros_p, np.ones_like(gen_valid, bool)], 1),
             "commit_step": np.concatenate([np.full((B, Pn), -1, np.int32), ranks], 1),
             "temperature": np.full((B,), settings.temperature, np.float32)}
    batch["positions"] = np.maximum(np.cumsum(batch["valid"], 1) - 1, 0).astype(np.int32)
    graphdef, state = nnx.split(model)

    def old_logprobs():  # [B, P+N] the sampling policy's log-probs on the states batch["commit_step"] names
        old, _ = _score_jit(graphdef, state, {k: batch[k] for k in ("tokens", "valid", "gen_mask", "commit_step",
                                                                     "temperature")}, mask_id=mask_id,
                            num_steps=num_steps)
        return np.where(batch["loss_mask"], fetch(old), 0.0).astype(np.float32)

    info = {}
    if args.trajectory == "one_step":  # the skip-step baseline: every revealed position scored from x_0
        info["rollout/logp_traj_mean"] = float(P.masked_mean(old_logprobs(), batch["loss_mask"]))
        batch["commit_step"] = np.where(batch["commit_step"] >= 0, 0, -1).astype(np.int32)
    batch["old_logprobs"] = old_logprobs()
    if args.trajectory == "one_step":
        info["rollout/logp_onestep_mean"] = float(P.masked_mean(batch["old_logprobs"], batch["loss_mask"]))
    examples = examples_of(task, "train", rows)
    completions = [decode(tokenizer, gen_tok[b][gen_valid[b]]) for b in range(B)]
    batch["rewards"] = score(task, completions, examples, settings.rewards)
    batch["group_ids"] = (np.arange(B) // n).astype(np.int32)
    info.update({"rollout/reward_mean": float(batch["rewards"].mean()),
                 "rollout/length_mean": float(gen_valid.sum(axis=1).mean()),
                 "rollout/steps_mean": float(fetch(res.num_steps))})
    return Rollout(batch=batch, completions=completions, examples=examples, info=info)


@functools.partial(jax.jit, static_argnames=("graphdef", "mask_id", "num_steps"))
def _score_jit(graphdef, state, batch, *, mask_id, num_steps):
    return trajectory_logprobs(nnx.merge(graphdef, state), batch, mask_id=mask_id, num_steps=num_steps)


@OBJECTIVES.register("cj_grpo", CJGRPOArgs, data="rollout", models=("reference",), collect=collect_cj_grpo,
                     group_advantages=True, eval="diffusion")
def cj_grpo_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: CJGRPOArgs = CJGRPOArgs(), *,
                 reference: Optional[nnx.Module] = None):
    """CJ-GRPO loss on a diffusion rollout batch (module docstring). ``reference`` is needed when
    ``kl_coef > 0``."""
    del rng
    require_keys(batch, CJ_KEYS, "cj_grpo")
    if args.kl_coef > 0 and reference is None:
        raise ConfigError(f"cj_grpo kl_coef={args.kl_coef} needs the frozen reference (rollout.reference: init), "
                          "or kl_coef=0")
    num_steps = args.max_steps or args.gen_len
    logp, ref_logp = trajectory_logprobs(model, batch, mask_id=_mask_id(model, args), num_steps=num_steps,
                                         reference=reference if args.kl_coef > 0 else None)
    adv = sequence_advantages(batch["rewards"], batch["group_ids"], args.advantage_estimator, eps=args.adv_eps)
    mask = jnp.asarray(batch["loss_mask"], bool) & (jnp.asarray(batch["commit_step"]) >= 0)
    return cj_grpo_terms(logp, batch["old_logprobs"], adv, mask, batch["commit_step"], num_steps, args, ref_logp)
