"""On-policy rollouts for distillation and RL objectives (train_methods.md §0).

One rollout turns a left-padded prompt batch ``{prompt [G, P], prompt_valid [G, P], index [G]}`` into the batch a
rollout objective consumes (``B = G · n`` rows, the ``n`` completions of a prompt contiguous):

1. :func:`expand_groups` repeats every prompt ``n = rollout.num_generations`` times;
2. the jitted sampler :func:`jaxtok.decode.generate.generate` completes them with the current policy (or, for the
   GKD-style ``off_policy_fraction`` of prompt groups, with the teacher); with ``rollout.sampler: speculative``
   (:class:`SpeculativeSampler`) the policy's completions come from lossless speculative decoding
   (:func:`jaxtok.decode.speculative.speculative_generate`) with a small drafter instead: the same distribution
   (the target's, under the same temperature / top-k / top-p) and the same sampler log-probs (the target's, of
   the processed distribution), in fewer target forwards; the drafter can be refreshed every N rollouts by
   on-policy distillation towards the current policy (objective ``opd``);
3. :func:`assemble` lays prompt and completion side by side in the SFT convention (``loss_mask[t]``: token ``t``
   is a completion token predicted from position ``t-1``);
4. :func:`score_rollout` recomputes the behaviour log-probs and entropies (and, for CPPO's top-K divergences, the
   top-K ids and log-probs) with one forward of the training model at the sampling temperature and without
   top-k/top-p filters, so the objective's first inner epoch sees ratio 1 exactly (verl's "recompute old
   log-prob");
5. :func:`jaxtok.train.rewards.score` rewards the decoded completions on the host, and the objective's ``prepare``
   hook (``ObjectiveSpec.prepare``, e.g. TRACE's span annotator) adds its own arrays.

The result (:class:`Rollout`) holds host numpy arrays; the loop places them on the mesh once and runs
``rollout.inner_epochs`` optimizer steps on them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok import mesh as mesh_lib
from jaxtok.stats import chunked_map
from jaxtok.tasks.tokenizer import SpecialTokens, decode


@dataclasses.dataclass
class Rollout:
    """A scored rollout batch: ``batch`` (numpy arrays, the objective's input), the decoded ``completions`` and
    their task ``examples`` (host side), and scalar ``info`` for the metrics log."""

    batch: dict
    completions: list
    examples: list
    info: dict


def expand_groups(prompts: dict, n: int) -> dict:
    """Repeat every row ``n`` times (rows of one prompt contiguous): ``[G, ...] -> [G·n, ...]``."""
    return {k: np.repeat(np.asarray(v), n, axis=0) for k, v in prompts.items()}


def assemble(prompt: np.ndarray, prompt_valid: np.ndarray, completion: np.ndarray,
             completion_valid: np.ndarray) -> dict:
    """Prompt ``[B, P]`` (left-padded) + completion ``[B, N]`` -> ``tokens, positions, valid, loss_mask [B, P+N]``.

    Positions count valid tokens (``cumsum(valid) - 1``, 0 on padding), matching generation's positions, so the
    scoring forward sees the same inputs as the sampler did."""
    tokens = np.concatenate([prompt, completion], axis=1).astype(np.int32)  # [B, T]
    valid = np.concatenate([prompt_valid, completion_valid], axis=1).astype(bool)  # [B, T]
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)  # [B, T]
    loss_mask = np.concatenate([np.zeros_like(prompt_valid, bool), completion_valid.astype(bool)], axis=1)
    return {"tokens": tokens, "positions": positions, "valid": valid, "loss_mask": loss_mask}


def bucketed_width(needed: int, full: int, buckets: int) -> int:
    """The smallest of ``buckets`` equal widths ``k·ceil(full/buckets)`` (capped at ``full``) that holds ``needed``
    columns: a rollout batch takes one of at most ``buckets`` shapes, so its jitted consumers compile at most that
    many times."""
    step = -(-full // max(buckets, 1))
    return min(full, -(-max(needed, 1) // step) * step)


def trim_padding(prompt_valid: np.ndarray, completion_valid: np.ndarray, buckets: int) -> tuple[slice, slice]:
    """Column slices ``(prompt_cols, completion_cols)`` that drop all-padding columns of a rollout: the prompt's
    left padding beyond the longest prompt ``[B, P]`` and the completion's right padding beyond the longest
    completion ``[B, N]``, widened to :func:`bucketed_width` (prompt padding first, then completion padding).

    Only columns invalid in every row are dropped, and positions count valid tokens, so every forward over the
    trimmed batch gives the full-width batch's values on the kept tokens (padding is masked everywhere)."""
    P, N = prompt_valid.shape[1], completion_valid.shape[1]
    p_max = int(prompt_valid.sum(axis=1).max(initial=0))  # left-padded: the longest prompt's columns
    n_max = max(int(completion_valid.sum(axis=1).max(initial=0)), 1)  # right-padded (at least one column)
    width = bucketed_width(p_max + n_max, P + N, buckets)
    p_keep = min(P, width - n_max)
    return slice(P - p_keep, P), slice(0, width - p_keep)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "topk"))
