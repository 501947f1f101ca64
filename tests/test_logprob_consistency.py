"""Rollout/trainer consistency (issue 14, item 4): the per-token log-probs the sampler returns
(:func:`jaxtok.decode.generate.generate`, what :mod:`jaxtok.train.rollout` records as ``sampler_logprobs``) equal the
train step's forward log-probs of the same tokens (:func:`jaxtok.train.objectives.policy_gradient.rollout_token_stats`
on the rollout layout of :func:`jaxtok.train.rollout.assemble`), across batch shapes and left padding; greedy
speculative decoding emits the plain sampler's tokens, so the same holds for it.

Tolerance: ``ATOL = 5e-5`` nats, float32 on CPU — the sampler scores each token with the KV-cached decode step, the
trainer with one full forward; they differ only in summation order. An off-by-one in positions, padding or
temperature moves log-probs by O(0.1–1) nats.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtok.decode.generate import generate
from jaxtok.decode.speculative import NgramDrafter, speculative_generate
from jaxtok.sampling import GREEDY, SamplingParams
from jaxtok.models import Decoder, ModelConfig
from jaxtok.train import rollout
from jaxtok.train.objectives.policy_gradient import rollout_token_stats

ATOL = 5e-5
V, N, STOP, PAD = 16, 6, 2, 0


def _cfg():
    return ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=8, max_position_embeddings=32)


@pytest.fixture(scope="module")
def policy():
    return Decoder(_cfg(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def trainer_logp(policy):
    """``fn(batch, temperature [B]) -> logp [B, T]``: the train step's forward (jitted once per shape)."""
    graphdef, state = nnx.split(policy)
    fn = jax.jit(lambda st, b: rollout_token_stats(nnx.merge(graphdef, st), b, with_entropy=False,
                                                   chunk_size=7)["logp"])
    return lambda batch, temperature: np.asarray(fn(state, {**batch, "temperature": temperature}))


def _prompts(left_pads, width, seed):
    """Left-padded prompts ``[B, width]``: row b has ``left_pads[b]`` pad slots, random tokens after."""
    rng = np.random.default_rng(seed)
    valid = np.arange(width)[None, :] >= np.asarray(left_pads)[:, None]
    return np.where(valid, rng.integers(3, V, (len(left_pads), width)), PAD).astype(np.int32), valid


def _rollout_batch(prompt, prompt_valid, tokens, valid):
    """The rollout's layout: ``tokens, positions, valid, loss_mask [B, P + N]`` (:func:`rollout.assemble`)."""
    return rollout.assemble(prompt, prompt_valid, np.asarray(tokens), np.asarray(valid))


@pytest.mark.parametrize("left_pads, width, temperature", [
    ((0, 3), 5, 1.3),  # B = 2, one unpadded row
    ((2, 0, 5), 8, 0.7),  # B = 3, a one-token prompt
])
def test_sampler_logprobs_equal_trainer_logprobs(policy, trainer_logp, left_pads, width, temperature):
    prompt, prompt_valid = _prompts(left_pads, width, seed=width)
    out = generate(policy, prompt, prompt_valid, max_new_tokens=N, sampling=SamplingParams(temperature=temperature),
                   stop_tokens=(STOP,), pad_id=PAD, rng=jax.random.key(width))
    batch = _rollout_batch(prompt, prompt_valid, out.tokens, out.valid)
    B = len(left_pads)
    lp = trainer_logp(batch, np.full(B, temperature, np.float32))[:, width:]  # [B, N]
    v = np.asarray(out.valid)
    assert v.sum() > B  # several sampled tokens per row on average
    np.testing.assert_allclose(lp[v], np.asarray(out.logprobs)[v], atol=ATOL)
    # the metric the rollout logs every step, on the same numbers
    sampler = np.concatenate([np.zeros((B, width), np.float32), np.asarray(out.logprobs)], 1)
    info = rollout.sampler_trainer_mismatch(np.concatenate([np.zeros((B, width)), lp], 1), sampler,
                                            batch["loss_mask"])
    assert info["rollout/sampler_abs_logp_diff"] < ATOL and info["rollout/sampler_kl"] < ATOL ** 2
    # a sampler/trainer temperature mismatch is what the invariant catches
    off = trainer_logp(batch, np.full(B, 1.0, np.float32))[:, width:]
    assert np.abs(off[v] - np.asarray(out.logprobs)[v]).max() > 100 * ATOL


def test_greedy_speculative_tokens_score_like_plain_sampling(policy, trainer_logp):
    """Greedy speculative decoding (draft-and-verify, rollbacks) emits exactly the plain greedy tokens, and the
    trainer scores them like the plain sampler (greedy rows report log-probs at temperature 1). SpeculativeResult
    returns no per-token log-probs, so the sampled speculative path cannot be compared token by token."""
    prompt, prompt_valid = _prompts((2, 0, 5), 8, seed=8)  # the shapes of the sampled case: programs are reused
    spec = speculative_generate(policy, NgramDrafter(V), prompt, prompt_valid, max_new_tokens=N, draft_len=3,
                                sampling=GREEDY, stop_tokens=(STOP,), pad_id=PAD, rng=jax.random.key(0))
    plain = generate(policy, prompt, prompt_valid, max_new_tokens=N, sampling=GREEDY, stop_tokens=(STOP,),
                     pad_id=PAD, rng=jax.random.key(0))
    v = np.asarray(plain.valid)
    np.testing.assert_array_equal(np.asarray(spec.valid), v)
    np.testing.assert_array_equal(np.asarray(spec.tokens)[v], np.asarray(plain.tokens)[v])
    batch = _rollout_batch(prompt, prompt_valid, spec.tokens, spec.valid)
    lp = trainer_logp(batch, np.ones(3, np.float32))[:, 8:]
    np.testing.assert_allclose(lp[v], np.asarray(plain.logprobs)[v], atol=ATOL)
