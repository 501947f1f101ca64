"""Tests for jaxtok.decode.generate: cached jitted AR generation against naive full forwards."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok import sampling
from jaxtok.decode import generate
from jaxtok.mesh import make_mesh
from jaxtok.models import Decoder, presets

gen_module = importlib.import_module("jaxtok.decode.generate")

V = 32


@pytest.fixture(scope="module")
def model():
    return Decoder(presets.get("tiny_draft", vocab_size=V), rngs=nnx.Rngs(0))


def left_pad(rows, width, pad=0):
    """Left-pad lists of ids to ``width`` -> (prompt [B, P], prompt_valid [B, P])."""
    prompt = np.full((len(rows), width), pad, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        prompt[i, width - len(r):] = r
        valid[i, width - len(r):] = True
    return prompt, valid


ROWS = [[5, 6, 7], [9, 10, 11, 12, 13], [4]]


def naive_greedy(model, row, n):
    """Greedy decoding by full forwards without a cache (the reference)."""
    toks = list(row)
    for _ in range(n):
        logits = model(jnp.asarray([toks], jnp.int32)).logits[0, -1]
        toks.append(int(jnp.argmax(logits)))
    return toks[len(row):]


def full_log_probs(model, row, generated, **transform):
    """Log-probs of ``generated`` after ``row`` from one full forward, under ``process_logits(**transform)``."""
    seq = jnp.asarray([list(row) + list(generated)], jnp.int32)
    logits = model(seq).logits[0, len(row) - 1: -1]  # [n, V] predicting the generated tokens
    lp = jax.nn.log_softmax(sampling.process_logits(logits, **transform), axis=-1)
    return lp, np.asarray(sampling.token_log_probs(lp, jnp.asarray(generated)))


def test_greedy_equals_naive_full_forward_loop(model):
    n = 6
    prompt, valid = left_pad(ROWS, 6)
    out = generate(model, prompt, valid, max_new_tokens=n, temperature=0.0, stop_tokens=(), rng=jax.random.key(0))
    assert out.tokens.shape == (3, n) and out.logprobs.shape == (3, n)
    for i, row in enumerate(ROWS):
        np.testing.assert_array_equal(out.tokens[i], naive_greedy(model, row, n))
    assert np.all(out.valid) and not np.any(out.done)
    np.testing.assert_array_equal(out.lengths, [n, n, n])
    assert int(out.num_forwards) == n  # prefill + n-1 decode steps


def test_left_padding_gives_the_unpadded_continuation(model):
    n = 5
    alone = generate(model, np.array([ROWS[0]]), np.ones((1, 3), bool), max_new_tokens=n, temperature=0.0,
                     stop_tokens=(), rng=jax.random.key(0))
    prompt, valid = left_pad([ROWS[0], ROWS[1]], 8)
    padded = generate(model, prompt, valid, max_new_tokens=n, temperature=0.0, stop_tokens=(), rng=jax.random.key(0))
    np.testing.assert_array_equal(padded.tokens[0], alone.tokens[0])
    np.testing.assert_allclose(padded.logprobs[0], alone.logprobs[0], atol=1e-5)


def test_stop_tokens_end_rows_and_the_loop(model):
    n = 8
    prompt, valid = left_pad(ROWS, 6)
    free = generate(model, prompt, valid, max_new_tokens=n, temperature=0.0, stop_tokens=(), rng=jax.random.key(0))
    row0 = [int(t) for t in free.tokens[0]]
    stop_at = next(i for i in range(1, n) if row0[i] not in row0[:i])  # first position of a new token in row 0
    stop = row0[stop_at]
    out = generate(model, prompt, valid, max_new_tokens=n, temperature=0.0, stop_tokens=(stop,), pad_id=1,
                   rng=jax.random.key(0))
    for i in range(3):
        ref = [int(t) for t in free.tokens[i]]
        end = ref.index(stop) + 1 if stop in ref else n
        np.testing.assert_array_equal(out.tokens[i, :end], ref[:end])
        assert np.all(np.asarray(out.tokens[i, end:]) == 1)  # pad_id after the stop token
        np.testing.assert_array_equal(out.valid[i], np.arange(n) < end)
        assert np.all(np.asarray(out.logprobs[i, end:]) == 0)
        assert int(out.lengths[i]) == end and bool(out.done[i]) == (stop in ref)
    # a single row stops the whole loop: prefill + stop_at decode steps
    one = generate(model, prompt[:1], valid[:1], max_new_tokens=n, temperature=0.0, stop_tokens=(stop,),
                   rng=jax.random.key(0))
    assert int(one.num_forwards) == stop_at + 1 and bool(one.done[0])


@pytest.mark.parametrize("transform", [dict(temperature=1.0), dict(temperature=0.7, top_k=5)])
def test_logprobs_entropy_topk_match_full_forward(model, transform):
    n = 5
    prompt, valid = left_pad(ROWS, 6)
    out = generate(model, prompt, valid, max_new_tokens=n, stop_tokens=(), rng=jax.random.key(3),
                   return_entropy=True, return_topk=4, **transform)
    assert out.entropy.shape == (3, n) and out.topk_probs.shape == (3, n, 4) and out.topk_ids.shape == (3, n, 4)
    for i, row in enumerate(ROWS):
        gen = [int(t) for t in out.tokens[i]]
        lp, ref = full_log_probs(model, row, gen, **transform)
        np.testing.assert_allclose(out.logprobs[i], ref, atol=1e-4)
        np.testing.assert_allclose(out.entropy[i], sampling.entropy_from_log_probs(lp), atol=1e-4)
        top_p, top_i = jax.lax.top_k(jnp.exp(lp), 4)
        np.testing.assert_allclose(out.topk_probs[i], top_p, atol=1e-5)
        np.testing.assert_array_equal(out.topk_ids[i], top_i)
    if "top_k" in transform:  # sampled tokens always lie in the top-k set
        assert np.all(np.asarray(out.topk_probs)[..., 0] > 0)


def test_second_call_with_equal_shapes_does_not_retrace(model):
    prompt, valid = left_pad(ROWS, 7)
    kw = dict(max_new_tokens=3, top_p=0.9, stop_tokens=(2,))
    generate(model, prompt, valid, temperature=0.8, rng=jax.random.key(0), **kw)
    before = gen_module.num_traces()
    out = generate(model, prompt, valid, temperature=0.3, rng=jax.random.key(1), **kw)  # new values, same shapes
    assert gen_module.num_traces() == before
    generate(model, prompt, valid, temperature=0.3, rng=jax.random.key(1), max_new_tokens=4)  # new shape -> trace
    assert gen_module.num_traces() == before + 1
    assert out.tokens.shape == (3, 3)


def test_sharded_equals_unsharded_greedy(model):
    rows = [[3 + i, 4 + (i * 7) % 20, 9] [: 1 + i % 3] for i in range(8)]
    prompt, valid = left_pad(rows, 4)
    kw = dict(max_new_tokens=5, temperature=0.0, stop_tokens=(2,), rng=jax.random.key(0))
    ref = generate(model, prompt, valid, **kw)
    for mesh in (make_mesh(data=8), make_mesh(data=4, tensor=2)):
        out = generate(model, prompt, valid, mesh=mesh, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.valid, ref.valid)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_bad_inputs_raise_clear_errors(model):
    prompt, valid = left_pad(ROWS, 6)
    bad = prompt.copy()
    bad[1, -1] = V + 3
    with pytest.raises(ValueError, match=r"prompt: token id 35"):
        generate(model, bad, valid, max_new_tokens=2, rng=jax.random.key(0))
    bad[1, -1] = -1
    with pytest.raises(ValueError, match=r"prompt: token id -1"):
        generate(model, bad, valid, max_new_tokens=2, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, prompt, valid[:, ::-1], max_new_tokens=2, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, valid, max_new_tokens=2, temperature=-1.0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, valid, max_new_tokens=2, top_p=0.0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, valid, max_new_tokens=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="stop_tokens"):
        generate(model, prompt, valid, max_new_tokens=2, stop_tokens=(V,), rng=jax.random.key(0))
    with pytest.raises(ValueError, match="divisible"):
        generate(model, prompt, valid, max_new_tokens=2, rng=jax.random.key(0), mesh=make_mesh(data=8))
