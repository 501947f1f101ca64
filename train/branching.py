"""APPO tree rollouts: branch where the Branching Score is high, and procedure-level advantages
(train_methods.md §9, APPO ``build_appo_branch_request`` / ``compute_appo_advantage``).

Per prompt: ``n = rollout.num_generations`` initial rollouts, then ``b = rollout.branches`` branch rollouts.
A branch copies its parent's prompt and response up to and including the branch token ``idx`` and lets the
current policy continue. Branch rows only supply the reward contrast behind the initial rows' procedure-level
advantages: they carry zero loss weight (loss mask and advantages 0, prefix and continuation alike), as in the
reference code and the spec's unit test (§9), so the loss and its count are those of the initial rows alone.

Branch points: ``BS_t = Z(H_t)·Z(Ω_t)`` within each initial rollout (:func:`jaxtok.policy.branching_score`,
``Ω`` from the recomputed-vs-sampler log-ratio); candidates need ``Z(H) > 0, Z(Ω) > 0, BS > 0``; the global
top-``b`` candidates of a prompt are taken, then the best remaining tokens by score, then the chosen points again
in turn. In this library the sampler and the trainer are the same program, so ``Ω`` is ≈ 1 and the score is
driven by entropy, as the spec observes for the reference code.

Advantages (population z-score within each (prompt, kind) group, ε = 1e-6): an initial row's token ``t`` gets
``A_init`` plus the mean ``A_branch`` of its branches whose branch point is at or after ``t``. The optional reward
scale ``M_t`` of the reference code is omitted: with an outcome reward it only matters when the branch point is the
last token (§9 observation).

Every response, initial or branch (prefix + continuation), is capped at ``rollout.max_new_tokens`` tokens, so the
batch keeps one static ``[rows, P + N]`` layout; branch continuations are sampled with the same static cap and
truncated to the room their prefix leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxtok import policy
from jaxtok.tasks.tokenizer import SpecialTokens, decode

from . import rollout as rollout_lib


def select_branch_points(score: np.ndarray, candidate: np.ndarray, lengths: np.ndarray, n: int,
                         num_branches: int) -> tuple[np.ndarray, np.ndarray]:
    """``(parent_row [G·b], idx [G·b])`` for initial rollouts ``[G·n, N]`` (rows of one prompt contiguous).

    A point ``(row, t)`` is eligible when ``t < lengths[row] − 1`` (something is left to regenerate). Order:
    candidates by score, then other eligible points by score, then the chosen points again cyclically. A prompt
    whose rollouts have no eligible point branches from the prompt itself (``idx = −1``) of its first rollout."""
    rows, N = score.shape
    G = rows // n
    parents, idxs = [], []
    t = np.arange(N)[None, :]
    eligible = t < (lengths[:, None] - 1)  # [G·n, N]
    for g in range(G):
        sl = slice(g * n, (g + 1) * n)
        s, c, e = score[sl], candidate[sl] & eligible[sl], eligible[sl]
        order = []
        for pool in (c, e & ~c):
            r, tt = np.nonzero(pool)
            order += [(g * n + i, j) for _, i, j in sorted(zip(-s[r, tt], r, tt))]
        if not order:
            order = [(g * n, -1)]
        chosen = [order[k % len(order)] for k in range(num_branches)]
        parents += [p for p, _ in chosen]
        idxs += [i for _, i in chosen]
    return np.asarray(parents, np.int32), np.asarray(idxs, np.int32)


def _zscore(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return (x - x.mean()) / (x.std() + eps)


def appo_advantages(rewards_init: np.ndarray, rewards_branch: np.ndarray, parent: np.ndarray, idx: np.ndarray,
                    n: int, num_branches: int, mask_init: np.ndarray):
    """APPO procedure-level advantages (§9): ``(adv_init [G·n, N], a_branch [G·b])``, the initial rows' token
    advantages over the completion columns (zero outside ``mask_init``) and the branch rows' group z-scores that
    enter them (branch rows themselves are not trained)."""
    G = len(rewards_init) // n
    a_init = np.concatenate([_zscore(rewards_init[g * n:(g + 1) * n]) for g in range(G)])
    a_br = np.concatenate([_zscore(rewards_branch[g * num_branches:(g + 1) * num_branches]) for g in range(G)]) \
        if num_branches else np.zeros(0)
    N = mask_init.shape[1]
    aux_sum = np.zeros((len(rewards_init), N), np.float64)
    aux_cnt = np.zeros((len(rewards_init), N), np.float64)
    cols = np.arange(N)
    for b, (p, i) in enumerate(zip(parent, idx)):
        covered = cols <= i
        aux_sum[p, covered] += a_br[b]
        aux_cnt[p, covered] += 1
    aux = np.where(aux_cnt > 0, aux_sum / np.maximum(aux_cnt, 1), 0.0)
    adv_init = (a_init[:, None] + aux) * mask_init
    return adv_init.astype(np.float32), a_br.astype(np.float32)


def _left_pad(rows: list[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(rows), width), pad_id, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for r, ids in enumerate(rows):
        if len(ids):
            out[r, -len(ids):] = ids
            valid[r, -len(ids):] = True
    return out, valid


def collect_appo(model, prompts: dict, *, task, tokenizer, settings, rng: jax.Array, mesh=None, teacher=None,
                 prepare=None, chunk_size: int = 1024) -> rollout_lib.Rollout:
    """An APPO tree rollout batch: ``G·n`` initial rows then ``G·b`` branch rows, with ``advantages [rows, T]``
    (procedure-level on the initial rows, 0 on branch rows, see the module docstring), ``is_branch [rows]`` and
    ``group_ids`` (initial group ``g``, branch group ``G + g``), plus every key of
    :func:`jaxtok.train.rollout.collect`. Branch rows have ``loss_mask`` 0 (no loss weight) and, not being scored,
    ``old_logprobs``/``entropy`` 0; their ``sampler_logprobs`` mark the continuation they sampled."""
    if prepare is not None:
        raise ValueError("rollout.branches > 0 does not support an objective's prepare hook")
    sp = SpecialTokens.of(tokenizer)
    n, nb = settings.num_generations, settings.branches
    k_init, k_branch = jax.random.split(rng)
    init = rollout_lib.collect(model, prompts, task=task, tokenizer=tokenizer, settings=settings, rng=k_init,
                               mesh=mesh, teacher=teacher, chunk_size=chunk_size, trim=False)  # [G·n, P + N]
    b0 = init.batch
    P = prompts["prompt"].shape[1]
    N = b0["tokens"].shape[1] - P
    comp_mask = b0["loss_mask"][:, P:]
    score, cand = policy.branching_score(jnp.asarray(b0["entropy"][:, P:]), jnp.asarray(b0["old_logprobs"][:, P:]),
                                         jnp.asarray(b0["sampler_logprobs"][:, P:]), jnp.asarray(comp_mask),
                                         gamma=settings.branch_gamma, eps=settings.branch_eps)
    parent, idx = select_branch_points(np.asarray(score), np.asarray(cand), comp_mask.sum(1), n, nb)

    # branch prompts: the parent's prompt and response[:idx+1], left-padded to P + N
    prefixes = [np.concatenate([b0["tokens"][p, :P][b0["valid"][p, :P]], b0["tokens"][p, P:P + i + 1]])
                for p, i in zip(parent, idx)]
    bp, bp_valid = _left_pad(prefixes, P + N, sp.pad)
    cont, cont_valid, cont_lp = rollout_lib._sample(model, bp, bp_valid, settings, k_branch, sp, mesh)
    room = N - (idx + 1)  # [G·b] continuation budget
    cont_valid = cont_valid & (np.arange(N)[None, :] < room[:, None])
    # branch rows in the [P + N] layout: prompt | parent prefix | continuation
    comp = np.full((len(parent), N), sp.pad, np.int32)
    comp_valid = np.zeros((len(parent), N), bool)
    sampler_lp = np.zeros((len(parent), N), np.float32)
    for b, (p, i) in enumerate(zip(parent, idx)):
        k = int(cont_valid[b].sum())
        comp[b, :i + 1] = b0["tokens"][p, P:P + i + 1]
        comp[b, i + 1:i + 1 + k] = cont[b, :k]
        comp_valid[b, :i + 1 + k] = True
        sampler_lp[b, i + 1:i + 1 + k] = cont_lp[b, :k]
    branch = rollout_lib.assemble(b0["tokens"][parent, :P], b0["valid"][parent, :P], comp, comp_valid)
    branch["loss_mask"][:] = False  # reward contrast only: zero loss weight (§9)
    zeros = np.zeros(branch["tokens"].shape, np.float32)  # [G·b, P + N]
    branch["old_logprobs"], branch["entropy"] = zeros, zeros.copy()  # untrained rows need no scoring forward
    examples = [init.examples[p] for p in parent]
    completions = [decode(tokenizer, comp[b][comp_valid[b]]) for b in range(len(parent))]
    from jaxtok.train.rewards import score as reward_score

    branch_rewards = reward_score(task, completions, examples, settings.rewards)
    adv_init, a_branch = appo_advantages(b0["rewards"], branch_rewards, parent, idx, n, nb, comp_mask)

    G = len(prompts["prompt"])
    pad_cols = np.zeros((len(parent), P), np.float32)
    branch.update(sampler_logprobs=np.concatenate([pad_cols, sampler_lp], 1), rewards=branch_rewards,
                  accuracy=rollout_lib.accuracy(task, completions, examples),
                  max_new_tokens=np.full(len(parent), settings.max_new_tokens, np.int32),
                  group_ids=(G + np.arange(len(parent)) // nb).astype(np.int32),
                  temperature=np.full(len(parent), settings.temperature, np.float32),
                  on_policy=np.ones(len(parent), bool))
    missing = set(b0) - set(branch)
    if missing:
        raise ValueError(f"APPO branch rows lack rollout keys {sorted(missing)}")
    batch = {k: np.concatenate([b0[k], branch[k]]) for k in branch}
    batch["advantages"] = np.concatenate([np.concatenate([np.zeros((len(adv_init), P), np.float32), adv_init], 1),
                                          np.zeros(branch["tokens"].shape, np.float32)])
    batch["is_branch"] = np.concatenate([np.zeros(len(adv_init), bool), np.ones(len(parent), bool)])
    info = dict(init.info)
    info.update({"rollout/branch_reward_mean": float(branch_rewards.mean()),
                 "rollout/branch_point_mean": float(np.mean(idx)),
                 "rollout/branch_adv_abs_mean": float(np.abs(a_branch).mean()) if len(a_branch) else 0.0})
    return rollout_lib.Rollout(batch=batch, completions=init.completions + completions,
                               examples=init.examples + examples, info=info)