def _score_jit(graphdef, state, tokens, positions, valid, temperature, *, chunk_size, topk=0):
    model = nnx.merge(graphdef, state)
    hidden = model(tokens, positions=positions, valid=valid, return_logits=False, return_hidden=True).hidden
    B, T = tokens.shape

    def one(chunk):  # hidden at t-1 scores token t
        logits = model.logits(chunk["hidden"]).astype(jnp.float32) / chunk["temperature"][:, None]  # [C, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(logp, chunk["target"][:, None], axis=-1)[:, 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        out = {"logp": lp, "entropy": ent}
        if topk:
            out["topk_logp"], out["topk_ids"] = jax.lax.top_k(logp, topk)  # [C, K]
        return out

    tree = {"hidden": hidden[:, :-1], "target": tokens[:, 1:],
            "temperature": jnp.broadcast_to(temperature[:, None], (B, T - 1))}
    out = chunked_map(one, tree, chunk_size=chunk_size, token_ndim=2, remat=False)  # [B, T-1, ...]
    return jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], 1), out)  # [B, T, ...]


def score_rollout(model: nnx.Module, batch: dict, temperature: np.ndarray, *, mesh=None, chunk_size: int = 1024,
                  topk: int = 0) -> dict:
    """Behaviour statistics of a rollout batch under ``softmax(logits[t-1] / temperature)`` (no top-k/top-p
    filters), aligned with ``tokens`` and 0 off ``loss_mask``: ``old_logprobs [B, T]`` (of ``tokens[t]``) and
    ``entropy [B, T]`` (nats), float32; with ``topk = K > 0`` also ``topk_ids [B, T, K]`` int32 and
    ``topk_logprobs [B, T, K]`` float32, the K most likely tokens of that distribution (CPPO's top-K TV/KL, §6.5;
    computed by the same forward as ``old_logprobs`` so the first inner epoch has divergence 0 exactly). The float32
    log-softmax runs over token chunks (no ``[B, T, V]`` float32 array)."""
    graphdef, state = nnx.split(model)
    placed = mesh_lib.put_batch({k: batch[k] for k in ("tokens", "positions", "valid")}
                                | {"temperature": np.asarray(temperature, np.float32)}, mesh)
    out = _score_jit(graphdef, state, placed["tokens"], placed["positions"], placed["valid"], placed["temperature"],
                     chunk_size=chunk_size, topk=int(topk))
    mask = np.asarray(batch["loss_mask"], bool)
    res = {"old_logprobs": np.where(mask, fetch(out["logp"]), 0.0).astype(np.float32),
           "entropy": np.where(mask, fetch(out["entropy"]), 0.0).astype(np.float32)}
    if topk:
        res["topk_ids"] = np.where(mask[..., None], fetch(out["topk_ids"]), 0).astype(np.int32)
        res["topk_logprobs"] = np.where(mask[..., None], fetch(out["topk_logp"]), 0.0).astype(np.float32)
    return res


def score_tokens(model: nnx.Module, batch: dict, temperature: np.ndarray, *, mesh=None, chunk_size: int = 1024):
    """``(old_logprobs, entropy)`` ``[B, T]`` float32 of :func:`score_rollout` (per-token log-prob of
    ``tokens[t]`` under ``softmax(logits[t-1] / temperature)`` and that distribution's entropy, 0 off
    ``loss_mask``)."""
    out = score_rollout(model, batch, temperature, mesh=mesh, chunk_size=chunk_size)
    return out["old_logprobs"], out["entropy"]


