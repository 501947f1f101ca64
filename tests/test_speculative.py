"""Tests for jaxtok.decode.speculative and draft_policies (decode_methods.md §A1.5, §A2–§A6).

Most tests share one compiled shape per drafter/policy (B=ROWS rows, P=4, N=4, γ=3): greedy rows are compared token
for token with greedy AR ``generate``; sampled rows (same program, temperature traced) give the empirical joint
law of the first three tokens, compared with the target's exact autoregressive joint by a χ² test (α = 0.001).
"""

import importlib
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as sps

from jaxtok.decode import generate
from jaxtok.sampling import GREEDY, RowParams, SamplingParams
from jaxtok.decode import draft_policies as dp
from jaxtok.decode.speculative import (
    DeerDrafter, EADArgs, ModelDrafter, NgramDrafter, RoutedDrafter, ead_generate, ead_switch,
    ngram_lookup, num_traces, policy_mask, routing_confidence, speculative_generate,
)
from jaxtok.models import Decoder, ModelConfig
from jaxtok.registry import ConfigError

spec_module = importlib.import_module("jaxtok.decode.speculative")

V = 4
P, N, G = 4, 4, 3
ROWS = 2048
TEMP = 0.8
STOP = 2  # every shared-shape run stops rows at token 2 (so stop handling is checked in every program)


def _cfg(d, **kw):
    return ModelConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=d // 2, max_position_embeddings=32, **kw)


@pytest.fixture(scope="module")
def models():
    target = Decoder(_cfg(16), rngs=nnx.Rngs(0))
    draft = Decoder(_cfg(16), rngs=nnx.Rngs(1))  # same shapes as the target: programs are shared (fewer compiles)
    deer = Decoder(_cfg(16, mask_token_id=3), rngs=nnx.Rngs(2))  # same parameter shapes: no new eager init compiles
    return target, draft, deer


def _greedy_prompts():
    """ROWS random prompts, left-padded to P with 1..P tokens."""
    rng = np.random.default_rng(0)
    lens = rng.integers(1, P + 1, ROWS)
    valid = np.arange(P)[None, :] >= (P - lens)[:, None]
    prompt = np.where(valid, rng.integers(0, V, (ROWS, P)), 0).astype(np.int32)
    return prompt, valid


SAMPLE_PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def greedy_ref(models):
    prompt, valid = _greedy_prompts()
    out = generate(models[0], prompt, valid, max_new_tokens=N, sampling=GREEDY, stop_tokens=(STOP,),
                   rng=jax.random.key(0))
    return prompt, valid, out


@pytest.fixture(scope="module")
def target_joint(models):
    """Exact law of the first 3 outputs under the target at temperature TEMP with stop token STOP:
    ``[V+1, V+1, V+1]``, symbol V = no token (after the stop)."""
    target = models[0]
    ctx = np.array([SAMPLE_PROMPT + [a, b] for a in range(V) for b in range(V)], np.int32)  # [V², P+1]
    logits = jax.jit(lambda x: target(x).logits)(jnp.asarray(ctx))
    lp = np.asarray(jax.nn.softmax(logits.astype(jnp.float32) / TEMP, axis=-1), np.float64)
    p1 = lp[0, 2]  # after the prompt
    p2 = lp[::V, 3]  # [V(a), V] after prompt + a
    p3 = lp[:, 4].reshape(V, V, V)  # after prompt + a + b
    joint = np.zeros((V + 1,) * 3)
    for a in range(V):
        if a == STOP:
            joint[a, V, V] = p1[a]
            continue
        for b in range(V):
            if b == STOP:
                joint[a, b, V] = p1[a] * p2[a, b]
                continue
            joint[a, b, :V] = p1[a] * p2[a, b] * p3[a, b]
    return joint


def _run(models, drafter, policy, temperature, rng=0, prompt=None, valid=None, draft_len=G, **kw):
    if prompt is None:
        prompt = np.tile(np.array([[0] + SAMPLE_PROMPT], np.int32), (ROWS, 1))
        valid = prompt > -1
        valid[:, 0] = False
    return speculative_generate(models[0], drafter, prompt, valid, max_new_tokens=N, draft_len=draft_len,
                                policy=policy, sampling=SamplingParams(temperature=temperature), stop_tokens=(STOP,),
                                rng=jax.random.key(rng), **kw)


