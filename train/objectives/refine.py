"""REFINE-style next-sequence prediction RL for causal LMs (train_methods.md §8, ReFINE ``prepare_ppo_batch_for_ttt``).

Per document (an SFT row ``<bos> prompt target <eos>``):

1. **Positions** (:func:`refine_positions`): split the valid tokens into ``n_chunks`` equal chunks, smooth the
   next-token entropy ``H_t`` with a same-padded moving average of width ``k`` (``k+1`` if ``k`` is even), and in
   each chunk draw one position ``j ~ softmax(H̃_chunk)`` (or ``uniform`` / ``argmax`` / ``argmin``); the rollout
   starts at ``s = j + 1``, clamped to ``[start + margin, end − max(margin, k)]`` so a ``k``-token ground truth
   exists.
2. **Rollouts**: the current policy continues every prefix ``x_<s`` by ``k`` tokens (one rollout per prefix, so the
   GRPO group is the ``n_chunks`` rollouts of one document, as in the reference code with ``ttt_n = 1``).
3. **Reward** (:func:`refine_rewards`, sequence level): ``cosine`` = mean cosine similarity of the last-layer
   hidden states of the rollout tokens and of the ground-truth tokens in the original sequence, ``binary`` = mean
   token match, ``hybrid`` = their sum.
4. **Loss**: ``c_sft · L_NTP(document) + c_ppo · L_GRPO(rollouts)`` (token-mean each), GRPO advantages computed
   once per rollout batch on the host so gradient accumulation cannot split a group.

Because the two terms are means over different token sets, the objective returns the combined mean with count 1:
with gradient accumulation the step averages micro-batch losses (equal weights).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok import mesh as mesh_lib
from jaxtok import policy
from jaxtok.registry import OBJECTIVES

REWARD_KINDS = ("cosine", "binary", "hybrid")
POSITION_MODES = ("sample", "uniform", "argmax", "argmin")


@dataclasses.dataclass(frozen=True)
class RefineArgs:
    """Defaults from the reference post-training recipe (§8): 8 chunks, 5-token rollouts, hybrid reward,
    ``c_sft = 1``, ``c_ppo = 0.2``. ``margin`` is 20 in the reference (long documents); short synthetic rows need
    a few tokens. ``ntp_tokens``: ``all`` valid tokens (the reference) or the ``response`` only."""

    n_chunks: int = 8
    rollout_len: int = 5
    position_mode: str = "sample"
    margin: int = 20
    reward: str = "hybrid"
    c_sft: float = 1.0
    c_ppo: float = 0.2
    ntp_tokens: str = "all"
    eps_low: float = 0.2
    eps_high: float = 0.2
    chunk_size: int = 1024  # tokens per float32 log-softmax chunk of the NTP term

    def __post_init__(self):
        if self.n_chunks < 1 or self.rollout_len < 1 or self.margin < 0:
            raise ValueError(f"n_chunks={self.n_chunks}, rollout_len={self.rollout_len} must be >= 1 and "
                             f"margin={self.margin} >= 0")
        for name, value, allowed in (("position_mode", self.position_mode, POSITION_MODES),
                                     ("reward", self.reward, REWARD_KINDS),
                                     ("ntp_tokens", self.ntp_tokens, ("all", "response"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: allowed {list(allowed)}")


def smooth(x: jax.Array, valid: jax.Array, width: int) -> jax.Array:
    """Same-padded moving average along the last axis (``avg_pool1d``, stride 1, zeros counted), odd ``width``
    (``width + 1`` if even), over ``x`` zeroed outside ``valid``. ``[B, T]``."""
    w = width if width % 2 else width + 1
    x = jnp.where(valid, x, 0.0).astype(jnp.float32)
    kernel = jnp.ones((w,), jnp.float32) / w
    return jax.vmap(lambda r: jnp.convolve(r, kernel, mode="same"))(x)


def refine_positions(key: jax.Array, entropy: jax.Array, valid: jax.Array, *, n_chunks: int, k: int,
                     mode: str = "sample", margin: int = 20) -> jax.Array:
    """Rollout start positions ``s [B, n_chunks]`` (§8): one per equal chunk of each row's valid span.

    ``entropy [B, T]``: ``H_t`` of the next-token distribution at position ``t``; ``valid [B, T]`` marks one
    contiguous span per row. A chunk is ``[start + c·L//n, start + (c+1)·L//n)`` with ``L`` the valid length
    (chunks of at least one token); ``s = j + 1`` for the drawn ``j``, clamped to ``[start + margin,
    end − max(margin, k)]`` (a row too short for that range starts at its lower bound, capped at ``end − k``).
    """
    if mode not in POSITION_MODES:
        raise ValueError(f"mode={mode!r}: allowed {list(POSITION_MODES)}")
    B, T = entropy.shape
    t = jnp.arange(T)[None, :]
    start = jnp.argmax(valid, axis=-1)[:, None]  # [B, 1]
    length = jnp.sum(valid, axis=-1)[:, None]
    size = jnp.maximum(length // n_chunks, 1)
    chunk = jnp.where(valid, (t - start) // size, -1)  # [B, T]
    h = smooth(entropy, valid, k)
    score = {"sample": h, "uniform": jnp.zeros_like(h), "argmax": h * 1e6, "argmin": -h * 1e6}[mode]
    noise = jax.random.gumbel(key, (B, n_chunks, T)) if mode in ("sample", "uniform") else 0.0
    in_chunk = chunk[:, None, :] == jnp.arange(n_chunks)[None, :, None]  # [B, C, T]
    # chunks past a short row's end fall back to its last chunk of at least one token
    in_chunk = jnp.where(jnp.any(in_chunk, -1, keepdims=True), in_chunk,
                         chunk[:, None, :] == jnp.max(chunk, -1)[:, None, None])
    j = jnp.argmax(jnp.where(in_chunk, score[:, None, :] + noise, -jnp.inf), axis=-1)  # [B, C]
    end = start + length
    lo = start + margin
    hi = jnp.maximum(end - max(margin, k), lo)
    return jnp.minimum(jnp.clip(j + 1, lo, hi), end - k).astype(jnp.int32)


def refine_rewards(h_roll: jax.Array, h_gt: jax.Array, y_roll: jax.Array, y_gt: jax.Array,
                   kind: str = "hybrid") -> jax.Array:
    """Sequence reward of each ``k``-token rollout (§8): ``cosine`` ``mean_j cos(h_roll_j, h_gt_j)`` ∈ [−1, 1],
    ``binary`` ``mean_j 1[ŷ_j = y_j]`` ∈ [0, 1], ``hybrid`` their sum. ``h_* [R, k, D]``, ``y_* [R, k]`` -> ``[R]``."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward={kind!r}: allowed {list(REWARD_KINDS)}")
    a, b = h_roll.astype(jnp.float32), h_gt.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)
    em = (y_roll == y_gt).astype(jnp.float32)
    return {"cosine": cos, "binary": em, "hybrid": cos + em}[kind].mean(-1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, tokens, positions, valid):
    """Next-token entropy at every position and the last-layer hidden states (no gradient). ``[B, T]``,
    ``[B, T, D]``."""
    out = nnx.merge(graphdef, state)(tokens, positions=positions, valid=valid, return_hidden=True)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), -1)
    return -jnp.sum(jnp.exp(logp) * logp, -1), out.hidden