def fetch(x: jax.Array) -> np.ndarray:
    """A host numpy copy of a global array (gathered across processes when it is not fully addressable)."""
    if jax.process_count() > 1 and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def accuracy(task, completions, examples) -> np.ndarray:
    """``1`` where the task's verifier accepts the completion's answer (``task.reward >= 1``), else 0. ``[B]``
    float32."""
    return np.array([task.reward(c, e) >= 1.0 for c, e in zip(completions, examples)], np.float32)


def sampler_trainer_mismatch(old_logprobs: np.ndarray, sampler_logprobs: np.ndarray, mask: np.ndarray) -> dict:
    """How far the sampler's per-token log-probs are from the trainer's recomputation of the same tokens
    (:func:`jaxtok.policy.sampler_mismatch`, over ``mask``, the policy's own completion tokens), as rollout info:
    ``rollout/sampler_abs_logp_diff`` = mean ``|lp_train − lp_sampler|`` and ``rollout/sampler_kl`` = mean k3
    estimate of ``KL(sampler ‖ trainer)``. Both are 0 up to float error when the rollout samples without top-k/top-p
    filters (the invariant ``tests/test_logprob_consistency.py`` checks); filters make them positive by design."""
    from jaxtok.policy import sampler_mismatch

    out = sampler_mismatch(jnp.asarray(old_logprobs), jnp.asarray(sampler_logprobs), jnp.asarray(mask))
    return {"rollout/sampler_abs_logp_diff": float(out["abs_logp_diff"]), "rollout/sampler_kl": float(out["kl"])}


def _sample(model, prompt, prompt_valid, settings, rng, sp: SpecialTokens, mesh, sampler=None, entropy=False):
    """``(tokens [B, N], valid [B, N], logprobs [B, N])`` host arrays of the policy's completions: AR
    :func:`~jaxtok.decode.generate.generate`, or ``sampler`` (a :class:`SpeculativeSampler`) when given;
    ``entropy``: AR only, ``entropies [B, N]`` of the sampling distribution appended."""
    if sampler is not None:
        return sampler.sample(model, prompt, prompt_valid, settings, rng, sp, mesh)
    from jaxtok.decode.generate import generate
    from jaxtok.sampling import SamplingParams

    out = generate(model, prompt, prompt_valid, max_new_tokens=settings.max_new_tokens,
                   sampling=SamplingParams(temperature=settings.temperature, top_k=settings.top_k,
                                           top_p=settings.top_p), rng=rng,
                   stop_tokens=sp.eos_ids, pad_id=sp.pad, mesh=mesh, return_entropy=entropy)
    return (fetch(out.tokens), fetch(out.valid), fetch(out.logprobs)) + ((fetch(out.entropy),) if entropy else ())


