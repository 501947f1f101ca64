"""Sharded speculative decoding (issue 20 item 5): ``speculative_generate(..., mesh=...)`` on the 8 simulated CPU
devices equals the unsharded run.

One batch mixes greedy rows (temperature 0) and sampled rows (temperature 0.9) so a single compiled program per
mesh covers both: greedy rows must be token-identical to the unsharded run, and sampled rows with the same key are
token-identical too — JAX's partitionable threefry (``jax_threefry_partitionable``, on by default) draws the same
bits whatever the sharding, and the acceptance test ``u < p/q`` sees the same probabilities up to float error
(the χ² losslessness of the unsharded loop, tests/test_speculative.py, therefore carries over unchanged). The
per-token target log-probs (``return_logprobs``) agree to float error.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtok.decode.speculative import ModelDrafter, NgramDrafter, RoutedDrafter, speculative_generate
from jaxtok.sampling import SamplingParams
from jaxtok.mesh import make_mesh
from jaxtok.models import Decoder, ModelConfig

V = 16  # divides tensor=2 (the vocabulary is sharded, not replicated)
B, P, N, G = 16, 4, 8, 3
STOP = 2


def _cfg(d, layers):
    return ModelConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_layers=layers, num_heads=2,
                       num_kv_heads=2, head_dim=d // 2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def pair():
    return Decoder(_cfg(32, 2), rngs=nnx.Rngs(0)), Decoder(_cfg(16, 1), rngs=nnx.Rngs(1))


def _prompts():
    """B left-padded prompts of 1..P tokens, ids >= 3 (no stop token inside)."""
    rng = np.random.default_rng(0)
    lens = rng.integers(1, P + 1, B)
    valid = np.arange(P)[None, :] >= (P - lens)[:, None]
    return np.where(valid, rng.integers(3, V, (B, P)), 0).astype(np.int32), valid


TEMPS = np.where(np.arange(B) % 2 == 0, 0.0, 0.9).astype(np.float32)  # even rows greedy, odd rows sampled


def _run(target, drafter, mesh=None):
    prompt, valid = _prompts()
    return speculative_generate(target, drafter, prompt, valid, max_new_tokens=N, draft_len=G,
                                sampling=SamplingParams(temperature=TEMPS),
                                stop_tokens=(STOP,), rng=jax.random.key(3), mesh=mesh, return_logprobs=True)


def _assert_same(out, ref):
    for field in ("tokens", "valid", "lengths", "done", "rounds", "accepted", "drafted"):
        np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(ref, field)),
                                      err_msg=field)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=2e-5)
    assert int(out.target_forwards) == int(ref.target_forwards)


def test_sharded_model_drafter_equals_unsharded_greedy_and_sampled(pair):
    """Rows on ``data`` (4 shards), the target's and the drafter's weights on ``tensor`` (2): the mixed greedy /
    sampled batch is identical to the single-device run, token for token, with the same acceptance counts."""
    target, draft = pair
    ref = _run(target, ModelDrafter.of(draft))
    out = _run(target, ModelDrafter.of(draft), mesh=make_mesh(data=4, tensor=2))
    assert out.tokens.sharding.spec[0] is not None  # the output stays row-sharded
    _assert_same(out, ref)
    acc = np.asarray(ref.accepted)
    assert 0 < acc.sum() < np.asarray(ref.drafted).sum()  # drafts are both accepted and rejected: a real test
    greedy = TEMPS == 0
    assert np.all(np.asarray(ref.valid)[greedy].sum(1) >= 1)
    # the log-probs are the target's: greedy rows' tokens are the argmax, so their log-prob is the max log-prob
    lp = np.asarray(ref.logprobs)
    assert np.all(lp[np.asarray(ref.valid)] <= 1e-6)


@pytest.mark.slow
def test_sharded_routed_drafter_on_data_fsdp_tensor_equals_unsharded(pair):
    """TAPS over a model drafter and prompt lookup, on data 2 x fsdp 2 x tensor 2 (weights' embed axis on fsdp
    too): identical to the unsharded run."""
    target, draft = pair
    drafter = RoutedDrafter((ModelDrafter.of(draft), NgramDrafter(vocab_size=V, max_ngram=2)))
    ref = _run(target, drafter)
    out = _run(target, drafter, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    _assert_same(out, ref)
    np.testing.assert_array_equal(np.asarray(out.route_counts), np.asarray(ref.route_counts))


def test_sharded_batch_must_divide_the_row_shards(pair):
    target, draft = pair
    prompt, valid = _prompts()
    with pytest.raises(ValueError, match="divisible"):
        speculative_generate(target, ModelDrafter.of(draft), prompt[:6], valid[:6], max_new_tokens=2,
                             rng=jax.random.key(0), mesh=make_mesh(data=4, tensor=2))