def collect_refine(model, docs: dict, *, task, tokenizer, settings, rng: jax.Array, mesh=None, teacher=None,
                   prepare=None, args: RefineArgs = RefineArgs()):
    """A REFINE batch from SFT rows ``docs``: the documents plus ``ro_*`` rollout rows (``R = B·n_chunks``):
    ``ro_tokens, ro_positions, ro_valid [R, T+k]``, ``ro_loss_mask`` (the ``k`` rollout tokens),
    ``ro_old_logprobs``, ``ro_rewards [R]``, ``ro_advantages [R]`` (GRPO over each document's rollouts). Info adds
    the sampler/trainer log-prob mismatch on the rollout tokens (:func:`jaxtok.train.rollout.sampler_trainer_mismatch`)."""
    from jaxtok.decode.generate import generate
    from jaxtok.sampling import SamplingParams
    from jaxtok.tasks.tokenizer import SpecialTokens
    from jaxtok.train.rollout import Rollout, fetch, sampler_trainer_mismatch, score_tokens

    del task, teacher, prepare
    sp = SpecialTokens.of(tokenizer)
    k, C = args.rollout_len, args.n_chunks
    tokens, valid = np.asarray(docs["tokens"]), np.asarray(docs["valid"])
    B, T = tokens.shape
    graphdef, state = nnx.split(model)
    placed = mesh_lib.put_batch({key: docs[key] for key in ("tokens", "positions", "valid")}, mesh)
    ent, hidden = _forward(graphdef, state, placed["tokens"], placed["positions"], placed["valid"])
    k_pos, k_roll = jax.random.split(rng)
    starts = fetch(refine_positions(k_pos, ent, placed["valid"], n_chunks=C, k=k, mode=args.position_mode,
                                    margin=args.margin))  # [B, C]
    first = valid.argmax(1)
    prefix = np.full((B * C, T), sp.pad, np.int32)
    prefix_valid = np.zeros((B * C, T), bool)
    gt = np.zeros((B * C, k), np.int32)
    for b in range(B):
        for c in range(C):
            s, r = int(starts[b, c]), b * C + c
            ids = tokens[b, first[b]:s]
            prefix[r, T - len(ids):], prefix_valid[r, T - len(ids):] = ids, True
            gt[r] = tokens[b, s:s + k]
    out = generate(model, prefix, prefix_valid, max_new_tokens=k,
                   sampling=SamplingParams(temperature=settings.temperature, top_k=settings.top_k,
                                           top_p=settings.top_p),
                   stop_tokens=(), rng=k_roll, pad_id=sp.pad, mesh=mesh)
    roll = fetch(out.tokens)  # [R, k]
    ro = {"tokens": np.concatenate([prefix, roll], 1), "valid": np.concatenate([prefix_valid, np.ones((B * C, k),
                                                                                                     bool)], 1)}
    ro["positions"] = np.maximum(np.cumsum(ro["valid"], 1) - 1, 0).astype(np.int32)
    ro["loss_mask"] = np.zeros_like(ro["valid"])
    ro["loss_mask"][:, T:] = True
    temperature = np.full(B * C, settings.temperature, np.float32)
    ro["old_logprobs"], _ = score_tokens(model, ro, temperature, mesh=mesh)
    pro = mesh_lib.put_batch({key: ro[key] for key in ("tokens", "positions", "valid")}, mesh)
    _, h_ro = _forward(graphdef, state, pro["tokens"], pro["positions"], pro["valid"])
    h_roll = fetch(h_ro)[:, T:]  # [R, k, D]
    gt_idx = starts.reshape(-1)[:, None] + np.arange(k)[None, :]  # [R, k] positions of the ground truth
    h_gt = np.take_along_axis(np.repeat(fetch(hidden), C, 0), gt_idx[:, :, None], axis=1)
    rewards = np.asarray(refine_rewards(jnp.asarray(h_roll), jnp.asarray(h_gt), jnp.asarray(roll), jnp.asarray(gt),
                                        args.reward))
    group = (np.arange(B * C) // C).astype(np.int32)
    adv = np.asarray(policy.group_advantages(jnp.asarray(rewards), jnp.asarray(group), B))
    batch = {key: np.asarray(docs[key]) for key in ("tokens", "positions", "valid", "loss_mask")}
    batch.update({f"ro_{key}": v for key, v in ro.items()})
    batch.update(ro_rewards=rewards.astype(np.float32), ro_advantages=adv.astype(np.float32),
                 ro_temperature=temperature)
    info = {"rollout/reward_mean": float(rewards.mean()), "rollout/token_match": float((roll == gt).mean()),
            "rollout/start_mean": float(starts.mean())}
    info.update(sampler_trainer_mismatch(ro["old_logprobs"][:, T:], fetch(out.logprobs), ro["loss_mask"][:, T:]))
    return Rollout(batch=batch, completions=[], examples=[], info=info)


def _ntp(model, batch, args: RefineArgs):
    from jaxtok.train.objectives.sft import SFTArgs, _token_stats

    mask = batch["loss_mask"] if args.ntp_tokens == "response" else batch["valid"] & jnp.roll(batch["valid"], 1, 1)
    nll, _, m = _token_stats(model, dict(batch, loss_mask=mask.at[:, 0].set(False)),
                             SFTArgs(chunk_size=args.chunk_size))
    return jnp.sum(nll), jnp.sum(m).astype(jnp.float32)


@OBJECTIVES.register("refine", RefineArgs, data="documents", collect=collect_refine)
def refine_loss(model, batch, rng, args: RefineArgs = RefineArgs()):
    """REFINE loss ``c_sft · NTP + c_ppo · GRPO`` (§8); returns ``(loss, 1, aux)`` (module docstring)."""
    del rng
    ntp_sum, ntp_count = _ntp(model, batch, args)
    k = args.rollout_len
    T = batch["ro_tokens"].shape[1] - k
    out = model(batch["ro_tokens"], positions=batch["ro_positions"], valid=batch["ro_valid"], return_logits=False,
                return_hidden=True)
    logits = model.logits(out.hidden[:, T - 1:T + k - 1]).astype(jnp.float32)  # [R, k, V]
    logits = logits / batch["ro_temperature"][:, None, None]
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["ro_tokens"][:, T:, None], -1)[..., 0]
    mask = batch["ro_loss_mask"][:, T:]
    cfg = policy.PolicyLossConfig(eps_low=args.eps_low, eps_high=args.eps_high, aggregation="token-mean")
    pg_sum, pg_count, diag = policy.policy_loss("grpo", lp, batch["ro_old_logprobs"][:, T:],
                                                batch["ro_advantages"], mask, cfg)
    ntp = policy.safe_divide(ntp_sum, ntp_count)
    pg = policy.safe_divide(pg_sum, pg_count)
    loss = args.c_sft * ntp + args.c_ppo * pg
    return loss, jnp.ones((), jnp.float32), {"ntp_loss": (ntp, 1.0), "pg_loss": (pg, 1.0),
                                             "clip_frac": (diag["clip_frac"], 1.0)}