def _chi2_pvalue(samples: np.ndarray, joint: np.ndarray) -> float:
    """χ² goodness of fit of ``samples [n, 3]`` to ``joint [V, V, V]``; cells with expected count < 5 pooled."""
    n = samples.shape[0]
    counts = np.zeros(joint.size)
    np.add.at(counts, np.ravel_multi_index(samples.T, joint.shape), 1)
    exp = joint.ravel() * n
    small = exp < 5
    obs = np.append(counts[~small], counts[small].sum())
    ex = np.append(exp[~small], exp[small].sum())
    keep = ex > 0
    return float(sps.chisquare(obs[keep], ex[keep] * obs[keep].sum() / ex[keep].sum()).pvalue)


def _drafters(models):
    target, draft, deer = models
    return {
        "model": ModelDrafter.of(draft),
        "ngram": NgramDrafter(vocab_size=V, max_ngram=2),
        "deer": DeerDrafter.of(deer),
        "taps": RoutedDrafter((DeerDrafter.of(deer), NgramDrafter(vocab_size=V, max_ngram=2))),
    }


POLICIES = {
    "fixed": lambda h: dp.build_policy("fixed"),
    "heuristic": lambda h: dp.build_policy("heuristic", {"initial": 1}),
    "confidence": lambda h: dp.build_policy("confidence", {"threshold": 0.6}),
    "specdecpp": lambda h: dp.build_policy("specdecpp", {"threshold": 0.5, "min_len": 1}, hidden_size=h),
    "speckv": lambda h: dp.build_policy("speckv", {"candidates": [1, 2, 3], "initial": 2}),
}

# (drafter, policy, draft_len, poison): poison=True NaN-fills every stale KV slot after each round (§A1.5 prop 6);
# every drafter and every policy appears at least once (each case is one compiled program)
CASES = [("model", "fixed", G, True), ("model", "specdecpp", G, True), ("model", "speckv", G, False),
         ("ngram", "fixed", 1, False), ("deer", "confidence", G, False), ("taps", "heuristic", G, True)]


@pytest.fixture(scope="module")
def greedy_runs(models, greedy_ref):
    """The greedy run of every case. The six programs are compiled two at a time (XLA compiles release the GIL), so
    their compile times overlap; each test then reuses its program for the sampled run."""
    prompt, valid, _ = greedy_ref

    def one(case):
        drafter_name, policy_name, draft_len, poison = case
        drafter = _drafters(models)[drafter_name]
        policy = POLICIES[policy_name](models[1].cfg.hidden_size)
        return jax.block_until_ready(_run(models, drafter, policy, 0.0, prompt=prompt, valid=valid,
                                          draft_len=draft_len, poison_stale_cache=poison))

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CASES, pool.map(one, CASES)))


@pytest.mark.slow
@pytest.mark.parametrize("drafter_name,policy_name,draft_len,poison", CASES)
def test_greedy_equals_ar_and_sampling_is_lossless(models, greedy_ref, greedy_runs, target_joint, drafter_name,
                                                   policy_name, draft_len, poison):
    """§A1.5 props 1, 4 and 6: one program per case; greedy rows reproduce greedy AR (tokens, valid, done) on
    left-padded prompts with per-row acceptance counts and stop tokens; sampled rows follow the target's law of
    the first three outputs (χ², α = 0.001)."""
    drafter = _drafters(models)[drafter_name]
    policy = POLICIES[policy_name](models[1].cfg.hidden_size)
    _, _, ref = greedy_ref
    g = greedy_runs[(drafter_name, policy_name, draft_len, poison)]
    for field in ("tokens", "valid", "done", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(g, field)), np.asarray(getattr(ref, field)), err_msg=field)
    acc = np.asarray(g.accepted) / np.maximum(np.asarray(g.rounds), 1)
    assert acc.min() < acc.max()  # rows with different acceptance counts share the batch
    before = num_traces()
    s = _run(models, drafter, policy, TEMP, rng=1, draft_len=draft_len, poison_stale_cache=poison)
    assert num_traces() <= before + 1  # an all-greedy batch is its own switch: the sampled program compiles once
    toks = np.where(np.asarray(s.valid), np.asarray(s.tokens), V)[:, :3]
    assert _chi2_pvalue(toks, target_joint) > 1e-3
    if drafter_name == "taps":
        assert np.all(np.asarray(s.route_counts).sum(0) > 0)  # both drafters win some rounds
        np.testing.assert_array_equal(np.asarray(s.route_counts).sum(1), s.rounds)  # one route per row-round
    if drafter_name != "ngram":
        assert np.sum(np.asarray(s.accepted)) > 0 and np.sum(np.asarray(s.accepted)) < np.sum(np.asarray(s.drafted))


