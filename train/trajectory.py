"""Teacher trajectories for TAD (train_methods.md §5): the loop's collector for objectives with ``data="trajectory"``.

One collection turns a left-padded prompt batch ``{prompt [G, P], prompt_valid [G, P], index [G]}`` into ``B = G·n``
training pairs (``n = rollout.num_generations`` steps sampled per recorded trajectory):

1. every prompt gets its *privileged* form (``args.privileged_template``, default the reference solution then the
   prompt), left-padded to ``P' = P + len(template text) + seq_len`` (the target fits ``data.seq_len``);
2. the frozen teacher decodes the privileged prompts with :func:`jaxtok.decode.diffusion.diffusion_generate`:
   LLaDA low-confidence remasking, semi-autoregressive blocks of ``min(32, N)``, one token per step
   (``steps = N = rollout.max_new_tokens``), Gumbel proposals at ``rollout.temperature`` — the recording settings
   of the TAD repository; the commit step of every position is the trajectory ``x^(0..S)`` (``x^(0)`` all MASK,
   ``x^(s)`` shows the positions committed at the first ``s`` steps of the row);
3. for each trajectory ``n`` steps ``i ~ U{0..S-1}`` give ``x_t = x^(i)`` and ``x_target = x^(min(i+δ, S))``
   (:func:`trajectory_pairs`, ``δ = args.delta``);
4. only trajectories whose final answer is correct are kept (TAD filters its recorded set); static shapes, so a
   wrong trajectory's rows stay in the batch with ``response_valid`` all False (they contribute nothing).

Batch keys (the ``tad`` objective's layout): ``tokens``/``valid``/``positions [B, P+N]`` = plain prompt + ``x_t``;
``teacher_tokens``/``teacher_valid``/``teacher_positions [B, P'+N]`` = privileged prompt + the same ``x_t``;
``x_target [B, N]``; ``response_valid [B, N]`` (the final response up to and including its terminator, on correct
trajectories). Simplification: the same privileged prompt records and scores (TAD scores with a shorter
"Reference Answer" system prompt than it records with). A model never trained on privileged prompts may not follow
one (the tiny zoo diffusion LM answers the default template with an immediate ``<eos>``: no trajectory is kept);
``privileged_template: "{prompt}"`` records with the plain prompt (self-distillation of the temporal targets only).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np
from flax import nnx

from jaxtok.registry import ConfigError

PRIVILEGED_TEMPLATE = "reference answer:{target}\n{prompt}"  # TADArgs' default (synthetic tokenizer characters)
RECORD_POLICY = "llada"
RECORD_BLOCK_LEN = 32


def privileged_prompt_len(prompt_len: int, seq_len: int, template: str = PRIVILEGED_TEMPLATE) -> int:
    """Static width ``P'`` of privileged prompts: the plain prompt, the template's own text and, when the template
    shows the target or answer, ``seq_len`` more (a target fits ``seq_len``)."""
    fixed = len(template.format(target="", prompt="", answer=""))
    return prompt_len + fixed + (seq_len if ("{target}" in template or "{answer}" in template) else 0)


def privileged_prompts(task, split: str, tokenizer, index: np.ndarray, prompt_len: int,
                       template: str = PRIVILEGED_TEMPLATE) -> dict:
    """``{prompt [G, P'], prompt_valid [G, P']}``: ``template`` filled with each row's example (``prompt``,
    reference solution ``target``, ``answer``), left-padded like :func:`jaxtok.data.encode_prompt` (over-long is
    an error)."""
    from jaxtok.data import encode_prompt

    rows = []
    for i in np.asarray(index):
        ex = task.example(split, int(i))
        text = template.format(target=ex.target, prompt=ex.prompt, answer=ex.answer)
        rows.append(encode_prompt(tokenizer, dataclasses.replace(ex, prompt=text), prompt_len, "error",
                                  index=int(i)))
    return {k: np.stack([r[k] for r in rows]) for k in ("prompt", "prompt_valid")}


def trajectory_states(tokens: np.ndarray, ranks: np.ndarray, step: np.ndarray, mask_id: int) -> np.ndarray:
    """``x^(step)`` ``[B, N]``: positions whose commit rank is ``< step[b]`` show their token, the rest
    ``mask_id`` (never-committed positions, rank −1, stay masked)."""
    shown = (ranks >= 0) & (ranks < np.asarray(step)[:, None])
    return np.where(shown, tokens, mask_id).astype(np.int32)


def row_step_ranks(commit_step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, commit steps relabelled ``0..S_b-1`` by their rank among the row's distinct steps (−1 stays −1),
    and ``S_b [B]`` — the row's own trajectory length (rows finish at different loop steps)."""
    cs = np.asarray(commit_step)
    ranks = np.full(cs.shape, -1, np.int32)
    lengths = np.zeros(cs.shape[0], np.int32)
    for b in range(cs.shape[0]):
        used = np.unique(cs[b][cs[b] >= 0])
        ranks[b] = np.where(cs[b] >= 0, np.searchsorted(used, cs[b]), -1)
        lengths[b] = len(used)
    return ranks, lengths


