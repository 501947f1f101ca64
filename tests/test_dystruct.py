"""Dystruct (decode/commit_policies.py, §B18 INFERRED): the end posterior and the window expansion by hand, and
limiting cases in the one diffusion loop — a window covering everything with the structural signals off is the
Fast-dLLM threshold policy; a window that never widens before it is used up sees exactly what a shorter fixed
``gen_len`` sees (the hidden positions are not attended); the length readout fixes the window once."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.decode import commit_policies as cp
from jaxtok.decode.diffusion import diffusion_generate
from jaxtok.models import Decoder, presets
from jaxtok.registry import ConfigError

PROMPT = np.array([[0, 1, 11, 12], [1, 12, 13, 14]])
PVALID = PROMPT != 0
PVALID[1, 0] = True
OFF = {"end_confidence": 1.0, "delta": 1.0}  # structural signals that never fire (posteriors/confidences < 1)


@pytest.fixture(scope="module")
def model():
    return Decoder(presets.get("tiny_diffusion", vocab_size=61), rngs=nnx.Rngs(3))


def run(model, policy, gen_len, **pa):
    return diffusion_generate(model, PROMPT, PVALID, gen_len=gen_len, policy=policy, policy_args=pa,
                              stop_tokens=(2,))


def test_end_posterior_by_hand():
    h = jnp.asarray([[0.5, 0.5, 0.9, 1.0], [0.2, 0.0, 0.5, 0.0]])
    open_ = jnp.asarray([[True, True, False, True], [True, True, True, True]])
    post, beyond = cp.end_posterior(h, open_)
    # row 0: position 2 is decoded (hazard 0): 0.5, 0.25, 0, 0.25 (the rest ends at 3), nothing beyond
    np.testing.assert_allclose(post[0], [0.5, 0.25, 0.0, 0.25], atol=1e-6)
    # row 1: 0.2, 0, 0.8*0.5 = 0.4, 0; beyond = 0.8 * 0.5 = 0.4
    np.testing.assert_allclose(post[1], [0.2, 0.0, 0.4, 0.0], atol=1e-6)
    np.testing.assert_allclose(beyond, [0.0, 0.4], atol=1e-6)
    np.testing.assert_allclose(jnp.sum(post, -1) + beyond, 1.0, atol=1e-6)


def test_window_expansion_by_hand():
    args = cp.DystructArgs(expand=4, margin=1, p_expand=0.5)
    post = jnp.asarray([[0.6, 0.1, 0.0, 0.0, 0.0, 0.0],    # end early: keep the window
                        [0.1, 0.1, 0.3, 0.0, 0.0, 0.0],    # edge (j >= 2) 0.3 + beyond 0.5 = 0.8: widen
                        [0.9, 0.0, 0.0, 0.0, 0.0, 0.0]])   # keep, but used up without an end: widen
    beyond = jnp.asarray([0.3, 0.5, 0.1])
    w = cp.dystruct_window(post, beyond, jnp.asarray([3, 3, 3]), jnp.asarray([False, False, True]), args, n=6)
    np.testing.assert_array_equal(w, [3, 6, 6])  # 3 + 4 capped at n = 6


def test_window_waste_by_hand():
    steps_at = jnp.zeros((2, 9), jnp.int32).at[0, 4].set(2).at[0, 8].set(3).at[1, 8].set(5)
    # row 0: 2 forwards at W=4 (< L=6: no waste) + 3 at W=8 (2 each) = 6; row 1: 5 forwards at 8 with L=3 -> 25
    np.testing.assert_array_equal(cp.window_waste(steps_at, jnp.asarray([6, 3])), [6, 25])


def test_stop_probability_sums_the_terminators():
    logits = jnp.log(jnp.asarray([[[0.1, 0.2, 0.3, 0.4]]]))
    np.testing.assert_allclose(cp.stop_probability(logits, (1, 3)), [[0.6]], atol=1e-6)


def test_full_window_without_structure_is_threshold(model):
    a = run(model, "dystruct", 12, block_len=4, threshold=0.3, init_window=12, **OFF)
    b = run(model, "threshold", 12, block_len=4, threshold=0.3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.nfe, b.nfe)
    np.testing.assert_array_equal(a.policy_state["expansions"], 0)
    np.testing.assert_array_equal(a.policy_state["steps_at"][:, 12], a.nfe)  # every forward saw all 12


def test_hidden_positions_are_not_seen(model):
    """Inside a window of 6 that only widens when used up, decoding equals a fixed gen_len of 6: the 6 hidden masks
    change nothing (with bidirectional attention they would, were they visible)."""
    a = run(model, "dystruct", 12, block_len=6, threshold=0.3, init_window=6, margin=0, p_expand=1.0, **OFF)
    b = run(model, "threshold", 6, block_len=6, threshold=0.3)
    c = run(model, "threshold", 12, block_len=6, threshold=0.3)
    np.testing.assert_array_equal(a.tokens[:, :6], b.tokens)
    np.testing.assert_array_equal(a.commit_step[:, :6], b.commit_step)
    assert not np.array_equal(np.asarray(c.commit_step[:, :6]), np.asarray(b.commit_step)) or not np.array_equal(
        np.asarray(c.tokens[:, :6]), np.asarray(b.tokens))  # the visible tail does change the read
    # rows that did not end inside the window widened it (by expand = 8, capped at 12) and decoded on
    ended = np.asarray(b.lengths) < 6
    np.testing.assert_array_equal(np.asarray(a.policy_state["window"])[~ended], 12)


def test_readout_sets_the_window_once(model):
    out = run(model, "dystruct", 12, block_len=4, threshold=0.3, readout=True, margin=12, **OFF)
    # a margin past the end: the readout window is the whole generation, nothing is hidden -> the threshold decode
    ref = run(model, "threshold", 12, block_len=4, threshold=0.3)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.policy_state["window"], 12)


def test_deferred_widening_commits_nothing_that_step(model):
    """With ``defer`` a step whose posterior widens the window commits nothing; without it the narrow read commits.
    ``p_expand = 0`` makes every step with room to grow a widening step: the first forward (window 4 of 12) commits
    nothing, the window reaches 12 after two steps, and decoding then runs like threshold on the full window."""
    a = run(model, "dystruct", 12, block_len=4, threshold=0.3, init_window=4, expand=4, p_expand=0.0, **OFF)
    b = run(model, "dystruct", 12, block_len=4, threshold=0.3, init_window=4, expand=4, p_expand=0.0, defer=False,
            **OFF)
    cs = np.asarray(a.commit_step)
    assert cs[cs >= 0].min() == 2  # steps 0 and 1 only widened (4 -> 8 -> 12)
    assert np.all(np.any(np.asarray(b.commit_step) == 0, axis=-1))  # undeferred: every row commits at step 0
    np.testing.assert_array_equal(a.policy_state["expansions"], 2)
    full = run(model, "threshold", 12, block_len=4, threshold=0.3)
    np.testing.assert_array_equal(a.tokens, full.tokens)


def test_bad_arguments_name_the_key(model):
    with pytest.raises(ConfigError, match="init_window"):
        run(model, "dystruct", 8, init_window=0)
    with pytest.raises(ConfigError, match="p_expand"):
        run(model, "dystruct", 8, p_expand=1.5)
    with pytest.raises(ConfigError, match="cache"):
        run(model, "dystruct", 8, cache="prefix")
