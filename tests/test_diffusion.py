"""Diffusion sampler and commit policies: hand-computed schedules and commit sets, hand-traced decodes with a
scripted model (fixed logits per generated position), limiting cases tying policies together (threshold 1.0 ==
LLaDA top-1, unreachable Prophet gap == its base, EOSER at γ=1 == LLaDA, silent Learn2PD filter == LLaDA), per-policy
invariants (only masked positions, once each, within the cap, blocks in order), Rainbow-pad terminators, batch
invariance, and the exact block KV cache against the full forward of a block-causal model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.decode import commit_policies as cp
from jaxtok.decode.diffusion import diffusion_generate, trajectory_state
from jaxtok.models import Decoder, DecoderOutput, presets
from jaxtok.models.heads import FilterHead, TraceController
from jaxtok.registry import COMMIT_POLICIES, ConfigError

V = 61
MASK = 3


class Scripted(nnx.Module):
    """A stand-in diffusion LM whose logits at generated index i are ``table[i]`` whatever the input."""

    def __init__(self, table, prompt_len):
        self.cfg = presets.get("tiny_diffusion", vocab_size=V)
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))  # [N, V]
        self.prompt_len = prompt_len

    def __call__(self, tokens, *, logits_at=None, **kw):
        hidden = jnp.zeros(tokens.shape + (16,)) + tokens[..., None] / V  # [B, L, 16] for TraceLock's features
        return DecoderOutput(logits=self.table[...][logits_at - self.prompt_len], hidden=hidden, cache=None)


def script(tokens, confs):
    """Logits making ``tokens[i]`` the argmax at index i with softmax probability ``confs[i]`` (rest uniform)."""
    table = np.zeros((len(tokens), V), np.float32)
    for i, (t, c) in enumerate(zip(tokens, confs)):
        # p(t) = e^a / (e^a + V - 1) = c  ->  a = log(c (V - 1) / (1 - c))
        table[i, t] = np.log(c * (V - 1) / (1 - c))
    return table


PROMPT = np.array([[0, 1, 11], [1, 12, 13]])
PVALID = PROMPT != 0
PVALID[1, 0] = True


def run(model, policy, gen_len, **kw):
    kw.setdefault("stop_tokens", (2,))
    return diffusion_generate(model, PROMPT, PVALID, gen_len=gen_len, policy=policy, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Pure rules, by hand
# ----------------------------------------------------------------------------------------------------------------


def test_num_transfer_tokens_remainder_goes_first():
    ks = [cp.num_transfer_tokens(jnp.array([10, 3]), 4, jnp.array([s, s])) for s in range(4)]
    np.testing.assert_array_equal(np.stack(ks, 1), [[3, 3, 2, 2], [1, 1, 1, 0]])


def test_ass_schedule_by_hand_and_sums_to_length():
    k256 = [int(cp.ass_schedule(jnp.array([256]), jnp.array([i]))[0][0]) for i in range(8)]
    assert k256 == [1, 2, 4, 8, 16, 32, 64, 129]
    for n in range(1, 70):
        k, s = cp.ass_schedule(jnp.array([n]), jnp.array([0]))
        total = sum(int(cp.ass_schedule(jnp.array([n]), jnp.array([i]))[0][0]) for i in range(int(s[0])))
        assert total == n


def test_threshold_commit_by_hand():
    conf = jnp.array([[0.95, 0.5, 0.92, 0.3]])
    elig = jnp.array([[True, True, False, True]])
    np.testing.assert_array_equal(cp.threshold_commit(conf, elig, 0.9), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(cp.threshold_commit(conf, elig, 0.4), [[1, 1, 0, 0]])
    low = jnp.array([[0.2, 0.5, 0.92, 0.3]])
    np.testing.assert_array_equal(cp.threshold_commit(low, elig, 0.9), [[0, 1, 0, 0]])  # top-1 only


def test_factor_commit_by_hand_including_the_last_index_quirk():
    elig = jnp.ones((1, 4), bool)
    # thresholds 1 - 1/(n+1): -, 0.667, 0.75, 0.8 -> run of 2
    np.testing.assert_array_equal(cp.factor_commit(jnp.array([[0.5, 0.99, 0.4, 0.9]]), elig, 1.0), [[0, 1, 0, 1]])
    # fails only at the last index -> all four (reference off-by-one)
    np.testing.assert_array_equal(cp.factor_commit(jnp.array([[0.8, 0.99, 0.1, 0.9]]), elig, 1.0), [[1, 1, 1, 1]])
    # a single eligible position is always committed
    one = jnp.array([[False, True, False, False]])
    np.testing.assert_array_equal(cp.factor_commit(jnp.array([[0.9, 0.1, 0.9, 0.9]]), one, 1.0), [[0, 1, 0, 0]])


def test_eos_scaled_and_trajectory_state_by_hand():
    out = cp.eos_scaled(jnp.array([[0.8, 0.6]]), jnp.array([[True, False]]), 0.5)
    np.testing.assert_allclose(out, [[0.4, 0.6]])
    tokens = jnp.array([[7, 8, 9]])
    cs = jnp.array([[1, 0, -1]])
    np.testing.assert_array_equal(trajectory_state(tokens, cs, 0, MASK), [[3, 3, 3]])
    np.testing.assert_array_equal(trajectory_state(tokens, cs, 1, MASK), [[3, 8, 3]])
    np.testing.assert_array_equal(trajectory_state(tokens, cs, 2, MASK), [[7, 8, 3]])


# ----------------------------------------------------------------------------------------------------------------
# Hand-traced decodes with the scripted model
# ----------------------------------------------------------------------------------------------------------------


TOKS = [20, 21, 22, 23, 24, 25]
CONFS = [0.5, 0.95, 0.3, 0.97, 0.6, 0.4]


def test_llada_trace_by_hand():
    model = Scripted(script(TOKS, CONFS), 3)
    r = run(model, "llada", 6, block_len=3, steps=6)  # 1 token per step, blocks [0,3) then [3,6)
    np.testing.assert_array_equal(r.tokens[0], TOKS)
    np.testing.assert_array_equal(r.commit_step[0], [1, 0, 2, 3, 4, 5])
    assert r.nfe.tolist() == [6, 6] and bool(r.done.all())


def test_threshold_trace_by_hand():
    model = Scripted(script(TOKS, CONFS), 3)
    r = run(model, "threshold", 6, block_len=3, policy_args={"threshold": 0.9})
    # step 0: block [0,3): {1 (0.95)}; step 1: top-1 = 0; step 2: 2; step 3: block [3,6): {3}; 4: 4; 5: 5
    np.testing.assert_array_equal(r.commit_step[0], [1, 0, 2, 3, 4, 5])
    r = run(model, "threshold", 6, block_len=6, policy_args={"threshold": 0.55})
    np.testing.assert_array_equal(r.commit_step[0], [1, 0, 3, 0, 0, 2])  # 0.4 at 5 before 0.3 at 2
    assert r.nfe.tolist() == [4, 4]


def test_adablock_ends_the_block_at_a_confident_delimiter():
    toks = [20, 21, 29, 23, 24, 25]  # 29 = ';' predicted at index 2 with confidence 0.5 >= delta
    confs = [0.3, 0.35, 0.5, 0.99, 0.98, 0.97]
    model = Scripted(script(toks, confs), 3)
    r = run(model, "adablock", 6, block_len=6, policy_args={"threshold": 0.9, "delta": 0.3, "window": 0.5})
    # block [0,3) first (one token per step, by confidence), then [3,6) all at once
    np.testing.assert_array_equal(r.commit_step[0], [2, 1, 0, 3, 3, 3])
    r = run(model, "adablock", 6, block_len=6, policy_args={"threshold": 0.9, "delta": 0.6, "window": 0.5})
    np.testing.assert_array_equal(r.commit_step[0], [3, 2, 1, 0, 0, 0])  # delimiter not confident: one block


def test_rainbow_pads_terminate_with_the_right_lengths():
    toks = [20, 21, 4, 5, 6, 7, 8, 9]  # <pad_1> at index 2 ends the answer
    confs = [0.5, 0.4, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99]
    model = Scripted(script(toks, confs), 3)
    rainbow = (2,) + tuple(range(4, 11))
    r = run(model, "threshold", 8, block_len=8, stop_tokens=rainbow, policy_args={"threshold": 0.9})
    # step 0 commits the confident pads 2..7; step 1 index 0, step 2 index 1 -> prefix done, row stops
    assert r.lengths.tolist() == [3, 3]
    np.testing.assert_array_equal(r.valid[0], [1, 1, 1, 0, 0, 0, 0, 0])
    assert r.nfe.tolist() == [3, 3]
    r = run(model, "threshold", 8, block_len=8, stop_tokens=(2,), policy_args={"threshold": 0.9})
    assert r.lengths.tolist() == [8, 8]  # the pads are ordinary tokens when not terminators


def test_stop_early_fills_after_the_terminator():
    toks = [20, 2, 22, 23]
    model = Scripted(script(toks, [0.9, 0.95, 0.2, 0.1]), 3)
    r = run(model, "llada", 4, block_len=4, steps=4, pad_id=0)
    np.testing.assert_array_equal(r.tokens[0], [20, 2, 0, 0])
    np.testing.assert_array_equal(r.commit_step[0], [1, 0, 1, 1])
    assert r.nfe.tolist() == [2, 2]


# ----------------------------------------------------------------------------------------------------------------
# Limiting cases on a random (untrained) decoder
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder():
    cfg = presets.get("tiny_diffusion", vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8)
    return Decoder(cfg, rngs=nnx.Rngs(1))


def same(a, b):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.commit_step, b.commit_step)
    np.testing.assert_array_equal(a.nfe, b.nfe)


def test_threshold_one_equals_llada_top1():
    model = Scripted(np.random.default_rng(5).normal(0.0, 3.0, (8, V)), 3)
    kw = dict(block_len=4, temperature=1.0, rng=jax.random.key(5))
    same(run(model, "threshold", 8, policy_args={"threshold": 1.0}, **kw), run(model, "llada", 8, steps=8, **kw))


def test_prophet_limits():
    model = Scripted(np.random.default_rng(1).normal(0.0, 3.0, (8, V)), 3)
    kw = dict(block_len=4, steps=8, temperature=1.0, rng=jax.random.key(4))
    never = {"gaps": [1e9, 1e9, 1e9]}
    same(run(model, "prophet", 8, policy_args=never, **kw), run(model, "llada", 8, **kw))
    at_once = run(model, "prophet", 8, policy_args={"gaps": [-1e9, -1e9, -1e9]}, **kw)
    assert at_once.nfe.tolist() == [1, 1] and bool((at_once.commit_step == 0).all())


def test_eoser_trace_by_hand_and_gamma_one_equals_llada():
    model = Scripted(script([2, 20, 21, 22], [0.9, 0.5, 0.6, 0.7]), 3)
    kw = dict(block_len=4, steps=4)
    base = run(model, "llada", 4, policy_args={"stop_early": False}, **kw)
    np.testing.assert_array_equal(base.commit_step[0], [0, 3, 2, 1])
    same(run(model, "eoser", 4, policy_args={"gamma_min": 1.0, "stop_early": False}, **kw), base)
    # factor step/3 on the <eos> confidence 0.9: 0 < 0.7, 0.3 < 0.6, 0.6 > 0.5
    r = run(model, "eoser", 4, policy_args={"gamma_min": 0.0, "stop_early": False}, **kw)
    np.testing.assert_array_equal(r.commit_step[0], [2, 3, 1, 0])


def test_learn2pd_limits():
    decoder = Scripted(np.random.default_rng(6).normal(0.0, 3.0, (8, V)), 3)
    head = FilterHead(block_size=4, hidden=8, rngs=nnx.Rngs(0))
    head.mlp.out.bias[...] = jnp.full((4,), -1e4)  # never keeps -> the LLaDA schedule alone
    kw = dict(block_len=4, steps=8)
    l2pd = {"eot": False, "stop_early": False}
    same(run(decoder, "learn2pd", 8, heads={"filter": head}, policy_args=l2pd, **kw),
         run(decoder, "llada", 8, policy_args={"stop_early": False}, **kw))
    head.mlp.out.bias[...] = jnp.full((4,), 1e4)  # keeps everything: one step per block
    assert run(decoder, "learn2pd", 8, heads={"filter": head}, policy_args=l2pd, **kw).nfe.tolist() == [2, 2]


def test_infogain_limits():
    model = Scripted(np.random.default_rng(3).normal(0.0, 3.0, (8, V)), 3)
    kw = dict(block_len=4, temperature=0.0)
    one = run(model, "infogain", 8, policy_args={"candidates": 1, "threshold": 2.0}, **kw)  # no bypass
    top1 = run(model, "llada", 8, steps=8, **kw)
    np.testing.assert_array_equal(one.commit_step, top1.commit_step)  # candidate 0 = the most confident
    np.testing.assert_array_equal(one.nfe, 2 * top1.nfe)  # + one lookahead forward per step
    fill = run(model, "infogain", 8, policy_args={"threshold": 0.0, "stop_early": False}, **kw)  # always bypass
    assert fill.nfe.tolist() == [2, 2] and np.ptp(np.asarray(fill.commit_step).reshape(2, 2, 4), -1).max() == 0


def test_infogain_candidates_draw_distinct_tokens_at_positive_temperature():
    """Info-Gain (§B15): candidate c >= 1 samples its own token (``sample_tokens(logits, T)`` per candidate) at
    T > 0; the old code gave every candidate the step's single proposal ``x0``. One eligible position, 64 candidates
    per row: the fresh draws follow softmax(logits / T) (χ²) and differ from each other; at T = 0 all are the
    argmax."""
    b, n, c = 64, 4, 64
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.full((b, n, V), -30.0, np.float32)
    logits[:, :, 20:24] = np.log(probs)
    eligible = np.zeros((b, n), bool)
    eligible[:, 1] = True
    x0 = np.full((b, n), 20, np.int32)
    info = cp.StepInfo(logits=jnp.asarray(logits), x0=jnp.asarray(x0), conf=jnp.full((b, n), 0.4),
                       eligible=jnp.asarray(eligible), masked=jnp.asarray(eligible), is_stop=jnp.zeros((b, n), bool),
                       lo=jnp.zeros(b, jnp.int32), hi=jnp.full(b, n, jnp.int32), block_step=jnp.zeros(b, jnp.int32),
                       block_masks=jnp.ones(b, jnp.int32), step=jnp.int32(0), keys=jax.random.split(jax.random.key(0), b))
    args = cp.InfoGainArgs(candidates=c)
    spec = cp.LoopSpec(gen_len=n, block_len=n, steps=n, steps_per_block=n, stop_ids=(2,), mask_id=MASK,
                       temperature=1.0)
    pos, tok = cp.infogain_candidates(info, args, spec)
    assert (np.asarray(pos) == 1).all()
    tok = np.asarray(tok)
    np.testing.assert_array_equal(tok[:, 0], 20)  # candidate 0 keeps the step's proposal
    assert all(len(set(row[1:])) >= 3 for row in tok)  # distinct proposals among the candidates of every row
    counts = np.bincount(tok[:, 1:].ravel() - 20, minlength=4)[:4]
    expected = probs * tok[:, 1:].size
    assert counts.sum() == tok[:, 1:].size and np.sum((counts - expected) ** 2 / expected) < 16.3  # 3 dof, p=0.001
    _, greedy = cp.infogain_candidates(info, args, dataclasses.replace(spec, temperature=0.0))
    np.testing.assert_array_equal(greedy, 20)


def test_tracelock_limits():
    model = Scripted(np.random.default_rng(4).normal(0.0, 3.0, (8, V)), 3)
    ctrl = TraceController(17, d_model=16, num_heads=2, num_layers=1, rngs=nnx.Rngs(0))
    kw = dict(block_len=8, heads={"controller": ctrl}, policy_args={"stop_early": False})
    ctrl.threshold.bias[...] = jnp.full((1,), 1e4)  # prob 0 everywhere: scheduled top-1 by index, left to right
    np.testing.assert_array_equal(run(model, "tracelock", 8, **kw).commit_step, [list(range(8))] * 2)
    ctrl.threshold.bias[...] = jnp.full((1,), -1e4)  # prob 1 everywhere: the cap of 4 threshold commits per step
    np.testing.assert_array_equal(run(model, "tracelock", 8, **kw).commit_step, [[0] * 4 + [1] * 4] * 2)


class TwoMode(Scripted):
    """Scripted with a different table in AR mode (causal attention): S2D2's verifier q differs from the drafter p."""

    def __init__(self, table, ar_table, prompt_len):
        super().__init__(table, prompt_len)
        self.ar_table = nnx.Param(jnp.asarray(ar_table, jnp.float32))

    def __call__(self, tokens, *, logits_at=None, attention="bidirectional", **kw):
        out = super().__call__(tokens, logits_at=logits_at)
        if attention == "causal":
            out = DecoderOutput(logits=self.ar_table[...][logits_at - self.prompt_len], hidden=None, cache=None)
        return out


