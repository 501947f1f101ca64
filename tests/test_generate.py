"""Tests for jaxtok.decode.generate: cached jitted AR generation against naive full forwards."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok import sampling
from jaxtok.decode import generate
from jaxtok.sampling import GREEDY, SamplingParams
from jaxtok.mesh import make_mesh
from jaxtok.models import Decoder, presets

gen_module = importlib.import_module("jaxtok.decode.generate")

V = 32
N = 6  # max_new_tokens of the shared shape


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


def naive_greedy(model, rows, n):
    """Greedy decoding by full forwards without a cache (the reference), one row at a time. Each sequence lives in
    a fixed-width buffer (right padding, which causal attention never sees) so the forward compiles once."""
    width = max(map(len, rows)) + n
    fwd = jax.jit(lambda toks, at: jnp.argmax(model(toks).logits[0, at]))
    out = []
    for row in rows:
        toks = np.zeros((1, width), np.int32)
        toks[0, :len(row)] = row
        for t in range(len(row), len(row) + n):
            toks[0, t] = int(fwd(jnp.asarray(toks), t - 1))
        out.append(toks[0, len(row):len(row) + n].tolist())
    return out


def full_log_probs(model, rows, generated, transforms):
    """Per row: log-probs of ``generated[i]`` after ``rows[i]`` from one full forward (no cache) under
    ``process_logits(**transforms[i])``; returns a list of (log_probs [n, V], token log-probs [n])."""
    n = len(generated[0])
    width = max(map(len, rows)) + n
    seqs = np.zeros((len(rows), width), np.int32)  # right padding: invisible to causal attention
    for i, (row, gen) in enumerate(zip(rows, generated)):
        seqs[i, :len(row) + n] = list(row) + list(gen)
    logits = jax.jit(lambda x: model(x).logits)(jnp.asarray(seqs))
    out = []
    for i, (row, gen) in enumerate(zip(rows, generated)):
        lp = jax.nn.log_softmax(sampling.process_logits(logits[i, len(row) - 1: len(row) - 1 + n], **transforms[i]))
        out.append((lp, np.asarray(sampling.token_log_probs(lp, jnp.asarray(gen)))))
    return out


def run(model, **kw):
    """generate() on ROWS left-padded to width 6 with N = 6 (most tests share this compiled shape); the
    temperature / top_k / top_p / min_p keywords make its SamplingParams."""
    prompt, valid = left_pad(ROWS, 6)
    params = SamplingParams(**{k: kw.pop(k) for k in ("temperature", "top_k", "top_p", "min_p") if k in kw})
    kw = {"max_new_tokens": N, "stop_tokens": (), "rng": jax.random.key(0), "sampling": params, **kw}
    return generate(model, kw.pop("prompt", prompt), kw.pop("prompt_valid", valid), **kw)



def test_greedy_left_padded_equals_naive_unpadded_full_forwards(model):
    """Rows 0 and 2 are left-padded; the reference decodes each prompt unpadded with full forwards."""
    out = run(model, temperature=0.0)
    assert out.tokens.shape == (3, N) and out.logprobs.shape == (3, N)
    gens = naive_greedy(model, ROWS, N)
    refs = full_log_probs(model, ROWS, gens, [{}] * 3)  # greedy rows report log-probs at temperature 1
    for i in range(3):
        np.testing.assert_array_equal(out.tokens[i], gens[i])
        np.testing.assert_allclose(out.logprobs[i], refs[i][1], atol=1e-4)
    assert np.all(out.valid) and not np.any(out.done)
    np.testing.assert_array_equal(out.lengths, [N, N, N])
    assert int(out.num_forwards) == N  # prefill + N-1 decode steps


def test_stop_tokens_end_rows_and_the_loop(model):
    free = run(model, temperature=0.0)
    row0 = [int(t) for t in free.tokens[0]]
    stop_at = next(i for i in range(1, N) if row0[i] not in row0[:i])  # first position of a new token in row 0
    stop = row0[stop_at]
    out = run(model, temperature=0.0, stop_tokens=(stop,), pad_id=1)
    for i in range(3):
        ref = [int(t) for t in free.tokens[i]]
        end = ref.index(stop) + 1 if stop in ref else N
        np.testing.assert_array_equal(out.tokens[i, :end], ref[:end])
        assert np.all(np.asarray(out.tokens[i, end:]) == 1)  # pad_id after the stop token
        np.testing.assert_array_equal(out.valid[i], np.arange(N) < end)
        assert np.all(np.asarray(out.logprobs[i, end:]) == 0)
        assert int(out.lengths[i]) == end and bool(out.done[i]) == (stop in ref)
    # when every row has stopped the loop ends: prefill + stop_at decode steps
    prompt, valid = left_pad([ROWS[0]] * 3, 6)
    same = run(model, temperature=0.0, stop_tokens=(stop,), pad_id=1, prompt=prompt, prompt_valid=valid)
    assert int(same.num_forwards) == stop_at + 1 and np.all(same.done)


def test_logprobs_entropy_topk_match_full_forward(model):
    """Per-row sampling parameters; row 1 samples at T=0.7 from the top 5, rows 0 and 2 from the plain softmax."""
    temperature, top_k = [1.0, 0.7, 1.0], [0, 5, 0]
    out = run(model, temperature=np.array(temperature), top_k=np.array(top_k), rng=jax.random.key(3),
              return_entropy=True, return_topk=4)
    assert out.entropy.shape == (3, N) and out.topk_probs.shape == (3, N, 4) and out.topk_ids.shape == (3, N, 4)
    gens = np.asarray(out.tokens).tolist()
    refs = full_log_probs(model, ROWS, gens, [dict(temperature=t, top_k=k) for t, k in zip(temperature, top_k)])
    for i, (lp, ref) in enumerate(refs):
        np.testing.assert_allclose(out.logprobs[i], ref, atol=1e-4)
        np.testing.assert_allclose(out.entropy[i], sampling.entropy_from_log_probs(lp), atol=1e-4)
        top_p, top_i = jax.lax.top_k(jnp.exp(lp), 4)
        np.testing.assert_allclose(out.topk_probs[i], top_p, atol=1e-5)
        np.testing.assert_array_equal(out.topk_ids[i], top_i)
    assert np.all(np.isfinite(np.asarray(out.logprobs)))  # the top-5 row never draws a removed token


def test_second_call_with_equal_shapes_does_not_retrace(model):
    run(model, temperature=0.5)
    before = gen_module.num_traces()
    out = run(model, temperature=0.8, rng=jax.random.key(1))  # new values, same shapes and switches
    assert gen_module.num_traces() == before
    assert out.tokens.shape == (3, N)
    run(model, temperature=0.8, max_new_tokens=1)  # a new shape compiles once more
    assert gen_module.num_traces() == before + 1
    run(model, temperature=0.0)  # all rows greedy is a switch (no Gumbel noise drawn), compiled once
    greedy = gen_module.num_traces()
    run(model, temperature=0.0, rng=jax.random.key(2))
    assert gen_module.num_traces() == greedy


def test_sharded_equals_unsharded_greedy(model):
    rows = [[3 + i, 4 + (i * 7) % 20, 9] [: 1 + i % 3] for i in range(8)]
    prompt, valid = left_pad(rows, 4)
    kw = dict(max_new_tokens=5, sampling=GREEDY, stop_tokens=(2,), rng=jax.random.key(0))
    ref = generate(model, prompt, valid, **kw)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)  # batch over data x fsdp, weights over fsdp / tensor
    out = generate(model, prompt, valid, mesh=mesh, **kw)
    assert out.tokens.sharding.spec[0] is not None  # the output stays batch-sharded
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
        generate(model, prompt, valid, max_new_tokens=2, sampling=SamplingParams(temperature=-1.0),
                 rng=jax.random.key(0))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, valid, max_new_tokens=2, sampling=SamplingParams(top_p=0.0), rng=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, valid, max_new_tokens=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="stop_tokens"):
        generate(model, prompt, valid, max_new_tokens=2, stop_tokens=(V,), rng=jax.random.key(0))
    with pytest.raises(ValueError, match="divisible"):
        generate(model, prompt, valid, max_new_tokens=2, rng=jax.random.key(0), mesh=make_mesh(data=8))


def test_prompt_plus_new_tokens_beyond_max_positions_is_named(model):
    """The audit's finding: ``generate`` ran past ``max_position_embeddings`` silently (speculative decoding and EAD
    already refused); the error names the prompt length, the new tokens and the model's limit."""
    prompt, valid = left_pad(ROWS, 6)
    limit = model.cfg.max_position_embeddings
    with pytest.raises(ValueError, match=rf"length 6 \+ max_new_tokens {limit - 5} = {limit + 1} positions exceed "
                                         rf"the model's max_position_embeddings={limit}"):
        generate(model, prompt, valid, max_new_tokens=limit - 5, rng=jax.random.key(0))


