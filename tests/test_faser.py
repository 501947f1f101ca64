"""FASER (decode_methods.md §A7): the per-request draft-length policy ``faser``, frontier verification with early
pruning (``verify_chunk``) and the continuous-batching slot engine (jaxtok.decode.serving). Tiny random models;
greedy rows must equal greedy AR token for token whatever the arrival order, slot or policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.decode import draft_policies as dp
from jaxtok.decode import generate
from jaxtok.decode.serving import CostClock, Request, SlotEngine, poisson_arrivals, serve
from jaxtok.decode.speculative import ModelDrafter, NoDrafter, speculative_generate
from jaxtok.decode.spec_cost import expected_tokens_per_round
from jaxtok.models import Decoder, ModelConfig
from jaxtok.registry import ConfigError
from jaxtok.sampling import GREEDY, SamplingParams

V, P, N, G = 8, 4, 8, 3
STOP = 2


def _cfg(d):
    return ModelConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=d // 2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def models():
    """A target and a draft = the target with noise on its weights (partial agreement: acceptance neither 0 nor 1)."""
    target = Decoder(_cfg(16), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(target)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(5)  # host-side noise: no eager device ops to compile
    noisy = [jnp.asarray(np.asarray(x) * (1 + 0.4 * rng.standard_normal(x.shape)), x.dtype)
             if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
    draft = nnx.merge(graphdef, jax.tree.unflatten(tree, noisy))
    return target, draft


ROWS = 6


@pytest.fixture(scope="module")
def data(models):
    """ROWS prompts, their greedy AR outputs and fixed-γ speculative_generate (shared by several tests)."""
    target, draft = models
    prompt, valid = _prompts(ROWS, seed=1)
    spec = speculative_generate(target, ModelDrafter.of(draft), prompt, valid, **SPEC_KW)
    return prompt, valid, _ar(target, prompt, valid), spec


SPEC_KW = dict(max_new_tokens=N, draft_len=G, sampling=GREEDY, stop_tokens=(STOP,), pad_id=0, rng=jax.random.key(0))


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, P + 1, n)
    valid = np.arange(P)[None, :] >= (P - lens)[:, None]
    prompt = np.where(valid, rng.integers(3, V, (n, P)), 0).astype(np.int32)
    return prompt, valid


def _ar(target, prompt, valid):
    out = generate(target, prompt, valid, max_new_tokens=N, sampling=GREEDY, stop_tokens=(STOP,), pad_id=0,
                   rng=jax.random.key(0))
    tok, ok = np.asarray(out.tokens), np.asarray(out.valid)
    return [tok[i][ok[i]] for i in range(len(tok))]


# ---------------------------------------------------------------------------------------------------------------
# the faser policy
# ---------------------------------------------------------------------------------------------------------------


def test_faser_gamma_limits_and_hand_value():
    args = dp.FaserArgs(draft_cost=(0.1,), verify_cost=(0.0,), round_overhead=(0.0,))
    g = jax.jit(dp.faser_gamma, static_argnums=(2, 3))(jnp.array([1.0, 0.0, 0.5]), jnp.int32(3), args, 4)
    # α = 1 -> γmax; α = 0 -> 0 (AR); α = 0.5: σ/cost = 1, 1.5/1.1, 1.75/1.2 = 1.458, 1.875/1.3, 1.9375/1.4 -> 2
    assert g.tolist() == [4, 0, 2]
    sigma = jax.jit(dp.expected_tokens_jnp, static_argnums=1)(jnp.array([0.3, 0.9, 1.0]), 5)
    for i, a in enumerate([0.3, 0.9, 1.0]):
        np.testing.assert_allclose(sigma[i], [expected_tokens_per_round(a, k) for k in range(6)], rtol=1e-6)
    # load-dependent verification cost: more live rows -> never a longer draft
    load_args = dp.FaserArgs(batch_sizes=(1, 16), draft_cost=(0.1,), verify_cost=(0.0, 0.6))
    fg = jax.jit(dp.faser_gamma, static_argnums=(2, 3))
    lo, hi = fg(jnp.full((1,), 0.8), jnp.int32(1), load_args, 8), fg(jnp.full((1,), 0.8), jnp.int32(16), load_args, 8)
    assert int(hi[0]) < int(lo[0])
    assert fg(jnp.full((1,), 0.8), jnp.int32(16), dp.FaserArgs(candidates=(0, 2)), 8).tolist() == [2]


def test_faser_acceptance_update_and_registry():
    pol = dp.build_policy("faser", {"decay": 0.5, "prior_acceptance": 0.6, "prior_weight": 2.0})
    st = pol.init(3, 4)
    np.testing.assert_allclose(dp.faser_alpha(st, pol.args), [0.6] * 3)
    # row 0: 4 drafted, 2 accepted -> 2 of 3 trials; row 1: all 4 accepted -> 4 of 4; row 2 drafted nothing
    st = pol.update(st, None, jnp.array([4, 4, 0]), jnp.array([2, 4, 0]), None, jnp.array([True, True, True]))
    np.testing.assert_allclose(st["succ"], [2, 4, 0])
    np.testing.assert_allclose(st["trials"], [3, 4, 0])
    np.testing.assert_allclose(dp.faser_alpha(st, pol.args), [(2 + 1.2) / 5, (4 + 1.2) / 6, 0.6], rtol=1e-6)
    st2 = pol.update(st, None, jnp.array([1, 1, 1]), jnp.array([0, 1, 1]), None, jnp.array([True, False, True]))
    np.testing.assert_allclose(st2["succ"], [1, 4, 1])  # decayed by 0.5 + observed; the frozen row unchanged
    np.testing.assert_allclose(st2["trials"], [2.5, 4, 1])
    with pytest.raises(ConfigError):
        dp.build_policy("faser", {"gamma": 3})
    with pytest.raises(ValueError, match="decay"):
        dp.FaserArgs(decay=1.5)


# ---------------------------------------------------------------------------------------------------------------
# frontier verification (early pruning)
# ---------------------------------------------------------------------------------------------------------------


def test_verify_chunk_exact_and_greedy_only(models, data):
    target, draft = models
    prompt, valid, ar, base = data
    kw = SPEC_KW
    chunked = speculative_generate(target, ModelDrafter.of(draft), prompt, valid, verify_chunk=2, **kw)
    np.testing.assert_array_equal(base.tokens, chunked.tokens)
    np.testing.assert_array_equal(base.accepted, chunked.accepted)
    assert 0 < np.sum(base.accepted) < np.sum(base.drafted)  # partial acceptance: pruning has something to do
    for i in range(ROWS):
        np.testing.assert_array_equal(np.asarray(chunked.tokens[i])[np.asarray(chunked.valid[i])], ar[i])
    # chunks of 2 over γ + 1 = 4 positions: 2 forwards per round unless the second is pruned away
    assert int(base.target_forwards) < int(chunked.target_forwards) <= 1 + 2 * int(np.max(chunked.rounds))
    with pytest.raises(ValueError, match="verify_chunk"):
        speculative_generate(target, ModelDrafter.of(draft), prompt, valid, verify_chunk=2,
                             **{**kw, "sampling": SamplingParams(temperature=1.0)})


# ---------------------------------------------------------------------------------------------------------------
# the slot engine
# ---------------------------------------------------------------------------------------------------------------


def _requests(prompt, valid, arrivals, limits=None):
    limits = [N] * len(prompt) if limits is None else limits
    return [Request(prompt[i], valid[i], float(arrivals[i]), int(limits[i])) for i in range(len(prompt))]


def test_engine_all_at_t0_equals_speculative_generate(models, data):
    target, draft = models
    prompt, valid, ar, ref = data
    eng = SlotEngine(target, ModelDrafter.of(draft), slots=ROWS, prompt_len=P, max_new_tokens=N, draft_len=G,
                     sampling=GREEDY, stop_tokens=(STOP,), pad_id=0)
    res = serve(eng, _requests(prompt, valid, [0.0] * ROWS), clock="steps")
    for i, rec in enumerate(res.records):
        np.testing.assert_array_equal(rec.tokens, np.asarray(ref.tokens[i])[np.asarray(ref.valid[i])])
        np.testing.assert_array_equal(rec.tokens, ar[i])
        assert rec.slot == i and rec.queueing == i  # admissions one after another (1 clock unit each)
    assert res.accepted == int(np.sum(ref.accepted)) and res.drafted == int(np.sum(ref.drafted))
    s = res.summary()
    assert s["tokens"] == int(np.sum(ref.lengths)) and s["latency_p95"] >= s["latency_p50"] > 0


@pytest.mark.parametrize("kind", ["faser_pruned", "ar"])
def test_engine_dynamic_arrivals_lossless(models, data, kind):
    """6 requests, Poisson arrivals, 3 slots (queueing), own length caps: each request's output is its standalone
    greedy AR output, whatever slot it landed in and whoever shared the batch."""
    target, draft = models
    prompt, valid, ar, _ = data
    limits = [N, 3, N, 5, 1, N]
    if kind == "ar":
        eng = SlotEngine(target, NoDrafter(vocab_size=V), slots=3, prompt_len=P, max_new_tokens=N, draft_len=1,
                         sampling=GREEDY, stop_tokens=(STOP,), pad_id=0)
    else:
        pol = dp.build_policy("faser", {"draft_cost": [0.1], "prior_acceptance": 0.7})
        eng = SlotEngine(target, ModelDrafter.of(draft), slots=3, prompt_len=P, max_new_tokens=N, draft_len=G,
                         policy=pol, sampling=GREEDY, stop_tokens=(STOP,), pad_id=0, verify_chunk=2)
    reqs = _requests(prompt, valid, poisson_arrivals(ROWS, 0.5, seed=1), limits)
    if kind == "ar":  # the cost-model clock: AR rounds cost 1 step each, admissions 2
        res = serve(eng, reqs, clock="model", cost=CostClock(verify_slope=0.1, draft=0.05, admit=2.0))
        assert res.busy == pytest.approx(2.0 * ROWS + res.rounds)
    else:
        res = serve(eng, reqs, clock="steps")
    for i, rec in enumerate(res.records):
        np.testing.assert_array_equal(rec.tokens, ar[i][:limits[i]])
        assert rec.admit >= rec.arrival and rec.finish >= rec.first_token > rec.admit
    assert len({r.slot for r in res.records}) == 3 and res.admits == ROWS
    if kind == "ar":
        assert res.drafted == 0 and res.draft_forwards == 0