def test_s2d2_preserves_the_verifier_distribution():
    p_logits = np.full((1, V), -30.0, np.float32)
    q_logits = np.full((1, V), -30.0, np.float32)
    p_logits[0, 20:23] = np.log([0.6, 0.3, 0.1])
    q_logits[0, 20:23] = np.log([0.2, 0.3, 0.5])
    model = TwoMode(p_logits, q_logits, 3)
    rows = 3000
    prompt, valid = np.repeat(PROMPT[1:], rows, 0), np.repeat(PVALID[1:], rows, 0)
    r = diffusion_generate(model, prompt, valid, gen_len=1, policy="s2d2", block_len=1, temperature=1.0,
                           rng=jax.random.key(0), stop_tokens=(2,))
    counts = np.bincount(np.asarray(r.tokens[:, 0]) - 20, minlength=3)[:3]
    assert counts.sum() == rows
    chi2 = lambda probs: float(np.sum((counts - rows * np.array(probs)) ** 2 / (rows * np.array(probs))))  # noqa
    assert chi2([0.2, 0.3, 0.5]) < 13.8  # q: accepted (chi2, 2 dof, p = 0.001)
    assert chi2([0.6, 0.3, 0.1]) > 100  # not the drafter's p
    assert r.nfe.tolist() == [2] * rows  # draft forward + verify forward