@dataclasses.dataclass
class SpeculativeSampler:
    """Speculative RL rollouts (``rollout.sampler: speculative``): the policy's completions come from
    :func:`jaxtok.decode.speculative.speculative_generate` with an AR ``drafter`` (a ``Decoder``), the draft-length
    ``policy`` (a ``DraftPolicy``) and at most ``draft_len`` drafts per round.

    Lossless (Leviathan et al. 2023 / Chen et al. 2023, decode_methods.md §A1): drafts are accepted with
    probability ``min(1, p/q)`` and the first rejection is resampled from ``norm(max(0, p - q))``, where p and q are
    the target's and the drafter's distributions after the SAME sampling transform S (temperature, top-k, top-p);
    the completions therefore have the policy's distribution S(p) exactly, as plain sampling does. The sampler
    log-probs are ``log S(p)[token]`` at the target's verify logits (``return_logprobs``), the quantity AR
    ``generate`` returns, so the sampler/trainer mismatch (:func:`sampler_trainer_mismatch`) stays at float
    error without filters.

    ``refresh`` (``rollout.draft_refresh_every = N > 0``, :class:`DrafterRefresh`): before every N-th rollout the
    drafter takes ``rollout.draft_refresh_steps`` optimizer steps of on-policy distillation (objective ``opd``)
    towards the current policy on that rollout's prompts, so it keeps agreeing with a policy that RL moves. The
    refreshed drafter, its optimizer state and the rollout count are part of every checkpoint
    (:meth:`checkpoint_item` / :meth:`restore`), so a resumed run continues with the drafter it had.

    ``last`` holds the acceptance statistics of the latest call (``rollout/spec_*`` info)."""

    drafter: nnx.Module
    policy: object
    draft_len: int
    refresh: Optional["DrafterRefresh"] = None
    rollouts: int = 0
    last: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, plan, policy_cfg, *, mesh=None) -> Optional["SpeculativeSampler"]:
        """The sampler of the run plan's ``rollout`` section (None for ``rollout.sampler: ar``) for a policy of
        config ``policy_cfg``, with the plan's draft-length policy and its parsed arguments. ConfigError (exit 2)
        naming the key for a drafter that is not an AR model, a vocabulary that differs from the policy's, a draft
        policy that does not fit, or an objective (``plan.spec``) whose rollouts the default collector does not
        make."""
        from jaxtok.registry import ConfigError

        cfg, spec = plan.cfg, plan.spec
        ro = cfg.rollout
        if ro.sampler != "speculative":
            return None
        if spec.data != "rollout" or spec.collect is not None:
            raise ConfigError(f"rollout.sampler='speculative': objective {cfg.objective.name!r} collects its own "
                              f"rollouts (data={spec.data!r}); speculative rollouts replace the default "
                              f"collector's sampler only")
        if not ro.draft_init_from:
            raise ConfigError("rollout.draft_init_from=None: rollout.sampler='speculative' needs a drafter")
        drafter = load_drafter(ro.draft_init_from, policy_cfg, mesh=mesh, dtype=cfg.model.dtype, seed=cfg.train.seed)
        policy = plan.draft_policy.fn(plan.draft_policy_args, hidden_size=drafter.cfg.hidden_size)
        policy.check(int(ro.draft_len))
        refresh = None
        if ro.draft_refresh_every:
            refresh = DrafterRefresh(steps=ro.draft_refresh_steps, lr=ro.draft_refresh_lr, seed=cfg.train.seed)
            drafter = refresh.init(drafter, mesh)
        return cls(drafter=drafter, policy=policy, draft_len=int(ro.draft_len), refresh=refresh)

    def checkpoint_item(self) -> dict:
        """What a checkpoint keeps of the sampler: with a drafter refresh, the drafter's train state (weights and
        AdamW moments) and the number of rollouts so far (which rollouts refresh); ``{}`` without one (the drafter
        is then the loaded one at every step)."""
        if self.refresh is None:
            return {}
        return {"rollouts": np.asarray(self.rollouts, np.int64), "drafter": self.refresh._state}

    def restore(self, item: dict) -> None:
        """Continue from a :meth:`checkpoint_item`: the drafter the sampler had when it was saved."""
        if self.refresh is None:
            return
        self.rollouts = int(item["rollouts"])
        self.drafter = self.refresh.restore(item["drafter"])

    def sample(self, model, prompt, prompt_valid, settings, rng, sp: SpecialTokens, mesh):
        """``(tokens [B, N], valid [B, N], logprobs [B, N])`` host arrays, as the AR path returns them."""
        from jaxtok.decode.speculative import ModelDrafter, speculative_generate
        from jaxtok.sampling import SamplingParams

        out = speculative_generate(model, ModelDrafter.of(self.drafter), prompt, prompt_valid,
                                   max_new_tokens=settings.max_new_tokens, draft_len=self.draft_len,
                                   policy=self.policy,
                                   sampling=SamplingParams(temperature=settings.temperature, top_k=settings.top_k,
                                                           top_p=settings.top_p),
                                   rng=rng, stop_tokens=sp.eos_ids, pad_id=sp.pad, mesh=mesh,
                                   return_logprobs=True)
        tokens, valid, logprobs = fetch(out.tokens), fetch(out.valid), fetch(out.logprobs)
        rounds, lengths = fetch(out.rounds), valid.sum(axis=1)
        self.last = {"rollout/spec_tokens_per_target_forward": float(lengths.sum() / max((rounds + 1).sum(), 1)),
                     "rollout/spec_acceptance_rate": float(fetch(out.accepted).sum()
                                                           / max(fetch(out.drafted).sum(), 1)),
                     "rollout/spec_target_forwards": int(out.target_forwards),
                     "rollout/spec_draft_forwards": int(out.draft_forwards)}
        return tokens, valid, logprobs

    def before_rollout(self, model, prompts: dict, *, task, tokenizer, settings, rng, mesh, every: int) -> dict:
        """Count this rollout and, every ``every`` rollouts after the first, refresh the drafter towards ``model``
        (:class:`DrafterRefresh`) on ``prompts``; returns the refresh's ``rollout/draft_refresh_*`` info."""
        self.rollouts += 1
        if self.refresh is None or every <= 0 or self.rollouts == 1 or (self.rollouts - 1) % every:
            return {}
        self.drafter, info = self.refresh(self.drafter, model, prompts, task=task, tokenizer=tokenizer,
                                          settings=settings, rng=rng, mesh=mesh)
        return info


