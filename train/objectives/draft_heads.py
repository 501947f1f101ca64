"""The learned draft-length heads of speculative decoding: SpecDec++ (decode_methods.md §A2) and SpecKV (§A3),
trained beside a frozen target and drafter (``jaxtok train configs/heads/{specdecpp,speckv}.yaml``, run by
:mod:`jaxtok.train.heads`; ``model.init_from`` = the target, ``decode.draft_init_from`` = the drafter, ``data`` = the
task whose training prompts are recorded; the run directory is the ``decode.policy_args.head_path``).

SpecDec++ acceptance head (:func:`specdecpp_examples`, :func:`specdecpp_loss`):
  X = the target's own responses (``generate``), Y_t ~ S(q_t(· | X_<t)) the drafter's token at each response
  position under teacher forcing, soft label ``y_t = min(1, p_t(Y_t) / q_t(Y_t))``; the drafter reads the mixed
  sequence Z (Z_t = X_t w.p. ``mix_ratio``, else Y_t) and its last hidden state at t is the head's input; only
  positions with Z_t = Y_t count. Loss: class-weighted soft cross-entropy
  ``Σ[w·(1−y)·CE(·,0) + y·CE(·,1)] / Σ[w·(1−y) + y]`` with ``w = weight_mismatch`` (6).

SpecKV predictor (:func:`speckv_examples`, :func:`speckv_loss`): greedy rounds simulated along the target's
  greedy responses (exact for greedy decoding: drafts match X until the first mismatch, so teacher forcing gives
  the round's acceptance count); each round draws γ from the candidates; a record is the previous round's draft
  statistics, ``comp_enc`` and γ -> the round's acceptance fraction ``nacc / γ``; squared loss (the reference is an
  sklearn ``MLPRegressor``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtok import sampling
from jaxtok.decode import draft_policies as dp
from jaxtok.decode.generate import generate
from jaxtok.sampling import GREEDY, SamplingParams
from jaxtok.models.heads import specdecpp_head, speckv_head
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.train.heads import HeadRun, fit_head, merge_records, prompt_batches

# ----------------------------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------------------------


def _full_sequences(prompt, prompt_valid, response, response_valid):
    """``[B, P + N]`` tokens and validity of prompt + response (left-padded prompt, right-padded response)."""
    tokens = jnp.concatenate([jnp.asarray(prompt, jnp.int32), jnp.asarray(response, jnp.int32)], axis=1)
    valid = jnp.concatenate([jnp.asarray(prompt_valid, bool), jnp.asarray(response_valid, bool)], axis=1)
    return tokens, valid


def specdecpp_examples(target, drafter, prompt, prompt_valid, *, max_new_tokens: int, temperature: float = 1.0,
                       mix_ratio: float = 0.15, rng: jax.Array, stop_tokens: Sequence[int] = (2,)) -> dict:
    """SpecDec++ training records (§A2 "Training data") from a prompt batch.

    Returns numpy arrays over ``M`` kept positions: ``hidden [M, D]`` drafter hidden states at the position of
    ``Y_t`` in Z, ``label [M]`` soft acceptance probability ``min(1, p/q)``.
    """
    k_gen, k_draft, k_mix = jax.random.split(rng, 3)
    gen = generate(target, prompt, prompt_valid, max_new_tokens=max_new_tokens,
                   sampling=SamplingParams(temperature=temperature),
                   stop_tokens=stop_tokens, rng=k_gen)
    p_len = prompt.shape[1]
    tokens, valid = _full_sequences(prompt, prompt_valid, gen.tokens, gen.valid)
    t = jnp.float32(temperature)
    # response token i sits at column P+i and is predicted from column P+i-1
    lp_target = jax.nn.log_softmax(sampling.process_logits(target(tokens, valid=valid).logits, t), -1)
    lp_draft = jax.nn.log_softmax(sampling.process_logits(drafter(tokens, valid=valid).logits, t), -1)
    pred = slice(p_len - 1, p_len - 1 + max_new_tokens)
    y = sampling.gumbel_argmax(k_draft, lp_draft[:, pred]) if temperature > 0 else jnp.argmax(lp_draft[:, pred], -1)
    label = jnp.exp(jnp.minimum(0.0, sampling.token_log_probs(lp_target[:, pred], y)
                                - sampling.token_log_probs(lp_draft[:, pred], y)))  # [B, N]
    use_y = jax.random.uniform(k_mix, y.shape) >= mix_ratio
    z = jnp.where(use_y, y, gen.tokens)
    z_tokens, _ = _full_sequences(prompt, prompt_valid, z, gen.valid)
    hidden = drafter(z_tokens, valid=valid, return_hidden=True, return_logits=False).hidden[:, p_len:]  # [B, N, D]
    keep = np.asarray(gen.valid & use_y)
    return {"hidden": np.asarray(hidden, np.float32)[keep], "label": np.asarray(label, np.float32)[keep]}


def speckv_examples(target, drafter, prompt, prompt_valid, *, max_new_tokens: int,
                    candidates: Sequence[int] = (2, 4, 6, 8), comp_enc: int = 0, rng: jax.Array,
                    stop_tokens: Sequence[int] = (2,)) -> dict:
    """SpecKV profiling records from simulated greedy rounds (see the module docstring).

    Returns ``inputs [M, 6]`` (previous round's features, comp_enc, γ) and ``rate [M]`` (= nacc / γ).
    """
    gen = generate(target, prompt, prompt_valid, max_new_tokens=max_new_tokens, sampling=GREEDY,
                   stop_tokens=stop_tokens, rng=rng)
    p_len = prompt.shape[1]
    tokens, valid = _full_sequences(prompt, prompt_valid, gen.tokens, gen.valid)
    d_logits = drafter(tokens, valid=valid).logits[:, p_len - 1:p_len - 1 + max_new_tokens]  # predicts response i
    match = np.asarray((jnp.argmax(d_logits, -1) == gen.tokens) & gen.valid)  # [B, N]
    stats = dp.draft_stats(d_logits, gen.valid)
    ent, conf = np.asarray(stats.entropy_bits), np.asarray(stats.confidence)
    lengths = np.asarray(gen.lengths)
    choice = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**31 - 1)))
    inputs, rate = [], []
    for b in range(tokens.shape[0]):
        t, prev = 1, None  # token 0 comes from the prefill
        while t < lengths[b]:
            g = int(choice.choice(candidates))
            span = slice(t, min(t + g, lengths[b]))
            nacc = int(np.cumprod(match[b, span]).sum())
            if prev is not None and t + g <= lengths[b]:  # rounds cut by the response end are not recorded
                inputs.append(list(prev) + [comp_enc, g])
                rate.append(nacc / g)
            e, c = ent[b, span], conf[b, span]
            prev = (e.mean(), c.mean(), e.max(), c.min())
            t += nacc + 1
    return {"inputs": np.asarray(inputs, np.float32).reshape(-1, 6), "rate": np.asarray(rate, np.float32)}


# ----------------------------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpecDecPPHeadArgs:
    """``prompts``: training prompts recorded (whole batches of ``decode.batch_size``); ``mix_ratio``: the share of
    response positions where Z keeps the target's token (not trained on); ``weight_mismatch``: the class weight w
    of rejections; ``depth``: residual blocks of the head."""

    prompts: int = 128
    mix_ratio: float = 0.15
    weight_mismatch: float = 6.0
    depth: int = 3

    def __post_init__(self):
        if self.prompts < 1 or self.depth < 0 or not 0.0 <= self.mix_ratio < 1.0 or self.weight_mismatch <= 0:
            raise ValueError(f"prompts={self.prompts} >= 1, depth={self.depth} >= 0, mix_ratio={self.mix_ratio} in "
                             f"[0, 1), weight_mismatch={self.weight_mismatch} > 0 required")


@dataclasses.dataclass(frozen=True)
class SpecKVHeadArgs:
    """``prompts``: training prompts recorded (whole batches of ``decode.batch_size``); ``candidates``: the γ values
    drawn per simulated round (the policy's); ``comp_enc``: the target-compression code recorded (0 = fp16);
    ``hidden``: the predictor's width."""

    prompts: int = 128
    candidates: Tuple[int, ...] = (2, 4, 6, 8)
    comp_enc: int = 0
    hidden: int = 16

    def __post_init__(self):
        if self.prompts < 1 or not self.candidates or any(c < 1 for c in self.candidates) or self.hidden < 1:
            raise ValueError(f"prompts={self.prompts} >= 1, candidates={self.candidates!r} (integers >= 1), "
                             f"hidden={self.hidden} >= 1 required")


def _target_and_drafter(cfg):
    from jaxtok.models.hf import load_any

    for key, value in (("model.init_from", cfg.model.init_from),
                       ("decode.draft_init_from", cfg.decode.draft_init_from)):
        if not value:
            raise ConfigError(f"{key}=None: objective {cfg.objective.name!r} needs the target (model.init_from) and "
                              f"the drafter (decode.draft_init_from) run directories")
    target, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype)
    drafter, _ = load_any(cfg.decode.draft_init_from, key="decode.draft_init_from", dtype=cfg.model.dtype)
    return target, drafter


def _records(cfg, tokenizer, task, prompts: int, example_fn) -> dict:
    """``example_fn(target, drafter, prompt, prompt_valid, rng=, max_new_tokens=, stop_tokens=)`` over the recorded
    prompt batches, concatenated."""
    from jaxtok.tasks.tokenizer import SpecialTokens

    target, drafter = _target_and_drafter(cfg)
    stop = SpecialTokens.of(tokenizer).eos_ids
    key = jax.random.key(cfg.train.seed)
    records = []
    for batch in prompt_batches(cfg, tokenizer, task, prompts):
        key, sub = jax.random.split(key)
        records.append(example_fn(target, drafter, batch["prompt"], batch["prompt_valid"], rng=sub,
                                  max_new_tokens=cfg.decode.max_new_tokens, stop_tokens=stop))
    return merge_records(records), drafter


def specdecpp_run(cfg, args: SpecDecPPHeadArgs, *, tokenizer, task) -> HeadRun:
    """Records at ``max(decode.temperature, 1e-3)`` and a fresh head on the drafter's hidden width."""
    temperature = max(cfg.decode.temperature, 1e-3)

    def examples(target, drafter, prompt, valid, **kw):
        return specdecpp_examples(target, drafter, prompt, valid, temperature=temperature, mix_ratio=args.mix_ratio,
                                  **kw)

    data, drafter = _records(cfg, tokenizer, task, args.prompts, examples)
    ctor = {"hidden_size": drafter.cfg.hidden_size, "depth": args.depth}
    return HeadRun(head=specdecpp_head(**ctor, seed=cfg.train.seed), kind="specdecpp", ctor=ctor, train=data,
                   replace=True)


def speckv_run(cfg, args: SpecKVHeadArgs, *, tokenizer, task) -> HeadRun:
    """Records of greedy rounds with γ drawn from ``args.candidates`` and a fresh predictor."""

    def examples(target, drafter, prompt, valid, **kw):
        return speckv_examples(target, drafter, prompt, valid, candidates=args.candidates, comp_enc=args.comp_enc,
                               **kw)

    data, _ = _records(cfg, tokenizer, task, args.prompts, examples)
    ctor = {"hidden": args.hidden}
    return HeadRun(head=speckv_head(**ctor, seed=cfg.train.seed), kind="speckv", ctor=ctor, train=data,
                   replace=True)


@OBJECTIVES.register("specdecpp", SpecDecPPHeadArgs, head=specdecpp_run)
def specdecpp_loss(head, batch: dict, rng, args: SpecDecPPHeadArgs):
    """Class-weighted soft cross-entropy of the acceptance head (§A2) as
    ``(Σ w·(1−y)·CE0 + y·CE1, Σ w·(1−y) + y, aux)`` over ``batch = {hidden [M, D], label [M]}`` (optional
    ``mask [M]``); the step divides once."""
    lp = jax.nn.log_softmax(head(batch["hidden"]), axis=-1)  # [M, 2]
    y = batch["label"].astype(jnp.float32)
    m = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones_like(y)
    w0 = args.weight_mismatch * (1.0 - y) * m
    w1 = y * m
    count = jnp.sum(w0 + w1)
    return -jnp.sum(w0 * lp[:, 0] + w1 * lp[:, 1]), count, {"label_mean": (jnp.sum(y * m), jnp.sum(m))}


@OBJECTIVES.register("speckv", SpecKVHeadArgs, head=speckv_run)
def speckv_loss(head, batch: dict, rng, args: SpecKVHeadArgs):
    """Squared error of the predicted acceptance rate (raw output, as sklearn's MLPRegressor) as ``(Σ (r̂ − r)², M,
    aux)`` over ``batch = {inputs [M, 6], rate [M]}``."""
    err = head(batch["inputs"])[..., 0] - batch["rate"]  # [M]
    return jnp.sum(err**2), jnp.asarray(err.shape[0], jnp.float32), {}




def fit_records(kind: str, head, records: dict, *, steps: int, seed: int = 0, args=None) -> list[float]:
    """Adam 3e-3 on ``head`` over ``records`` of ``kind`` (``specdecpp``/``speckv``) with the objective's loss and
    default (or given) arguments, minibatches of 256 drawn with replacement (:func:`jaxtok.train.heads.fit_head`):
    what the speculative benchmarks use to fit heads in-process."""
    loss, cls = {"specdecpp": (specdecpp_loss, SpecDecPPHeadArgs), "speckv": (speckv_loss, SpecKVHeadArgs)}[kind]
    return fit_head(head, functools.partial(loss, args=args or cls()), records, steps=steps, seed=seed, replace=True)