def test_s2d2_router_rules_by_hand():
    """S2D2 routers (§B13): E[K] = Σ_k Π_{i≤k} α_i over the span, static/dynamic scores, hysteresis, the bandit's UCB
    and the α estimators."""
    args = cp.S2D2Args(router="score_threshold", cost=1.0)
    alpha = jnp.array([[0.5, 0.5, 1.0], [1.0, 1.0, 1.0]])
    in_span = jnp.array([[True, True, False], [True, True, True]])
    ek = cp.s2d2_expected_accepts(alpha, in_span)
    np.testing.assert_allclose(ek, [0.75, 3.0])
    np.testing.assert_allclose(cp.s2d2_score(ek, jnp.array([2, 1]), args), [-0.25, 2.0])
    np.testing.assert_allclose(cp.s2d2_score(ek, jnp.array([2, 1]), dataclasses.replace(args, score_mode="dynamic")),
                               [-1.25, 2.0])
    on = jnp.array([True, True, False, False])
    np.testing.assert_array_equal(cp.s2d2_hysteresis(on, jnp.array([-6.0, -1.0, 0.5, 2.0]), 1.0, -5.0),
                                  [False, True, False, True])
    # UCB: an untried arm first (skip before verify), then the larger mean + bonus
    np.testing.assert_array_equal(cp.s2d2_ucb_choose(jnp.array([[0.0, 0.0], [3.0, 0.0], [5.0, 5.0], [5.0, 5.0]]),
                                                     jnp.array([[0.0, 0.0], [3.0, 0.0], [5.0, 10.0], [10.0, 5.0]]),
                                                     jnp.array([0.0, 3.0, 10.0, 10.0]), 1.0),
                                  [False, True, True, False])
    flat, sharp = jnp.zeros((1, V)), jnp.zeros((1, V)).at[0, 5].set(50.0)
    np.testing.assert_allclose(cp.s2d2_alpha(jnp.concatenate([flat, sharp]), args), [np.exp(-1.0), 1.0], atol=1e-4)
    hard = dataclasses.replace(args, alpha="hard_margin_threshold")
    np.testing.assert_array_equal(cp.s2d2_alpha(jnp.concatenate([flat, sharp]), hard), [0.0, 1.0])
    ctx = cp.s2d2_context(jnp.array([1, 4, 4]), 4, jnp.array([0.0, 0.9, 0.2]), jnp.array([0.9, 0.1, 0.6]))
    np.testing.assert_array_equal(ctx, [1, 14, 13])  # (span bin · 2 + progress bin) · 2 + entropy bin