def test_taps_with_two_ar_drafters_is_lossless_at_positive_temperature(models, target_joint):
    """TAPS (§A5) routing between two AR model drafters (different seeds), whose later draft logits depend on the
    tokens they sampled: the emitted tokens must still follow the target's law (χ² on the joint of the first three
    outputs, 4096 rows in one call). Routing on the mean confidence of the whole draft (the old rule) selected drafts
    by their own samples and failed this test (p ≈ 1e-15); routing on the first step's confidence passes."""
    drafters = tuple(ModelDrafter.of(Decoder(_cfg(16), rngs=nnx.Rngs(seed))) for seed in (5, 6))
    prompt = np.tile(np.array([[0] + SAMPLE_PROMPT], np.int32), (2 * ROWS, 1))
    valid = prompt > -1
    valid[:, 0] = False
    s = _run(models, RoutedDrafter(drafters), dp.build_policy("fixed"), TEMP, rng=1, prompt=prompt, valid=valid)
    routes = np.asarray(s.route_counts).sum(0)
    assert np.all(routes > 0.2 * routes.sum())  # both drafters win a good share of rounds
    toks = np.where(np.asarray(s.valid), np.asarray(s.tokens), V)[:, :3]
    assert _chi2_pvalue(toks, target_joint) > 1e-3


def test_identical_drafter_accepts_everything(models):
    """§A1.5 prop 3: q == p (the target drafts for itself) ⇒ every draft is accepted: one round of γ+1 = 4 tokens
    after the prefill's token (N = 4 keeps the first 3)."""
    target = models[0]
    out = _run(models, ModelDrafter.of(target), dp.build_policy("fixed"), TEMP, rng=3, poison_stale_cache=True)
    stopped = np.asarray(out.done)
    assert np.all(np.asarray(out.accepted) == np.asarray(out.drafted))
    np.testing.assert_array_equal(np.asarray(out.rounds)[~stopped], 1)
    np.testing.assert_array_equal(np.asarray(out.accepted)[~stopped], G)
    np.testing.assert_allclose(out.acceptance_rate_by_position, 1.0)
    assert out.mean_accepted_length > 2.0
    # prefill + one verification; drafter: prefill + re-feed chunk + γ-1 single-token steps
    assert int(out.target_forwards) == 2 and int(out.draft_forwards) == 1 + G


def test_model_drafter_two_token_refeed_keeps_its_cache_exact_over_rounds(models):
    """The model drafter re-feeds only the newest 2 committed tokens per round (``refeed_width``), not the window
    γmax + 1. With the target drafting for itself every draft is accepted, so each round needs both re-fed tokens
    (the never-fed last draft and the bonus token): over 3 rounds, with stale drafter slots NaN-poisoned, all
    drafts are still accepted and the tokens equal greedy AR (the next test checks the drafter's cache directly)."""
    target = models[0]
    n_new, rows = 1 + 3 * (G + 1), 8
    prompt, valid = _greedy_prompts()
    prompt, valid = prompt[:rows], valid[:rows]

    out = speculative_generate(target, ModelDrafter.of(target), prompt, valid, max_new_tokens=n_new, draft_len=G,
                               sampling=GREEDY, stop_tokens=(), rng=jax.random.key(0), poison_stale_cache=True)
    ar = generate(target, prompt, valid, max_new_tokens=n_new, sampling=GREEDY, stop_tokens=(),
                  rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ar.tokens))
    np.testing.assert_array_equal(np.asarray(out.rounds), 3)
    np.testing.assert_array_equal(np.asarray(out.accepted), 3 * G)
    # drafter: prefill + per round one 2-token re-feed and γ-1 single-token steps
    assert int(out.draft_forwards) == 1 + 3 * G