def load_drafter(path: str, policy_cfg, *, mesh=None, dtype: str = "float32", seed: int = 0,
                 key: str = "rollout.draft_init_from") -> nnx.Module:
    """The AR drafter of speculative rollouts: a run directory or an HF folder (``load_any``), or ``preset:<name>``
    (randomly initialised with the policy's vocabulary, seed ``seed + 1``), placed on ``mesh``. ConfigError naming
    ``key`` for a masked-diffusion model or a vocabulary that differs from the policy's ``policy_cfg.vocab_size``."""
    from jaxtok.models import Decoder, presets
    from jaxtok.registry import ConfigError

    if path.startswith("preset:"):
        name = path[len("preset:"):]
        if name not in presets.PRESETS:
            raise ConfigError(f"{key}={path!r}: unknown preset {name!r}; allowed: preset:<one of "
                              f"{sorted(presets.PRESETS)}>")
        drafter = Decoder(presets.get(name, vocab_size=policy_cfg.vocab_size, dtype=dtype), rngs=nnx.Rngs(seed + 1))
        if mesh is not None:
            mesh_lib.shard_model(drafter, mesh)
    else:
        from jaxtok.models.hf import load_any

        drafter, _ = load_any(path, key=key, mesh=mesh, dtype=dtype)
    if getattr(drafter.cfg, "is_diffusion", False):
        raise ConfigError(f"{key}={path!r}: a masked-diffusion model; speculative rollouts need an autoregressive "
                          f"drafter")
    if drafter.cfg.vocab_size != policy_cfg.vocab_size:
        raise ConfigError(f"{key}={path!r}: drafter vocab_size {drafter.cfg.vocab_size} differs from the policy's "
                          f"{policy_cfg.vocab_size}; the drafter must share the policy's vocabulary")
    return drafter


@dataclasses.dataclass
class DrafterRefresh:
    """Drafter refresh by on-policy distillation (train_methods.md §1, objective ``opd`` with its default
    arguments: reverse KL on every completion token): the drafter (student) completes the rollout's prompts with
    AR sampling at the rollout temperature, the current policy is the frozen teacher, and the drafter takes
    ``steps`` AdamW steps (learning rate ``lr``) through the same jitted train step the loop uses
    (:func:`jaxtok.train.step.make_train_step`). The drafter's weights and optimizer state persist across refreshes
    (from the second call on, the ``drafter`` argument is the one the previous call returned); the returned drafter
    is a copy, never donated by a later step."""

    steps: int
    lr: float
    seed: int = 0
    _step: Optional[Callable] = None
    _graphdef: object = None
    _state: object = None

    def _optimizer(self):
        import optax

        return optax.adamw(self.lr)

    def init(self, drafter, mesh=None):
        """The drafter's train state (AdamW at ``lr``), made before the first rollout so that checkpoints have
        the same structure at every step; returns the drafter the sampler uses (a copy of ``drafter``)."""
        from jaxtok.train.step import init_train_state

        graphdef, weights = nnx.split(drafter)  # a copy: the donating train step never consumes the caller's
        self._graphdef, self._state = init_train_state(nnx.merge(graphdef, jax.tree.map(jnp.copy, weights)),
                                                       self._optimizer(), seed=self.seed, mesh=mesh)
        return self._current()

    def _current(self):
        """The drafter of the current train state, as a copy the sampler may hold across later (donating) steps."""
        copy = functools.partial(jax.tree.map, jnp.copy)
        return nnx.merge(self._graphdef, copy(self._state.params), copy(self._state.rest))

    def restore(self, state):
        """Continue from a checkpointed train state; returns the drafter it holds."""
        self._state = state
        return self._current()

    def __call__(self, drafter, policy, prompts, *, task, tokenizer, settings, rng, mesh):
        from jaxtok.registry import OBJECTIVES
        from jaxtok.train.step import frozen_states, make_train_step

        if self._state is None:
            self.init(drafter, mesh)
        if self._step is None:  # built once: the policy's graphdef and the drafter's shapes never change
            import jaxtok.train.objectives  # noqa: F401  (registration)

            entry = OBJECTIVES.entry("opd")
            loss_fn = functools.partial(entry.fn, args=entry.config_cls())  # OPD's defaults: reverse KL, every token
            self._step = make_train_step(nnx.merge(self._graphdef, self._state.params, self._state.rest),
                                         self._optimizer(), loss_fn, mesh=mesh, frozen={"teacher": policy})
        teacher = frozen_states({"teacher": policy})
        losses = []
        for i in range(self.steps):
            student = nnx.merge(self._graphdef, self._state.params, self._state.rest)
            ro = collect(student, prompts, task=task, tokenizer=tokenizer, settings=settings,
                         rng=jax.random.fold_in(rng, i), mesh=mesh)
            del student
            self._state, metrics = self._step(self._state, mesh_lib.put_batch(ro.batch, mesh), teacher)
            losses.append(float(metrics["loss"]))
        return (self._current(),  # the sampler's drafter must outlive the next (donating) step
                {"rollout/draft_refresh_loss": losses[-1], "rollout/draft_refresh_loss_first": losses[0]})