@pytest.mark.parametrize("router", ["score_threshold", "score_hysteresis", "contextual_bandit_ucb"])
def test_s2d2_routers_decode_and_count_the_verifier_copies(router):
    """Every router decodes every position once; the verifier's K sequence copies count K forwards: NFE = steps +
    K · verified steps. score_threshold with τ = -inf always verifies (NFE = (1 + K) · steps) and with τ = +inf never
    does (NFE = steps)."""
    model = TwoMode(np.random.default_rng(0).normal(0.0, 3.0, (8, V)), np.random.default_rng(1).normal(0.0, 3.0, (8, V)),
                    3)
    kw = dict(block_len=4, temperature=1.0, rng=jax.random.key(2))
    args = {"stop_early": False, "router": router}
    r = run(model, "s2d2", 8, policy_args=args, **kw)
    assert bool(r.done.all()) and not bool((r.tokens == MASK).any()) and (np.asarray(r.commit_step) >= 0).all()
    steps = np.asarray(r.commit_step).max(1) + 1  # steps each row was live
    extra = np.asarray(r.nfe) - steps
    assert (extra >= 0).all() and (extra % 4 == 0).all()  # K = 4 copies per verified step
    if router == "score_threshold":
        always = run(model, "s2d2", 8, policy_args=dict(args, score_threshold=-1e9), **kw)
        np.testing.assert_array_equal(always.nfe, 5 * (np.asarray(always.commit_step).max(1) + 1))  # 1 + 4 copies
        never = run(model, "s2d2", 8, policy_args=dict(args, score_threshold=1e9), **kw)
        np.testing.assert_array_equal(never.nfe, np.asarray(never.commit_step).max(1) + 1)