@pytest.mark.parametrize("accepted", [0, 1, G])
def test_model_drafter_cache_after_two_token_refeed_equals_a_fresh_prefill(models, accepted):
    """The drafter's KV cache is exact after a round that re-feeds only 2 tokens: draft a round, commit
    ``accepted`` of its drafts and one other token (the target's), draft the next round; the cache's entries for
    every committed token equal a fresh prefill of the committed sequence (a 1-token re-feed would miss the never-fed
    last draft when all are accepted)."""
    b, g = 2, G
    w = g + 1
    s = w + P + 2 * (g + 1) + 1
    drafter = ModelDrafter.of(models[1])
    prompt, valid = _greedy_prompts()
    seq = np.zeros((b, s), np.int32)
    seq_valid = np.zeros((b, s), bool)
    seq[:, w:w + P], seq_valid[:, w:w + P] = prompt[:b], valid[:b]
    seq[:, w + P], seq_valid[:, w + P] = 1, True  # the target's first token
    n = w + P + 1
    params = RowParams(jnp.zeros((b,), jnp.float32))

    def ctx(n):
        return spec_module.DraftContext(seq=jnp.asarray(seq), seq_valid=jnp.asarray(seq_valid),
                                        n=jnp.full((b,), n, jnp.int32), live=jnp.ones((b,), bool),
                                        gamma=jnp.full((b,), g, jnp.int32), params=params, key=jax.random.key(0),
                                        gamma_max=g, window=w, pad_id=0, refeed=spec_module.refeed_width(w))

    cache = drafter.init(jnp.asarray(seq), jnp.asarray(seq_valid), n - 1, s)
    d = drafter.draft(cache, ctx(n), dp.build_policy("fixed"))
    assert np.all(np.asarray(d.valid))
    tokens = np.asarray(d.tokens)
    seq[:, n:n + accepted] = tokens[:, :accepted]
    seq[:, n + accepted] = (tokens[:, accepted] + 1) % V if accepted < g else 0  # the target's token
    seq_valid[:, n:n + accepted + 1] = True
    n += accepted + 1
    d2 = drafter.draft(d.state, ctx(n), dp.build_policy("fixed"))
    fresh = drafter.init(jnp.asarray(seq), jnp.asarray(seq_valid), n, s)
    ok = seq_valid[:, :n]  # [B, n] committed (non-pad) slots
    np.testing.assert_array_equal(np.asarray(d2.state.positions)[:, :n][ok], np.asarray(fresh.positions)[:, :n][ok])
    for name in ("k", "v"):
        got = np.asarray(getattr(d2.state, name))[:, :, :n]  # [L, B, n, Hkv, Dh]
        want = np.asarray(getattr(fresh, name))[:, :, :n]
        np.testing.assert_allclose(got[:, ok], want[:, ok], atol=1e-5, rtol=1e-5)


def test_batch_gamma_at_zero_runs_ar_inside_the_loop(models, greedy_ref, target_joint):
    """``batch_gamma`` with γ* = 0 (acceptance 0: speculation never pays) inside the loop: no row drafts, so every
    round takes the width-0 verification (one target position, an AR step; ``verify_widths``). Greedy rows equal
    greedy AR with one target forward per emitted token; sampled rows follow the target's law (χ², α = 0.001)."""
    drafter, policy = ModelDrafter.of(models[1]), dp.BatchGamma(dp.BatchGammaArgs(acceptance=(0.0,)))
    assert policy.gamma_for(ROWS) == 0
    assert spec_module.verify_widths(policy, drafter, G, ROWS) == (0,)  # γ* is fixed before decoding: one width
    assert spec_module.verify_widths(dp.build_policy("fixed"), drafter, G, ROWS) == (G,)
    assert spec_module.verify_widths(dp.build_policy("heuristic"), drafter, G, ROWS) == (0, G)
    prompt, valid, ref = greedy_ref
    out = _run(models, drafter, policy, 0.0, prompt=prompt, valid=valid, poison_stale_cache=True)
    for field in ("tokens", "valid", "done", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(ref, field)), err_msg=field)
    assert int(np.sum(np.asarray(out.drafted))) == 0
    assert int(out.target_forwards) == N  # prefill + N - 1 one-token rounds
    s = _run(models, drafter, policy, TEMP, rng=1, poison_stale_cache=True)
    assert int(np.sum(np.asarray(s.drafted))) == 0
    toks = np.where(np.asarray(s.valid), np.asarray(s.tokens), V)[:, :3]
    assert _chi2_pvalue(toks, target_joint) > 1e-3