def collect(model: nnx.Module, prompts: dict, *, task, tokenizer, settings, rng: jax.Array, mesh=None,
            teacher: Optional[nnx.Module] = None, prepare: Optional[Callable] = None,
            chunk_size: int = 1024, topk: int = 0, sampler: Optional[SpeculativeSampler] = None,
            trim: bool = True) -> Rollout:
    """One scored rollout batch (module docstring); ``settings`` is the config's ``rollout`` section; ``sampler``
    a :class:`SpeculativeSampler` samples the policy's completions (the teacher's off-policy rows stay AR).
    ``trim``: drop all-padding columns (:func:`trim_padding` with ``settings.width_buckets``); False keeps the
    ``[B, P + N]`` layout of the prompt width ``P`` and ``rollout.max_new_tokens`` ``N``. With
    ``settings.behaviour_logprobs == "sampler"`` ``old_logprobs`` / ``entropy`` are the AR sampler's own (no
    scoring forward, no ``rollout/sampler_*`` info).

    Batch keys: ``tokens, positions, valid, loss_mask [B, T]``, ``old_logprobs, entropy [B, T]`` float32,
    ``sampler_logprobs [B, T]`` (the sampler's own log-probs, with its filters: APPO's rollout-engine log-prob),
    ``rewards [B]`` float32, ``accuracy [B]`` float32 (1 where the task's verifier accepts the answer: what DAPO's
    dynamic sampling compares), ``max_new_tokens [B]`` int32 (the generation budget ``rollout.max_new_tokens``:
    Dr.GRPO's ``L_max``), ``group_ids [B]`` int32, ``temperature [B]`` float32, ``on_policy [B]`` bool
    (False for rows the teacher completed), with ``topk = K > 0`` ``topk_ids [B, T, K]`` int32 and
    ``topk_logprobs [B, T, K]`` float32 (:func:`score_rollout`), plus whatever ``prepare`` returns.

    ``info`` (logged with every step's metrics): ``rollout/reward_mean``, ``rollout/exact_match``,
    ``rollout/length_mean``, ``rollout/entropy_mean`` and the sampler/trainer mismatch on the policy's own sampled
    tokens (:func:`sampler_trainer_mismatch`).
    """
    sp = SpecialTokens.of(tokenizer)
    n = settings.num_generations
    rows = expand_groups(prompts, n)
    G = len(prompts["prompt"])
    k_student, k_teacher, k_mix = jax.random.split(rng, 3)
    spec_info = {}
    if sampler is not None:  # drafter refresh (rollout.draft_refresh_every), then the speculative sampler
        spec_info = sampler.before_rollout(model, prompts, task=task, tokenizer=tokenizer, settings=settings,
                                           rng=jax.random.fold_in(rng, 7), mesh=mesh,
                                           every=getattr(settings, "draft_refresh_every", 0))
    from_sampler = getattr(settings, "behaviour_logprobs", "recompute") == "sampler"
    if from_sampler and (topk or sampler is not None):
        raise ValueError("rollout.behaviour_logprobs='sampler' takes the ar sampler's log-probs; this objective "
                         "needs the behaviour top-K (rollout.topk) or a speculative sampler: use 'recompute'")
    completion, completion_valid, sampler_lp, *sampler_ent = _sample(
        model, rows["prompt"], rows["prompt_valid"], settings, k_student, sp, mesh, sampler=sampler,
        entropy=from_sampler)
    if sampler is not None:
        spec_info.update(sampler.last)
    on_policy = np.ones(G * n, bool)
    if settings.off_policy_fraction > 0:
        if teacher is None:
            raise ValueError("rollout.off_policy_fraction > 0 needs a teacher (rollout.teacher_init_from)")
        groups = np.asarray(jax.random.uniform(k_mix, (G,))) < settings.off_policy_fraction
        if groups.any():
            t_tok, t_valid, t_lp = _sample(teacher, rows["prompt"], rows["prompt_valid"], settings, k_teacher, sp,
                                           mesh)
            on_policy = ~np.repeat(groups, n)
            completion = np.where(on_policy[:, None], completion, t_tok)
            completion_valid = np.where(on_policy[:, None], completion_valid, t_valid)
            sampler_lp = np.where(on_policy[:, None], sampler_lp, t_lp)
    prompt, prompt_valid = rows["prompt"], rows["prompt_valid"]
    if trim:
        p_cols, c_cols = trim_padding(prompt_valid, completion_valid, getattr(settings, "width_buckets", 1))
        prompt, prompt_valid = prompt[:, p_cols], prompt_valid[:, p_cols]  # [B, P'] P' <= P
        completion, completion_valid, sampler_lp, *sampler_ent = (
            x[:, c_cols] for x in (completion, completion_valid, sampler_lp, *sampler_ent))  # [B, N'] N' <= N
    batch = assemble(prompt, prompt_valid, completion, completion_valid)
    pad = np.zeros_like(prompt, np.float32)  # [B, P']
    batch["sampler_logprobs"] = np.concatenate([pad, sampler_lp], axis=1)
    temperature = np.full((G * n,), settings.temperature, np.float32)
    if from_sampler:  # the sampler's own log-probs (0 after a row's end) stand for the scoring forward's
        batch.update(old_logprobs=np.where(batch["loss_mask"], batch["sampler_logprobs"], 0.0).astype(np.float32),
                     entropy=np.where(batch["loss_mask"], np.concatenate([pad, sampler_ent[0]], axis=1),
                                      0.0).astype(np.float32))
    else:
        batch.update(score_rollout(model, batch, temperature, mesh=mesh, chunk_size=chunk_size, topk=topk))
    from jaxtok.data import examples_of
    from jaxtok.train.rewards import score

    examples = examples_of(task, "train", rows)
    completions = [decode(tokenizer, completion[b][completion_valid[b]]) for b in range(G * n)]
    batch.update(rewards=score(task, completions, examples, settings.rewards),
                 accuracy=accuracy(task, completions, examples),
                 max_new_tokens=np.full((G * n,), settings.max_new_tokens, np.int32),
                 group_ids=(np.arange(G * n) // n).astype(np.int32), temperature=temperature, on_policy=on_policy)
    if prepare is not None:
        extra = prepare(batch, completions, examples, task, tokenizer)
        clash = set(extra) & set(batch)
        if clash:
            raise ValueError(f"prepare hook returned keys that already exist in the rollout batch: {sorted(clash)}")
        batch.update(extra)
    lengths = completion_valid.sum(axis=1)
    info = {"rollout/reward_mean": float(batch["rewards"].mean()),
            "rollout/exact_match": float(batch["accuracy"].mean()),
            "rollout/length_mean": float(lengths.mean()),
            "rollout/entropy_mean": float(batch["entropy"].sum() / max(batch["loss_mask"].sum(), 1))}
    if not from_sampler:  # with the sampler's log-probs the train step's ratio_* / approx_kl show the mismatch
        info.update(sampler_trainer_mismatch(batch["old_logprobs"], batch["sampler_logprobs"],
                                             batch["loss_mask"] & on_policy[:, None]))
    info.update(spec_info)
    return Rollout(batch=batch, completions=completions, examples=examples, info=info)