def test_margin_by_hand_and_limits():
    """Margin rule: hand-computed margins; δ = 1 commits one position per step in widest-margin order; a position
    whose mass is split between two tokens waits even when its top-1 probability is the higher one."""
    logits = np.full((1, 3, V), -30.0, np.float32)
    logits[0, 0, [5, 6]] = [np.log(0.6), np.log(0.4)]  # margin 0.2
    logits[0, 1, [5, 6]] = [np.log(0.9), np.log(0.1)]  # margin 0.8
    logits[0, 2, [5, 6]] = [np.log(0.5), np.log(0.5)]  # margin 0
    np.testing.assert_allclose(cp.top2_margin(jnp.asarray(logits)), [[0.2, 0.8, 0.0]], atol=1e-6)
    model = Scripted(script(TOKS, CONFS), 3)
    r = run(model, "margin", 6, block_len=6, policy_args={"margin": 1.0})
    # one commit per step; with the rest uniform the margin orders positions as their confidence does
    np.testing.assert_array_equal(r.commit_step[0], np.argsort(np.argsort(-np.asarray(CONFS))))
    assert r.nfe.tolist() == [6, 6]
    split = np.zeros((2, V), np.float32)  # 0: p1 0.6, rest uniform (margin ~0.59); 1: p1 0.65, p2 0.33 (margin 0.32)
    split[0, 20] = np.log(0.6 * (V - 1) / 0.4)
    split[1, [21, 22]] = np.log(np.array([0.65, 0.33]) / (0.02 / (V - 2)))
    r = run(Scripted(split, 3), "margin", 2, block_len=2, policy_args={"margin": 0.5})
    np.testing.assert_array_equal(r.commit_step[0], [0, 1])  # the split position waits, though its p1 is higher
    r = run(Scripted(split, 3), "threshold", 2, block_len=2, policy_args={"threshold": 0.62})
    np.testing.assert_array_equal(r.commit_step[0], [1, 0])  # confidence orders them the other way


