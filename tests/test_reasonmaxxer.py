"""ReasonMaxxer (train/objectives/reasonmaxxer.py, spec §7): pool selection, advantages, limiting cases of the
loss, the sign test and gradient isolation of non-decision tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.models import Decoder, presets
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.specs import ObjectiveSpec
from jaxtok.train.objectives import reasonmaxxer as RM

V = 16


def _model(seed):
    return Decoder(presets.get("tiny_draft", vocab_size=V), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def policy():
    return _model(0)


@pytest.fixture(scope="module")
def base():
    return _model(1)


def _batch(rewards, comp_lens=(4, 3, 4, 2), prompt_len=3, comp_len=4, seed=0):
    """Rollout-layout batch: groups of 2 rows, left-padded prompts, ragged completions."""
    rng = np.random.default_rng(seed)
    B, T = len(rewards), prompt_len + comp_len
    valid = np.zeros((B, T), bool)
    gen = np.zeros((B, T), bool)
    for b in range(B):
        valid[b, b % 2:prompt_len + comp_lens[b]] = True
        gen[b, prompt_len:prompt_len + comp_lens[b]] = True
    tokens = np.where(valid, rng.integers(4, V, (B, T)), 0).astype(np.int32)
    return {"tokens": tokens, "positions": np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32),
            "valid": valid, "loss_mask": gen, "rewards": np.asarray(rewards, np.float32),
            "group_ids": (np.arange(B) // 2).astype(np.int32)}


def _run(policy, batch, reference, *variants):
    args = [RM.ReasonMaxxerArgs(**kw) for kw in variants]
    return jax.jit(lambda b: [RM.reasonmaxxer_loss(policy, b, None, a, reference=reference) for a in args])(batch)


def test_advantages_population_std_and_clip():
    # group (1, 0, 0, 0): mean .25, pstd √(3/16) -> A = .75/.433 = 1.732, -.577; clip 1.5 caps the positive one
    adv = RM.reasonmaxxer_advantages([1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], clip=1.5)
    s = np.sqrt(3 / 16)
    np.testing.assert_allclose(adv, [1.5, -0.25 / s, -0.25 / s, -0.25 / s, 0, 0], rtol=1e-6)


def test_select_mid_problems_and_trim():
    # pass rates: p0 = 1/4, p1 = 2/4, p2 = 4/4 (no incorrect), p3 = 0 (no correct), p4 = 3/4, p5 = 1/4
    rates = {0: [1, 0, 0, 0], 1: [1, 1, 0, 0], 2: [1, 1, 1, 1], 3: [0, 0, 0, 0], 4: [1, 1, 1, 0], 5: [0, 1, 0, 0]}
    ids = np.repeat(list(rates), 4)
    rewards = np.concatenate(list(rates.values()))
    np.testing.assert_array_equal(RM.select_mid_problems(rewards, ids, 1), [1])
    np.testing.assert_array_equal(RM.select_mid_problems(rewards, ids, 3), [0, 1, 4])  # ties -> smaller ids
    np.testing.assert_array_equal(RM.select_mid_problems(rewards, ids, 50), [0, 1, 4, 5])
    np.testing.assert_array_equal(RM.shortest_rows([5, 1, 9, 3, 3], 0.8), [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(RM.shortest_rows([5, 1, 9, 3, 3], 0.5), [0, 1, 0, 1, 1])
    batch = {"rewards": rewards, "group_ids": ids, "loss_mask": np.tile(np.arange(24)[:, None] > np.arange(30), 1),
             "tokens": np.arange(24)[:, None] * np.ones((1, 30), int)}
    pool = RM.build_pool(batch, num_problems=2, keep_fraction=0.75)
    # problems 0 and 1 (rows 0..7), shortest 6 of 8 -> rows 0..5; advantages from the full groups
    np.testing.assert_array_equal(pool["tokens"][:, 0], [0, 1, 2, 3, 4, 5])
    np.testing.assert_allclose(pool["advantages"], [np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3),
                                                    1, 1], rtol=1e-6)


def test_limits_no_decisions_only_anchor_and_fullseq(policy, base):
    """τ → ∞: no decision tokens, the loss is λ·KL anchor — 0 when the base is the policy (at init), the mean
    forward KL over all valid predicted positions otherwise. τ = 0, λ = 0: advantage-weighted CE on every
    generated token, i.e. the ``fullseq`` variant."""
    batch = _batch([1, 0, 0, 1])
    same, = _run(policy, batch, policy, dict(tau_pos=1e9))
    assert float(same[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(same[2]["decision_tokens"][0]) == 0
    anchor, all_ce, fullseq, correct = _run(policy, batch, base, dict(tau_pos=1e9, kl_coef=0.3),
                                            dict(tau_pos=0.0, kl_coef=0.0), dict(decision_objective="fullseq",
                                                                                 kl_coef=0.0),
                                            dict(decision_objective="correct_sft", kl_coef=0.0))
    stats = RM.reasonmaxxer_token_stats(policy, batch, base)
    valid = batch["valid"]
    predicted = valid & np.concatenate([np.zeros_like(valid[:, :1]), valid[:, :-1]], 1)
    np.testing.assert_allclose(anchor[0], 0.3 * np.asarray(stats["kl"])[predicted].mean(), rtol=1e-5)
    gen = batch["loss_mask"]
    a = 1.0  # groups (1, 0), (0, 1): mean .5, pstd .5 -> A = ±1
    adv = np.array([a, -a, -a, a])[:, None] * np.ones_like(gen)
    ce = -(adv * np.asarray(stats["logp"]))[gen].mean()
    np.testing.assert_allclose(all_ce[0], ce, rtol=1e-5)
    np.testing.assert_allclose(fullseq[0], ce, rtol=1e-5)
    rows = gen & (adv > 0)
    np.testing.assert_allclose(correct[0], -np.asarray(stats["logp"])[rows].mean(), rtol=1e-5)


def test_entropy_gate_per_sign_and_precomputed_entropy():
    ent = np.array([[0.0, 2.0, 0.5, 1.5], [0.0, 2.0, 0.5, 1.5], [0.0, 2.0, 0.5, 1.5]])
    gen = np.array([[0, 1, 1, 1]] * 3, bool)
    adv = np.array([1.0, -1.0, 0.0])
    d = RM.decision_mask(ent, gen, adv, RM.ReasonMaxxerArgs(tau_pos=1.0, tau_neg=1.8))
    np.testing.assert_array_equal(d, [[0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])


def test_non_decision_tokens_get_gradient_only_through_kl():
    rng = np.random.default_rng(0)
    lp, kl = -rng.uniform(0.1, 2, (2, 5)), rng.uniform(0, 1, (2, 5))
    decision = np.array([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]], bool)
    kl_mask = np.ones((2, 5), bool)
    args = RM.ReasonMaxxerArgs(kl_coef=0.2, beta_neg=0.5)
    g_lp, g_kl = jax.grad(lambda a, b: RM.reasonmaxxer_terms(a, b, decision, kl_mask, np.array([2.0, -1.0]),
                                                             args)[0], argnums=(0, 1))(lp, kl)
    np.testing.assert_array_equal(np.asarray(g_lp)[~decision], 0.0)
    np.testing.assert_array_equal(np.asarray(g_kl)[decision], 0.0)
    # decision tokens: −w/|D| with w = A (β_neg·A for A < 0); anchors: λ/|anchors|
    np.testing.assert_allclose(np.asarray(g_lp)[decision], [-2 / 3, -2 / 3, 0.5 / 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_kl)[~decision], 0.2 / 7, rtol=1e-6)
    empty, _ = RM.reasonmaxxer_terms(lp, kl, np.zeros((2, 5), bool), np.zeros((2, 5), bool), [1.0, 1.0], args)
    assert float(empty) == 0.0


def test_sign_one_sgd_step(policy):
    """One SGD step raises log π(y_t) at the decision tokens of the correct rollouts and lowers it on the
    incorrect ones (base = policy, so the anchor's gradient is 0 at the start)."""
    batch = _batch([1, 0, 0, 1], seed=3)
    stats = RM.reasonmaxxer_token_stats(policy, batch, policy)
    ent = np.asarray(stats["base_entropy"])
    tau = float(np.median(ent[batch["loss_mask"]]))
    args = RM.ReasonMaxxerArgs(tau_pos=tau, kl_coef=0.1)
    decision = RM.decision_mask(ent, batch["loss_mask"], np.array([1.0, -1, -1, 1]), args)
    assert 0 < int(np.sum(decision)) < int(np.sum(batch["loss_mask"]))
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)

    @jax.jit
    def delta(p):
        g = jax.grad(lambda q: RM.reasonmaxxer_loss(nnx.merge(graphdef, q, rest), batch, None, args,
                                                    reference=policy)[0])(p)
        new = jax.tree.map(lambda a, b: a - 0.05 * b, p, g)
        lp0 = RM.reasonmaxxer_token_stats(policy, batch, None)["logp"]
        lp1 = RM.reasonmaxxer_token_stats(nnx.merge(graphdef, new, rest), batch, None)["logp"]
        return jnp.sum((lp1 - lp0) * decision, axis=1)

    d = np.asarray(delta(params))
    assert d[0] > 0 and d[3] > 0 and d[1] < 0 and d[2] < 0


def test_registration_and_errors(policy):
    entry = OBJECTIVES.entry("reasonmaxxer")
    assert entry.spec == ObjectiveSpec(data="rollout", models=("reference",), group_advantages=True)
    with pytest.raises(ConfigError, match="decision_objective"):
        OBJECTIVES.parse_args("reasonmaxxer", {"decision_objective": "delta_hinge"}, "a")
    with pytest.raises(ConfigError, match="reference"):
        RM.reasonmaxxer_loss(policy, _batch([1, 0, 0, 1]), None, RM.ReasonMaxxerArgs())