def test_batch_gamma_below_draft_len_verifies_one_width(models, greedy_ref, target_joint):
    """``batch_gamma`` with 0 < γ* < ``draft_len``: the loop verifies the single static width γ* every round (no
    ``lax.switch`` among widths, the 4-8 % it cost at batch 1 and 64 in docs/results/spec_membound_x4_ft.md); rows
    draft at most γ*, greedy rows equal greedy AR, sampled rows follow the target's law (χ², α = 0.001)."""
    drafter = ModelDrafter.of(models[1])
    policy = dp.BatchGamma(dp.BatchGammaArgs(acceptance=(0.9,), draft_cost=(0.0,), candidates=(0, G - 1)))
    assert policy.gamma_for(ROWS) == G - 1
    assert spec_module.verify_widths(policy, drafter, G, ROWS) == (G - 1,)
    prompt, valid, ref = greedy_ref
    out = _run(models, drafter, policy, 0.0, prompt=prompt, valid=valid, poison_stale_cache=True)
    for field in ("tokens", "valid", "done", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(ref, field)), err_msg=field)
    assert int(np.max(np.asarray(out.drafted_by_position)[:, G - 1:], initial=0)) == 0  # no draft past γ*
    s = _run(models, drafter, policy, TEMP, rng=2, poison_stale_cache=True)
    toks = np.where(np.asarray(s.valid), np.asarray(s.tokens), V)[:, :3]
    assert _chi2_pvalue(toks, target_joint) > 1e-3


def naive_greedy(model, prompt, valid, prefix, n):
    """Greedy continuation of ``prompt`` (+ ``prefix [B, k]``) by ``n`` full forwards without a cache."""
    b = prompt.shape[0]
    prefix = np.zeros((b, 0), np.int32) if len(prefix) == 0 else np.asarray(prefix)
    toks = np.concatenate([prompt, prefix, np.zeros((b, n), np.int32)], 1)
    ok = np.concatenate([valid, np.ones((b, prefix.shape[1] + n), bool)], 1)
    start = prompt.shape[1] + prefix.shape[1]
    fwd = jax.jit(lambda t, v: jnp.argmax(model(t, valid=v).logits, -1))
    for i in range(n):
        toks[:, start + i] = np.asarray(fwd(toks, ok))[:, start + i - 1]
    return toks[:, start:]


def test_ead_switches_after_min_dwell_and_reports_large_share(models):
    """EAD with τ = -1 starting on the small model: the first ``min_dwell`` tokens come from the small model's
    greedy continuation, then the large model takes over after a chunked catch-up (chunk=1) and continues greedily."""
    target, draft, _ = models
    prompt, valid = _greedy_prompts()
    n = N
    out = ead_generate(draft, target, prompt, valid, max_new_tokens=n, sampling=GREEDY, stop_tokens=(),
                       rng=jax.random.key(0), args=EADArgs(threshold=-1.0, min_dwell=2, chunk=1))
    small = np.asarray(generate(draft, prompt, valid, max_new_tokens=N, sampling=GREEDY, stop_tokens=(STOP,),
                                rng=jax.random.key(0)).tokens)[:, :2]  # the greedy_ref program
    keep = ~np.any(small == STOP, axis=1)  # (that program stops at STOP; EAD here does not)
    toks = np.asarray(out.tokens)[keep]
    prompt, valid, small = prompt[keep][:64], valid[keep][:64], small[keep][:64]
    toks = toks[:64]
    np.testing.assert_array_equal(toks[:, :2], small)
    np.testing.assert_array_equal(toks[:, 2:], naive_greedy(target, prompt, valid, small, n - 2))
    assert out.large_share == pytest.approx((n - 2) / n)
    np.testing.assert_array_equal(np.asarray(out.from_large)[0], [False, False, True, True])


# ----------------------------------------------------------------------------------------------------------------
# Hand-made inputs: the policies' rules and the drafters' pieces
# ----------------------------------------------------------------------------------------------------------------


def test_heuristic_rule():
    args = dp.HeuristicArgs(initial=4, increase=2, decrease=1, minimum=1)
    gamma = jnp.array([4, 4, 1, 7, 3])
    accepted = jnp.array([4, 2, 0, 7, 3])
    live = jnp.array([True, True, True, True, False])
    np.testing.assert_array_equal(dp.heuristic_update(gamma, accepted, args, 8, live), [6, 3, 1, 8, 3])