def test_ass_takes_log2_steps():
    model = Scripted(np.random.default_rng(7).normal(0.0, 3.0, (8, V)), 3)
    r = run(model, "ass", 8, block_len=8, policy_args={"stop_early": False})
    assert int(r.num_steps) == 3 and r.nfe.tolist() == [3, 3]  # 1 + 2 + 5


@pytest.mark.parametrize("policy", ["llada", "threshold", "factor", "prophet", "adablock", "eoser", "ass", "ete",
                                    "margin", "bacd", "learn2pd", "infogain", "tracelock", "s2d2"])
def test_every_policy_commits_each_masked_position_once_in_block_order(policy):
    heads = {"filter": FilterHead(block_size=4, hidden=8, rngs=nnx.Rngs(0)),
             "controller": TraceController(17, d_model=16, num_heads=2, num_layers=1, rngs=nnx.Rngs(0))}
    args = {"stop_early": False, "block_len": 4}
    if policy == "learn2pd":
        args["eot"] = False
    model = Scripted(np.random.default_rng(0).normal(0.0, 3.0, (12, V)), 3)
    r = run(model, policy, 12, policy_args=args, temperature=1.0, rng=jax.random.key(2), heads=heads)
    cs = np.asarray(r.commit_step)
    assert bool(r.done.all()) and not bool((r.tokens == MASK).any())
    assert (cs >= 0).all() and (cs < int(r.num_steps)).all()
    lookahead = {"infogain": 2, "s2d2": 1 + 4}.get(policy, 1)  # forwards per step (S2D2: + K = 4 verifier copies)
    assert (np.asarray(r.nfe) <= lookahead * int(r.num_steps)).all() and int(r.num_steps) <= 12 + 4
    if policy not in ("ete", "adablock"):  # the others never commit past their fixed block
        blocks = cs.reshape(2, 3, 4)
        assert (blocks[:, :-1].max(-1) <= blocks[:, 1:].min(-1)).all()