@pytest.mark.parametrize("filters", [{}, {"top_k": 5, "top_p": 0.9}])
def test_all_greedy_fast_path_equals_greedy_rows_of_the_general_sampler(model, filters):
    """An all-greedy batch skips the Gumbel draw (and, without filters, the [B, V] log-softmax); its tokens,
    log-probs and entropies equal those of the greedy rows of a mixed batch, which takes the general path."""
    fast = run(model, temperature=0.0, return_entropy=True, **filters)
    mixed = run(model, temperature=np.array([0.0, 0.0, 0.7], np.float32), return_entropy=True, **filters)
    lean = run(model, temperature=0.0, **filters)  # no entropy asked: the two-pass log-prob
    np.testing.assert_array_equal(fast.tokens[:2], mixed.tokens[:2])
    np.testing.assert_array_equal(lean.tokens, fast.tokens)
    np.testing.assert_allclose(fast.logprobs[:2], mixed.logprobs[:2], atol=1e-5)
    np.testing.assert_allclose(lean.logprobs, fast.logprobs, atol=1e-5)
    assert run(model, temperature=0.0, return_logprobs=False, **filters).logprobs is None
    np.testing.assert_array_equal(run(model, temperature=0.0, return_logprobs=False, **filters).tokens, fast.tokens)
    np.testing.assert_allclose(fast.entropy[:2], mixed.entropy[:2], atol=1e-6)