def trajectory_pairs(tokens: np.ndarray, ranks: np.ndarray, lengths: np.ndarray, steps: np.ndarray, delta: int,
                     mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x_t, x_target) = (x^(i), x^(min(i+δ, S_b)))`` ``[B, N]`` for the rows' sampled steps ``i = steps[b]``
    (§5, :func:`jaxtok.train.objectives.tad.trajectory_pair` on every row at once)."""
    steps = np.asarray(steps)
    target_steps = np.minimum(steps + delta, np.asarray(lengths))
    return (trajectory_states(tokens, ranks, steps, mask_id),
            trajectory_states(tokens, ranks, target_steps, mask_id))


def _with_positions(prompt: np.ndarray, prompt_valid: np.ndarray, response: np.ndarray) -> dict:
    tokens = np.concatenate([prompt, response], 1).astype(np.int32)
    valid = np.concatenate([prompt_valid, np.ones(response.shape, bool)], 1)
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "valid": valid, "positions": positions}


def collect_trajectories(model: nnx.Module, prompts: dict, *, task, tokenizer, settings, rng: jax.Array, mesh=None,
                         teacher: Optional[nnx.Module] = None, prepare=None, args=None, seq_len: int,
                         delta: Optional[int] = None):
    """One batch of TAD training pairs from teacher trajectories (module docstring); ``settings`` is the config's
    ``rollout`` section, ``args`` the objective's arguments (``delta``, ``mask_id``; ``delta=`` overrides). Returns a
    :class:`jaxtok.train.rollout.Rollout`."""
    del model, mesh, prepare
    from jaxtok.data import examples_of
    from jaxtok.decode.diffusion import diffusion_generate
    from jaxtok.tasks.tokenizer import SpecialTokens, decode
    from jaxtok.train.rollout import Rollout, expand_groups, fetch

    if teacher is None:
        raise ConfigError("data='trajectory' records trajectories with the frozen teacher: set "
                          "rollout.teacher_init_from")
    delta = int(args.delta if delta is None else delta)
    sp = SpecialTokens.of(tokenizer)
    mask_id = getattr(args, "mask_id", None)
    mask_id = teacher.cfg.mask_token_id if mask_id is None else mask_id
    if mask_id is None:
        raise ConfigError("data='trajectory': objective mask_id=None and the teacher config has no mask_token_id")
    G, P = np.asarray(prompts["prompt"]).shape
    n = settings.num_generations
    N = settings.max_new_tokens
    template = args.privileged_template
    priv = privileged_prompts(task, "train", tokenizer, prompts["index"], privileged_prompt_len(P, seq_len, template),
                              template)
    k_dec, k_step = jax.random.split(rng)
    res = diffusion_generate(teacher, priv["prompt"], priv["prompt_valid"], gen_len=N, policy=RECORD_POLICY,
                             policy_args={"block_len": min(RECORD_BLOCK_LEN, N)}, steps=N,
                             temperature=float(settings.temperature), rng=k_dec, mask_id=int(mask_id),
                             pad_id=sp.pad)
    final, final_valid, commit = fetch(res.tokens), fetch(res.valid), fetch(res.commit_step)  # [G, N]
    examples = examples_of(task, "train", prompts)
    completions = [decode(tokenizer, final[g][final_valid[g]]) for g in range(G)]
    correct = np.array([task.reward(c, e) >= 1.0 for c, e in zip(completions, examples)], bool)  # [G]
    ranks, lengths = row_step_ranks(commit)

    rows = lambda x: np.repeat(np.asarray(x), n, axis=0)  # noqa: E731  [G, ...] -> [G·n, ...]
    steps = np.floor(np.asarray(jax.random.uniform(k_step, (G * n,))) * np.maximum(rows(lengths), 1)).astype(np.int32)
    x_t, x_target = trajectory_pairs(rows(final), rows(ranks), rows(lengths), steps, delta, int(mask_id))
    plain = expand_groups({k: prompts[k] for k in ("prompt", "prompt_valid")}, n)
    batch = _with_positions(np.where(plain["prompt_valid"], plain["prompt"], sp.pad), plain["prompt_valid"], x_t)
    teacher_side = _with_positions(rows(priv["prompt"]), rows(priv["prompt_valid"]), x_t)
    batch.update({f"teacher_{k}": v for k, v in teacher_side.items()})
    batch["x_target"] = x_target
    batch["response_valid"] = rows(final_valid & correct[:, None])
    info = {"rollout/exact_match": float(correct.mean()),
            "rollout/length_mean": float(final_valid.sum(1).mean()),
            "rollout/steps_mean": float(lengths.mean())}
    return Rollout(batch=batch, completions=completions, examples=examples, info=info)