def test_rows_are_batch_invariant(decoder):
    kw = dict(gen_len=8, policy="threshold", block_len=4, temperature=1.0, rng=jax.random.key(9), stop_tokens=(2,))
    both = diffusion_generate(decoder, PROMPT, PVALID, **kw)
    other = np.array([[1, 30, 31]])  # same shape (no recompilation), a different second row
    mixed = diffusion_generate(decoder, np.concatenate([PROMPT[:1], other]), np.concatenate([PVALID[:1], other > 0]),
                               **kw)
    np.testing.assert_array_equal(both.tokens[0], mixed.tokens[0])
    np.testing.assert_array_equal(both.commit_step[0], mixed.commit_step[0])


@pytest.mark.slow
def test_caches_equal_the_full_forward_on_a_block_causal_model(decoder):
    """On a block-causal model every cache equals the full forward token for token. Two batches of one shape: mixed
    prompt lengths (rows start blocks at different steps) and every prompt ending inside a position block (5 tokens,
    block 4: the prompt's last token shares a position block with the first generated ones, and rows share their
    block starts, so the Fast-dLLM caches are reused between refreshes). The old prefix/dual window left that
    prompt tail's keys stale (4 of these 64 rows differed)."""
    rng = np.random.default_rng(0)
    b, p = 64, 7
    toks = rng.integers(11, V, (b, p))
    outs = {}
    for name, lens in (("mixed", rng.integers(1, p + 1, b)), ("mid_block", np.full(b, 5))):
        valid = np.arange(p)[None, :] >= (p - lens)[:, None]
        outs[name] = {c: diffusion_generate(decoder, np.where(valid, toks, 0), valid, gen_len=10, policy="threshold",
                                            attention="block_causal", block_size=4, temperature=1.0,
                                            rng=jax.random.key(3), stop_tokens=(2,),
                                            policy_args={"cache": c, "stop_early": False, "threshold": 0.5})
                      for c in ("none", "block", "dual", "prefix")}
    for out in outs.values():
        for c in ("block", "dual", "prefix"):  # block-causal: no stale key is ever visible to the block
            np.testing.assert_array_equal(out[c].tokens, out["none"].tokens, err_msg=c)
            np.testing.assert_array_equal(out[c].commit_step, out["none"].commit_step, err_msg=c)
        np.testing.assert_array_equal(out["block"].nfe, out["none"].nfe + 1)  # + the prefix prefill
        np.testing.assert_array_equal(out["dual"].nfe, out["none"].nfe)
        np.testing.assert_array_equal(out["prefix"].nfe, out["none"].nfe)