def test_confidence_rule():
    args = dp.ConfidenceArgs(threshold=0.4, min_len=2)
    conf = jnp.array([0.3, 0.5, 0.4])
    np.testing.assert_array_equal(dp.confidence_continue(conf, 0, args), [True, True, True])  # j+1 < min_len
    np.testing.assert_array_equal(dp.confidence_continue(conf, 1, args), [False, True, True])
    logits = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]))
    np.testing.assert_allclose(dp.top1_prob(logits), [0.7, 0.3], rtol=1e-6)


@pytest.mark.slow
def test_confidence_policy_stops_on_the_sampled_tokens_probability(models):
    """HF's confidence stop reads q(d_j), the probability of the SAMPLED draft token, not the drafter's top-1
    probability: a drafter whose top-1 is 0.9 but which sampled a 0.05 token stops there (the old top-1 rule drafted
    on). End to end in the model drafter's loop, every round's draft count is replayed from q(d) of its tokens."""
    policy = dp.build_policy("confidence", {"threshold": 0.5})
    carry = policy.round_init(2)
    logits = jnp.log(jnp.array([[0.9, 0.05, 0.03, 0.02], [0.9, 0.05, 0.03, 0.02]]))
    cont, _ = policy.after(carry, 0, logits, None, token_prob=jnp.array([0.9, 0.05]))  # row 1 sampled token 1
    np.testing.assert_array_equal(cont, [True, False])  # the old top-1 rule continued both rows
    with pytest.raises(ValueError, match="token_prob"):
        policy.after(carry, 0, logits, None)
    # end to end in the model drafter's loop: the drafter is the target (every draft accepted, so the stop rule alone
    # sets each round's length); replay the rounds on the emitted tokens with q(d) from a full forward
    target = models[0]
    rows, n = 256, 8
    prompt = np.tile(np.array([[0] + SAMPLE_PROMPT], np.int32), (rows, 1))
    out = speculative_generate(target, ModelDrafter.of(target), prompt, prompt > 0, max_new_tokens=n, draft_len=G,
                               policy=policy, sampling=SamplingParams(temperature=1.0), stop_tokens=(),
                               rng=jax.random.key(5))
    toks = np.asarray(out.tokens)
    assert np.all(np.asarray(out.accepted) == np.asarray(out.drafted))
    seq = np.concatenate([prompt, toks], 1)
    probs = np.asarray(jax.nn.softmax(target(jnp.asarray(seq), valid=jnp.asarray(seq > -1).at[:, 0].set(False))
                                      .logits, -1))
    qd = np.take_along_axis(probs[:, 4:4 + n - 1], toks[:, 1:, None], -1)[..., 0]  # q(token i), i = 1..n-1
    checked = 0
    for r in range(rows):
        i, drafted, known = 1, 0, True
        while i < n:  # a round drafting from token i emits k drafts + 1 token
            low = np.nonzero(qd[r, i - 1:min(i - 1 + G, n - 1)] < 0.5)[0]
            if low.size:
                k = int(low[0]) + 1
            elif i - 1 + G <= n - 1:
                k = G
            else:
                known = False  # the last round's drafts run past the emitted tokens
                break
            drafted, i = drafted + k, i + k + 1
        if known:
            assert int(out.drafted[r]) == drafted, r
            checked += 1
    assert checked > rows // 4


def test_specdecpp_rule():
    """cum = Π a; stop iff 1 - cum > h, never before min_len, always at max_len."""
    args = dp.SpecDecPPArgs(threshold=0.3, min_len=2, max_len=4)
    cum = jnp.ones(3)
    cont, cum = dp.specdecpp_continue(cum, jnp.array([1.0, 1.0, 1.0]), 0, args)  # s=1 < min_len
    assert cont.all()
    cont, cum = dp.specdecpp_continue(cum, jnp.array([0.9, 0.6, 0.75]), 1, args)
    np.testing.assert_array_equal(cont, [True, False, True])  # 1-cum = 0.1, 0.4, 0.25
    cont, cum = dp.specdecpp_continue(cum, jnp.array([0.9, 1.0, 0.9]), 2, args)
    np.testing.assert_array_equal(cont, [True, False, False])  # 0.19, 0.4, 0.325
    np.testing.assert_allclose(cum, [0.81, 0.6, 0.675], rtol=1e-6)
    cont, _ = dp.specdecpp_continue(jnp.ones(3), jnp.ones(3), 3, args)  # s = max_len
    assert not cont.any()