@pytest.mark.parametrize("v", [384, 640, 100, 64])
def test_two_level_argmax_and_logsumexp_equal_the_flat_ones(v):
    """The greedy path's blocked reductions pick the first max (ties, NaN rows, -inf rows) like ``jnp.argmax``."""
    x = np.random.RandomState(v).randint(-3, 4, (6, v)).astype(np.float32)  # many ties
    x[1, 5] = np.nan
    x[1, 200 % v] = np.nan
    x[2] = -np.inf
    x[3, v - 1] = 9.0
    np.testing.assert_array_equal(gen_module._argmax(jnp.asarray(x)), np.argmax(x, axis=-1))
    y = np.random.RandomState(1).randn(4, v).astype(np.float32) * 5
    top = jnp.max(y, axis=-1, keepdims=True)
    np.testing.assert_allclose(gen_module._logsumexp_from(jnp.asarray(y), top),
                               jax.nn.logsumexp(y, axis=-1) - top[:, 0], rtol=1e-6, atol=1e-6)


def test_batch_one_matvec_head_of_a_tied_model_equals_the_batched_head():
    """At batch 1 a tied-embedding Decoder's logits are computed as ``embed_vd · h`` in the loop; tokens and
    log-probs equal those of the same row inside a batch of 2 (the model's own head)."""
    tied = Decoder(presets.get("tiny_draft", vocab_size=V, tie_embeddings=True), rngs=nnx.Rngs(3))
    assert gen_module._tied_decoder_head(tied)
    prompt, valid = left_pad([ROWS[0], ROWS[0]], 6)
    kw = dict(max_new_tokens=N, stop_tokens=(), rng=jax.random.key(0), sampling=GREEDY)
    one = generate(tied, prompt[:1], valid[:1], **kw)
    two = generate(tied, prompt, valid, **kw)
    np.testing.assert_array_equal(one.tokens[0], two.tokens[0])
    np.testing.assert_allclose(one.logprobs[0], two.logprobs[0], atol=1e-5)