def test_bad_input_is_named(decoder):
    with pytest.raises(ConfigError, match="policy='nope'"):
        run(decoder, "nope", 4)
    with pytest.raises(ConfigError, match="block_causal"):
        run(decoder, "llada", 4, policy_args={"cache": "block"})
    with pytest.raises(ConfigError, match="dual"):
        run(decoder, "prophet", 4, policy_args={"cache": "dual"})
    with pytest.raises(ConfigError, match="filter"):
        run(decoder, "learn2pd", 4)
    with pytest.raises(ConfigError, match="threshold"):
        run(decoder, "threshold", 4, policy_args={"threshold": 1.5})
    with pytest.raises(ValueError, match="mask_id"):
        run(decoder, "llada", 4, stop_tokens=(3,))
    assert {"llada", "threshold", "factor", "prophet", "adablock", "eoser", "ass"} <= set(COMMIT_POLICIES.names())
    assert dataclasses.is_dataclass(COMMIT_POLICIES.entry("llada").config_cls)


def test_a_resolved_policy_is_parsed_once_and_decodes_like_its_name(decoder, monkeypatch):
    """Issue 16: :func:`commit_policy` is the one parse of a policy's arguments; ``diffusion_generate`` given the
    resolved policy parses and looks up nothing and decodes exactly as the policy's name with the same mapping."""
    from jaxtok.decode import diffusion as D

    pa = {"block_len": 4, "threshold": 0.5}
    resolved = D.commit_policy("threshold", pa)
    assert resolved.spec is COMMIT_POLICIES.entry("threshold").spec and resolved.args.threshold == 0.5
    calls = []
    for name in ("entry", "parse_args"):
        real = getattr(COMMIT_POLICIES, name)
        monkeypatch.setattr(COMMIT_POLICIES, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    by_policy = run(decoder, resolved, 8, temperature=1.0, rng=jax.random.key(4))
    assert calls == []
    same(by_policy, run(decoder, "threshold", 8, policy_args=pa, temperature=1.0, rng=jax.random.key(4)))
    assert calls.count("parse_args") == 1
    with pytest.raises(ConfigError, match="already resolved"):
        run(decoder, resolved, 8, policy_args=pa)


def test_the_loop_wires_policies_by_their_spec():
    """The caches a policy may use and the hooks the loop wires come from its spec (no policy names in the loop)."""
    import inspect

    from jaxtok.decode import diffusion as D

    local = {n for n in COMMIT_POLICIES.names() if COMMIT_POLICIES.entry(n).spec.block_local}
    assert local == {"llada", "threshold", "factor", "eoser", "ass", "bacd", "adablock", "margin"}
    assert not any(COMMIT_POLICIES.entry(n).spec.full_forward_only for n in local)
    src = inspect.getsource(D)
    assert ".meta" not in src and src.count("COMMIT_POLICIES.parse_args(") == 1
    loop = "".join(inspect.getsource(f) for f in (D.denoise_step, D._commit, D._Loop, D._diffusion_jit, D.check_policy))
    assert not [n for n in COMMIT_POLICIES.names() if f'"{n}"' in loop]
    assert set(D.FORWARDS) == {"none", "prefix", "dual", "block"}