def test_specdecpp_head_drives_the_stop():
    """A head whose output bias says P(accept)=0.5 everywhere: with h=0.3 drafting stops after s=2 (min_len 1)."""
    head = dp.specdecpp_head(16, depth=1)  # the width of the specdecpp case's head (eager init ops are cached)
    head.out.kernel[...] = jnp.zeros_like(head.out.kernel[...])
    policy = dp.make_specdecpp(dp.SpecDecPPArgs(threshold=0.3, min_len=1), head=head)

    @jax.jit  # one compile instead of one per eager op
    def two_steps(policy, h):
        carry = policy.round_init(2)
        c0, carry = policy.after(carry, 0, jnp.zeros((2, V)), h)
        c1, carry = policy.after(carry, 1, jnp.zeros((2, V)), h)
        return c0, c1, carry

    c0, c1, carry = two_steps(policy, jnp.ones((2, 16)))
    assert c0.all() and not c1.any()
    np.testing.assert_allclose(carry, 0.5)


def test_speckv_features_and_choice():
    st = dp.DraftStats(entropy_bits=jnp.array([[1.0, 3.0, 9.0], [0.0, 0.0, 0.0]]),
                       confidence=jnp.array([[0.8, 0.4, 0.0], [0.5, 0.5, 0.5]]),
                       valid=jnp.array([[True, True, False], [False, False, False]]))
    # argmax_γ a(γ)·γ + 1: 0.9·2=1.8, 0.6·4=2.4, 0.3·6=1.8, 0.1·8=0.8 -> γ=4; all zero -> first (ties: smaller)
    pred = jnp.array([[0.9, 0.6, 0.3, 0.1], [0.0, 0.0, 0.0, 0.0]])
    policy = dp.build_policy("speckv")

    @jax.jit  # one compile instead of one per eager op
    def pieces(st, pred, policy):
        return (dp.speckv_features(st), dp.speckv_choose(pred, (2, 4, 6, 8)),
                dp.speckv_inputs(jnp.ones((1, 4)), (2, 4), comp_enc=1), policy.round_gamma(policy.init(2, 8), 8, 2))

    feats, chosen, x, first = pieces(st, pred, policy)
    np.testing.assert_allclose(feats, [[2.0, 0.6, 3.0, 0.4], [0.0, 0.0, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(chosen, [4, 2])
    np.testing.assert_allclose(x[0], [[1, 1, 1, 1, 1, 2], [1, 1, 1, 1, 1, 4]])
    np.testing.assert_array_equal(first, [4, 4])  # first round: initial


def test_ead_rule():
    args = EADArgs(window=5, threshold=2.0, min_dwell=3)
    mode = jnp.array([False, False, True, True])
    dwell = jnp.array([3, 2, 5, 4])
    mean_h = jnp.array([2.5, 2.5, 1.0, 3.0])
    new_mode, new_dwell = ead_switch(mode, dwell, mean_h, args)
    np.testing.assert_array_equal(new_mode, [True, False, False, True])
    np.testing.assert_array_equal(new_dwell, [0, 2, 0, 4])


def test_ngram_lookup_hand_case():
    seq = jnp.array([[5, 1, 2, 3, 1, 2, 4, 1, 2, 0, 0],
                     [0, 0, 6, 7, 8, 9, 0, 0, 0, 0, 0]], jnp.int32)
    valid = jnp.array([[True] * 9 + [False] * 2, [False, False] + [True] * 4 + [False] * 5])
    n = jnp.array([9, 6])
    lookup = jax.jit(ngram_lookup, static_argnums=(3, 4, 5))  # one compile for both calls
    toks, ok = lookup(seq, valid, n, 3, 2, 1)
    # row 0: last bigram (1, 2); latest earlier occurrence at 4 -> drafts 4, 1, 2
    np.testing.assert_array_equal(toks[0], [4, 1, 2])
    np.testing.assert_array_equal(ok[0], [True, True, True])
    # row 1: token 9 never occurred before -> no drafts
    assert not ok[1].any()
    toks, ok = lookup(seq, valid, jnp.array([8, 6]), 3, 2, 1)
    # row 0 ends "4 1": bigram unseen, unigram 1 last seen at 4 -> drafts 2, 4, then 1 at index 7 (< n) ok
    np.testing.assert_array_equal(toks[0], [2, 4, 1])
    np.testing.assert_array_equal(ok[0], [True, True, True])


def test_policy_mask_and_routing_confidence():
    logits = jnp.log(jnp.array([[[0.9, 0.1, 0, 0], [0.3, 0.3, 0.2, 0.2], [0.9, 0.1, 0, 0]]]) + 1e-9)
    conf = dp.build_policy("confidence", {"threshold": 0.5})
    valid = jnp.array([[True, True, False], [False, False, False]])

    @jax.jit  # one compile instead of one per eager op
    def pieces(logits, valid):
        tprob = jnp.take_along_axis(jax.nn.softmax(logits), jnp.zeros((1, 3, 1), jnp.int32), -1)[..., 0]  # d = 0
        return (policy_mask(conf, logits, jnp.array([3]), token_prob=tprob),
                policy_mask(dp.build_policy("fixed"), logits, jnp.array([2])),
                routing_confidence(jnp.concatenate([logits, logits]), valid))

    by_conf, by_fixed, route = pieces(logits, valid)
    np.testing.assert_array_equal(by_conf, [[True, True, False]])  # q(d) = 0.9, 0.3 < 0.5: stop after d_1
    np.testing.assert_array_equal(by_fixed, [[True, True, False]])
    np.testing.assert_allclose(route, [0.9, -1.0], rtol=1e-5)  # the first step's top-1, not the mean over drafts


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(models):
    target, draft, _ = models
    prompt = np.array([[1, 2, 3]], np.int32)
    valid = np.ones_like(prompt, bool)
    kw = dict(max_new_tokens=4, draft_len=2, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        speculative_generate(target, draft, np.array([[1, 9, 3]]), valid, **kw)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        speculative_generate(target, draft, np.ones((1, 30), np.int32), np.ones((1, 30), bool), **kw)
    with pytest.raises(ValueError, match="draft_len=0"):
        speculative_generate(target, draft, prompt, valid, max_new_tokens=4, draft_len=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="vocab_size"):
        # an abstract model: the vocabulary check runs before any compute
        other = nnx.eval_shape(lambda: Decoder(ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                                           num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4),
                                               rngs=nnx.Rngs(0)))
        speculative_generate(target, other, prompt, valid, **kw)
    with pytest.raises(ValueError, match="hidden states"):
        speculative_generate(target, NgramDrafter(vocab_size=V), prompt, valid,
                             policy=dp.build_policy("specdecpp", hidden_size=8), **kw)
    with pytest.raises(ValueError, match="mask_token_id"):
        DeerDrafter.of(draft)
    with pytest.raises(ConfigError, match="decode.policy='nope'"):
        dp.build_policy("nope")
    with pytest.raises(ConfigError, match="unknown key"):
        dp.build_policy("heuristic", {"gama": 3})
    with pytest.raises(ConfigError, match="draft_len=2"):
        speculative_generate(target, draft, prompt, valid, policy=dp.build_policy("speckv"), **kw)
    with pytest.raises(ValueError, match="start="):
        EADArgs(start="medium")


def test_all_greedy_switch_equals_greedy_rows_of_a_mixed_batch_and_does_not_retrace(models, greedy_ref):
    """An all-greedy batch traces argmax drafts and greedy-only verification (no Gumbel draws, no softmaxes); its
    tokens equal greedy AR and the greedy rows of a mixed batch (general program); new rng/temperature values
    reuse each program."""
    prompt, valid, ref = greedy_ref
    drafter = ModelDrafter.of(models[1])
    kw = dict(prompt=prompt[:64], valid=valid[:64], policy=dp.Fixed())
    fast = _run(models, drafter, temperature=0.0, **kw)
    before = num_traces()
    again = _run(models, drafter, temperature=0.0, rng=3, **kw)
    assert num_traces() == before
    temps = np.zeros(64, np.float32)
    temps[::2] = TEMP
    mixed = _run(models, drafter, temperature=temps, **kw)
    after = num_traces()
    _run(models, drafter, temperature=temps * 0.5, rng=4, **kw)
    assert num_traces() == after
    np.testing.assert_array_equal(np.asarray(fast.tokens), np.asarray(ref.tokens)[:64])
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(fast.tokens))
    np.testing.assert_array_equal(np.asarray(mixed.tokens)[1::2], np.asarray(fast.tokens)[1::2])
