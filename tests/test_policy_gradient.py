"""The ``policy_gradient`` objective (train/objectives/policy_gradient.py) on tiny decoders and hand-made rollout
batches: first inner epoch, limiting cases between loss modes, zero-variance groups, the KL term, gradient sign,
DAPO helpers, accumulation with sequence-level aggregation (spec §6, §9)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtok import mesh as M
from jaxtok.models import Decoder, presets
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.train.objectives import policy_gradient as PG
from jaxtok.train.rollout import score_tokens
from jaxtok.train.step import init_train_state, make_train_step

V = 16


def _model(seed=0):
    return Decoder(presets.get("tiny_draft", vocab_size=V), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model():
    return _model(0)


def rollout_batch(model, rewards, *, comp_lens=None, prompt_len=3, comp_len=4, temperature=1.3, group_size=2,
                  seed=0, old_noise=0.0):
    """A rollout batch by the contract: left-padded prompts (row b has b % 2 pad slots), ragged completions
    padded after their end, generation budget ``max_new_tokens = comp_len``, ``accuracy = rewards``; old
    log-probs/entropy recomputed by the rollout's scorer (``+ old_noise``·N(0,1) to emulate a later inner
    epoch)."""
    rng = np.random.default_rng(seed)
    B = len(rewards)
    T = prompt_len + comp_len
    comp_lens = [comp_len] * B if comp_lens is None else comp_lens
    tokens = rng.integers(4, V, (B, T)).astype(np.int32)
    valid = np.zeros((B, T), bool)
    loss_mask = np.zeros((B, T), bool)
    for b in range(B):
        valid[b, b % 2:prompt_len + comp_lens[b]] = True
        loss_mask[b, prompt_len:prompt_len + comp_lens[b]] = True
    tokens = np.where(valid, tokens, 0).astype(np.int32)
    batch = {"tokens": tokens, "positions": np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32),
             "valid": valid, "loss_mask": loss_mask}
    temp = np.full(B, temperature, np.float32)
    old, ent = score_tokens(model, batch, temp)
    old = np.where(loss_mask, old + old_noise * rng.standard_normal(old.shape), 0.0).astype(np.float32)
    batch.update(old_logprobs=old, entropy=ent, rewards=np.asarray(rewards, np.float32),
                 group_ids=(np.arange(B) // group_size).astype(np.int32), temperature=temp,
                 max_new_tokens=np.full(B, comp_len, np.int32),
                 accuracy=np.asarray(rewards, np.float32))
    return batch


_JITTED = {}


def _losses(model, batch, *variants, reference=None):
    """``policy_gradient_loss`` outputs for several argument dicts, from one jitted function per (model,
    variants, reference), reused across batches of equal shapes (compiles dominate this file's runtime)."""
    args = tuple(PG.PolicyGradientArgs(**kw) for kw in variants)
    key = (id(model), args, id(reference))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda b: [PG.policy_gradient_loss(model, b, None, a, reference=reference)
                                          for a in args])
    return _JITTED[key](batch)


GRAD = {"gspo": dict(loss_mode="gspo"), "gspo_token_c5": dict(loss_mode="gspo_token", chunk_size=5),
        "grpo": dict(loss_mode="grpo"), "dapo": dict(loss_mode="dapo"), "cppo": dict(loss_mode="cppo")}


def _grads(model, batch):
    """``{name: (loss_sum, count, aux, d loss_sum / d params)}`` for the :data:`GRAD` variants, one jitted
    function per model (the batch is an argument)."""
    key = ("grad", id(model))
    if key not in _JITTED:
        args = {k: PG.PolicyGradientArgs(**kw) for k, kw in GRAD.items()}
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def one(p, b, a):
            ls, c, aux = PG.policy_gradient_loss(nnx.merge(graphdef, p, rest), b, None, a)
            return ls, (c, aux)

        def run(p, b):
            out = {}
            for k, a in args.items():
                (ls, (c, aux)), g = jax.value_and_grad(one, has_aux=True)(p, b, a)
                out[k] = (ls, c, aux, g)
            return out

        _JITTED[key] = (jax.jit(run), params)
    run, params = _JITTED[key]
    return run(params, batch)


EPS, C = 0.2, 1.5  # clip ε and a dual-clip bound low enough to bind in the one-token test
_CLIP = dict(eps_low=EPS, eps_high=EPS, aggregation="token-mean")
VARIANTS = {  # every forward-only variant the tests read, compiled once per model
    "ppo": dict(loss_mode="ppo"), "grpo": dict(loss_mode="grpo"), "dr_grpo": dict(loss_mode="dr_grpo"),
    "dapo": dict(loss_mode="dapo"), "ppo_entropy": dict(loss_mode="ppo", entropy_coef=0.1),
    "ppo_overlong": dict(loss_mode="ppo", overlong_buffer=2, overlong_max_length=4),
    "ppo_no_dual": dict(loss_mode="ppo", dual_clip_c=None), "ppo_dual": dict(loss_mode="ppo", dual_clip_c=C),
    "gspo_eps": dict(loss_mode="gspo", **_CLIP), "gspo_token_eps": dict(loss_mode="gspo_token", **_CLIP),
    "ctpo_ppo": dict(loss_mode="ctpo", ctpo_p=0.0, ctpo_c_low=-math.log(1 - EPS), ctpo_c_high=math.log(1 + EPS),
                     ctpo_c_dual=math.log(C)),
    "grpo_token_mean": dict(loss_mode="grpo", aggregation="token-mean", dual_clip_c=C),
    "appo": dict(loss_mode="appo"), "appo_b0": dict(loss_mode="appo", appo_b=0.0, appo_drop_multi_dual_clip=False),
    "dr_grpo_norm2": dict(loss_mode="dr_grpo", norm_length=2.0),
    "dapo_overlong": dict(loss_mode="dapo", overlong_buffer=2, overlong_max_length=4),
}
KL_VARIANTS = {"grpo": dict(loss_mode="grpo"),
               **{e: dict(loss_mode="grpo", kl_coef=0.5, kl_estimator=e) for e in ("k1", "k2", "k3", "k3+")}}


def _all(model, batch):
    """``{name: (loss_sum, count, aux)}`` of the :data:`VARIANTS` on ``batch``."""
    return dict(zip(VARIANTS, _losses(model, batch, *VARIANTS.values())))


def _with_reference(model, batch, reference):
    """``{name: (loss_sum, count, aux)}`` of the :data:`KL_VARIANTS` against ``reference`` (passed as state, so
    references of one architecture share the compiled function)."""
    ref_def, ref_state = nnx.split(reference)
    key = ("kl", id(model), ref_def)
    if key not in _JITTED:
        args = [PG.PolicyGradientArgs(**kw) for kw in KL_VARIANTS.values()]
        _JITTED[key] = jax.jit(lambda b, st: [PG.policy_gradient_loss(model, b, None, a,
                                                                      reference=nnx.merge(ref_def, st))
                                              for a in args])
    return dict(zip(KL_VARIANTS, _JITTED[key](batch, ref_state)))


def _loss(model, batch, reference=None, **kw):
    return _losses(model, batch, kw, reference=reference)[0]


def _value(out):
    loss_sum, count, _ = out
    return float(loss_sum) / float(count) if float(count) else 0.0


def _aux(out, key):
    s, c = out[2][key]
    return float(s) / float(c) if float(c) else 0.0


@pytest.mark.slow
def test_first_inner_epoch_ratio_one_and_minus_mean_advantage(model):
    """Old log-probs from the rollout scorer at τ = 1.3: the objective (logits / τ) sees ratio 1 exactly and the
    token-mean PPO loss is −Σ m A / Σ m with hand-computed GRPO advantages (Bessel std, groups of 2: ±1/√2·...)."""
    batch = rollout_batch(model, [1, 0, 1, 1], comp_lens=[4, 3, 2, 4])
    out = _all(model, batch)["ppo"]
    assert _aux(out, "ratio_mean") == pytest.approx(1.0, abs=1e-5)
    assert float(out[2]["ratio_max"][0]) == pytest.approx(1.0, abs=1e-5)
    assert _aux(out, "clip_frac") == 0.0
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # group (1, 0): mean 0.5, Bessel std √0.5; group (1, 1): A = 0
    adv_tokens = np.array([a] * 4 + [-a] * 3 + [0.0] * 2 + [0.0] * 4)
    assert float(out[1]) == 13
    assert _value(out) == pytest.approx(-adv_tokens.mean(), abs=1e-5)
    # the temperature matters: scoring at τ = 1 would not give ratio 1
    batch_t1 = dict(batch, temperature=np.ones(4, np.float32))
    assert abs(_aux(_all(model, batch_t1)["ppo"], "ratio_mean") - 1.0) > 1e-3


def test_aggregation_counts_and_grpo_value(model):
    """grpo = seq-mean-token-mean: count = rows with tokens; the value is the mean over rows of −A_i (ratio 1)."""
    batch = rollout_batch(model, [1, 0, 0, 0], comp_lens=[4, 3, 2, 4])
    out, dr = _all(model, batch)["grpo"], _all(model, batch)["dr_grpo"]
    assert float(out[1]) == 4
    adv = np.array([1.0, -1 / 1.0, 0.0, 0.0]) * 0.5 / (math.sqrt(0.5) + 1e-6)
    assert _value(out) == pytest.approx(-adv.mean(), abs=1e-5)
    # dr_grpo: Σ_t / L_max per row (L_max = the generation budget 4, not the padded 7), mean over rows, no std
    np.testing.assert_allclose(_value(dr), -(0.5 * 4 - 0.5 * 3) / 4 / 4, atol=1e-6)
    assert PG.PolicyGradientArgs(loss_mode="dr_grpo").estimator == "dr_grpo"


def test_dr_grpo_normaliser_is_the_generation_budget_not_the_prompt_width(model):
    """Dr.GRPO divides each sequence's token sum by the constant L_max = rollout.max_new_tokens (§6.2): the same
    completions behind prompts of width 3 or 7 give the same loss (at ratio 1: −Σ_t m A / 4 per row, mean over
    rows), so the effective learning rate does not move with ``data.prompt_len``; ``norm_length`` overrides."""
    expect = -(0.5 * 4 - 0.5 * 3) / 4 / 4
    batch = rollout_batch(model, [1, 0, 0, 0], comp_lens=[4, 3, 2, 4])
    out = _all(model, batch)
    np.testing.assert_allclose(_value(out["dr_grpo"]), expect, atol=1e-6)
    np.testing.assert_allclose(_value(out["dr_grpo_norm2"]), 2 * expect, atol=1e-6)
    left = lambda x: np.concatenate([np.zeros((x.shape[0], 4), x.dtype), x], 1)  # noqa: E731  4 more pad columns
    wide = {k: left(v) if np.ndim(v) == 2 else v for k, v in batch.items()}  # prompt width 3 -> 7, same tokens
    np.testing.assert_allclose(_value(_loss(model, wide, loss_mode="dr_grpo")), expect, atol=1e-6)


def test_dapo_dynamic_sampling_filters_on_accuracy_not_on_the_shaped_reward(model):
    """DAPO drops groups whose accuracy is all equal (``filter_groups.metric = acc``), even when the overlong
    penalty makes their shaped rewards differ: group 0 is right twice (lengths 2 and 4, shaped rewards 1 and 0) and
    is dropped; group 1 (right / wrong) is kept. Without ``accuracy`` the unshaped rewards decide."""
    batch = rollout_batch(model, [1, 1, 1, 0], comp_lens=[2, 4, 3, 3])  # accuracy = rewards = [1, 1, 1, 0]
    out = _all(model, batch)["dapo_overlong"]
    assert float(out[1]) == 6 and _aux(out, "kept_rows") == pytest.approx(0.5)  # group 1's 3 + 3 tokens
    args = PG.PolicyGradientArgs(**VARIANTS["dapo_overlong"])
    for b in (batch, {k: v for k, v in batch.items() if k != "accuracy"}):
        np.testing.assert_array_equal(PG.host_advantages(b, args)["row_keep"], [False, False, True, True])


def test_loss_modes_reduce_to_each_other_on_one_token_completions(model):
    """One-token completions after a perturbation: token, sequence (GSPO), GSPO-token and cumulative (CTPO)
    ratios coincide, so GSPO = GSPO-token = PPO with the same ε and no dual clip, and CTPO with p = 0 and
    log-space bounds (−log(1−ε), log(1+ε), log c) = PPO-clip with dual clip c."""
    batch = rollout_batch(model, [1, 0, 0.5, 0], comp_lens=[1, 1, 1, 1], old_noise=0.8, seed=1)
    out = _all(model, batch)
    ppo, gs, gs_tok, ppo_dual, ctpo, grpo_tok = (out[k] for k in ("ppo_no_dual", "gspo_eps", "gspo_token_eps",
                                                                  "ppo_dual", "ctpo_ppo", "grpo_token_mean"))
    assert _aux(ppo, "clip_frac") > 0  # the perturbation is large enough to clip
    assert _aux(ppo_dual, "dual_clip_frac") > 0  # and to dual-clip
    for out in (gs, gs_tok):
        np.testing.assert_allclose(_value(out), _value(ppo), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_value(ctpo), _value(ppo_dual), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_value(grpo_tok), _value(ppo_dual), rtol=1e-6)


@pytest.mark.slow
def test_gspo_token_equals_gspo_value_and_parameter_gradient(model):
    """Constant advantage within a sequence: GSPO-token has GSPO's value and the same gradient w.r.t. the
    model parameters (§6.3)."""
    batch = rollout_batch(model, [1, 0, 1, 0], comp_lens=[4, 2, 3, 4], old_noise=1e-3, seed=1)
    # chunk_size 5 does not divide the 4 x 6 scored tokens: the padded chunk rows must not poison the gradient
    out = _grads(model, batch)
    (v1, c1, _, g1), (v2, c2, _, g2) = out["gspo"], out["gspo_token_c5"]
    np.testing.assert_allclose(v1 / c1, v2 / c2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g1)) > 0


def test_appo_with_b_zero_is_dapo(model):
    batch = rollout_batch(model, [1, 0, 1, 0], comp_lens=[4, 2, 3, 4], old_noise=0.3, seed=2)
    out = _all(model, batch)
    dapo, appo0, appo = out["dapo"], out["appo_b0"], out["appo"]
    np.testing.assert_allclose(_value(appo0), _value(dapo), rtol=1e-6)
    assert 1.0 <= _aux(appo, "appo_future_factor_mean") <= 1.2


def test_zero_variance_groups_give_zero_loss_not_nan(model):
    """All rewards equal: advantages 0, loss 0 and a finite (zero) gradient; dapo/cppo drop the rows (count 0)."""
    batch = rollout_batch(model, [1, 1, 0, 0], old_noise=0.2)
    modes = ("grpo", "dapo", "cppo")
    out = _grads(model, batch)
    for mode in modes:
        ls, count, aux, grads = out[mode]
        assert float(ls) == 0.0
        assert float(count) == (0.0 if mode in ("dapo", "cppo") else 4.0)
        assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads))
        assert all(np.isfinite(float(s)) and np.isfinite(float(c)) for s, c in aux.values())


def test_dynamic_sampling_masks_only_zero_variance_groups(model):
    rewards, ids = np.array([1, 0, 1, 1, 0, 0.5]), np.arange(6) // 2
    np.testing.assert_array_equal(PG.dynamic_sampling_mask(rewards, ids), [True, True, False, False, True, True])
    np.testing.assert_array_equal(PG.dynamic_sampling_mask(rewards, ids, atol=0.5), [1, 1, 0, 0, 0, 0])
    batch = rollout_batch(model, [1, 1, 0, 1], comp_lens=[4, 3, 2, 4])
    out = _all(model, batch)["dapo"]
    assert float(out[1]) == 6  # the second group's 2 + 4 tokens
    assert _aux(out, "kept_rows") == pytest.approx(0.5)
    # group ids need not be contiguous or start at 0
    np.testing.assert_array_equal(PG.dense_group_ids(np.array([7, 7, 3, 3, 9])), [1, 1, 0, 0, 2])


def test_overlong_shaping_hand_computed(model):
    """DAPO soft overlong punishment: L_max = 10, buffer 4 -> 0 up to 6 tokens, −(|y| − 6)/4 in the buffer, −1
    beyond; inside the objective the completion length is Σ loss_mask."""
    np.testing.assert_allclose(PG.shape_overlong_rewards([1, 1, 1, 0], [5, 8, 12, 7], 10, 4), [1, 0.5, 0, -0.25])
    batch = rollout_batch(model, [1, 1, 1, 1], comp_lens=[2, 4, 3, 3])
    # lengths 2, 4 | 3, 3 with max 4, buffer 2: penalties 0, −1 | −0.5, −0.5 -> advantages ±1/√2 | 0
    out = _all(model, batch)["ppo_overlong"]
    assert _aux(out, "reward_mean") == pytest.approx(0.5)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert _value(out) == pytest.approx(-(2 * a - 4 * a) / 12, abs=1e-5)
    with pytest.raises(ConfigError, match="overlong_max_length"):
        PG.PolicyGradientArgs(overlong_buffer=8, overlong_max_length=4)


def test_adv_eps_zero_is_exact():
    """ε = 0 is allowed (zero-variance groups give advantage 0, not NaN); a negative ε is refused."""
    args = PG.PolicyGradientArgs(adv_eps=0.0)
    adv = PG.sequence_advantages(np.array([1.0, 1.0, 0.0, 1.0]), np.array([0, 0, 1, 1]), args.estimator,
                                 eps=args.adv_eps)
    np.testing.assert_allclose(adv, [0.0, 0.0, -0.5 / math.sqrt(0.5), 0.5 / math.sqrt(0.5)], rtol=1e-6)
    with pytest.raises(ConfigError, match="adv_eps"):
        PG.PolicyGradientArgs(adv_eps=-1e-6)


def test_kl_term_zero_when_reference_is_policy(model):
    batch = rollout_batch(model, [1, 0, 0, 1], old_noise=0.1)
    same_all = _with_reference(model, batch, model)
    base = same_all.pop("grpo")
    for same in same_all.values():
        assert _aux(same, "kl_loss") == pytest.approx(0.0, abs=1e-6)
        np.testing.assert_allclose(_value(same), _value(base), atol=1e-6)
    other = _with_reference(model, batch, _model(1))["k3"]
    kl = _aux(other, "kl_loss")
    assert kl > 0  # k3 >= 0, and positive for a different model
    np.testing.assert_allclose(_value(other), _value(base) + 0.5 * kl, rtol=1e-5)
    with pytest.raises(ConfigError, match="reference"):
        _loss(model, batch, loss_mode="grpo", kl_coef=0.1)


def test_entropy_bonus(model):
    batch = rollout_batch(model, [1, 0, 0, 1])
    base, bonus = _all(model, batch)["ppo"], _all(model, batch)["ppo_entropy"]
    np.testing.assert_allclose(_value(bonus), _value(base) - 0.1 * _aux(base, "entropy"), rtol=1e-5)
    # the objective's entropy (current policy, logits / τ) equals the rollout's stored entropy at epoch 1
    np.testing.assert_allclose(_aux(base, "entropy"), batch["entropy"].sum() / batch["loss_mask"].sum(), rtol=1e-5)


def test_precomputed_token_advantages_are_used(model):
    """A batch carrying ``advantages [B, T]`` (APPO tree rollouts) bypasses the reward estimator."""
    batch = rollout_batch(model, [0, 0, 0, 0])
    adv = np.where(batch["loss_mask"], np.arange(batch["loss_mask"].shape[1])[None, :] * 0.1, 0.0)
    out = _loss(model, dict(batch, advantages=adv.astype(np.float32)), loss_mode="ppo")
    assert _value(out) == pytest.approx(-adv[batch["loss_mask"]].mean(), abs=1e-5)


def test_cppo_topk_divergence_is_zero_at_first_epoch(model):
    """CPPO with the rollout's top-K (same policy): D_t = 0 everywhere, the mask keeps every token."""
    batch = rollout_batch(model, [1, 0, 1, 0])
    @jax.jit
    def rollout_topk(b):  # what a rollout storing μ's top-3 would keep: logits at t-1 score token t
        full = jax.nn.log_softmax(model(b["tokens"], positions=b["positions"], valid=b["valid"]).logits / 1.3, -1)
        top_lp, top_ids = jax.lax.top_k(full, 3)  # [B, T, 3]
        shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], 1)  # noqa: E731
        return shift(top_lp), shift(top_ids)

    top_lp, top_ids = rollout_topk(batch)
    batch.update(topk_logprobs=np.asarray(top_lp), topk_ids=np.asarray(top_ids))
    out = _loss(model, batch, loss_mode="cppo", cppo_divergence="topk_tv", dynamic_sampling=False)
    assert _aux(out, "divergence_mean") == pytest.approx(0.0, abs=1e-6)
    assert _aux(out, "cppo_mask_mean") == 1.0
    with pytest.raises(ConfigError, match="topk_ids"):
        _loss(model, rollout_batch(model, [1, 0, 1, 0]), loss_mode="cppo", cppo_divergence="topk_kl")


def test_one_sgd_step_moves_log_probs_by_advantage_sign(model):
    """Gradient sign: after one SGD step on GRPO, the rewarded completion is more likely, the other less."""
    batch = rollout_batch(model, [1, 0, 0, 1])
    ls, count, _, grads = _grads(model, batch)["grpo"]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def delta_logp(p, g):
        new = jax.tree.map(lambda a, b: a - 0.05 * b / count, p, g)
        lp0 = PG.rollout_token_stats(nnx.merge(graphdef, p, rest), batch)["logp"]
        lp1 = PG.rollout_token_stats(nnx.merge(graphdef, new, rest), batch)["logp"]
        return jnp.sum((lp1 - lp0) * batch["loss_mask"], axis=1)

    delta = np.asarray(delta_logp(params, grads))
    assert delta[0] > 0 > delta[1] and delta[3] > 0 > delta[2]


@pytest.mark.slow
def test_micro_batches_match_one_batch_with_host_advantages(model):
    """seq-mean-token-mean counts sequences: with whole-batch advantages merged on the host, two interleaved
    micro-batches on a 2-device mesh give the loss, count and gradient of one unsharded full batch."""
    batch = rollout_batch(model, [1, 0, 0.5, 0], comp_lens=[4, 1, 3, 2], old_noise=0.2)
    args = PG.PolicyGradientArgs(loss_mode="grpo", dynamic_sampling=True)
    batch.update(PG.host_advantages(batch, args))
    loss_fn = lambda m, b, rng: PG.policy_gradient_loss(m, b, rng, args)  # noqa: E731
    opt = optax.sgd(0.1)
    mesh = M.make_mesh(2, 1, 1, devices=jax.devices()[:2])  # and the batch sharded over two data shards
    _, state = init_train_state(model, opt, mesh=mesh)
    step = make_train_step(model, opt, loss_fn, mesh=mesh, micro_batches=2, donate=False)
    _, metrics = step(state, M.put_batch(batch, mesh))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def whole(p):  # the full-batch loss, gradient and clip fraction
        def f(q):
            ls, c, aux = loss_fn(nnx.merge(graphdef, q, rest), batch, None)
            return ls / c, (c, aux["clip_frac"][0] / aux["clip_frac"][1])

        (value, (count, clip)), g = jax.value_and_grad(f, has_aux=True)(p)
        return value, count, clip, optax.tree.norm(g)

    for k, v in zip(("loss", "count", "clip_frac", "grad_norm"), whole(params)):
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert float(metrics["count"]) == 4 and float(metrics["clip_frac"]) > 0


def test_registration_and_arguments():
    entry = OBJECTIVES.entry("policy_gradient")
    assert entry.spec.data == "rollout" and entry.spec.models == ("reference",)
    args = OBJECTIVES.parse_args("policy_gradient", {"loss_mode": "dapo", "eps_high": 0.3, "kl_coef": 0}, "a")
    assert args.loss_mode == "dapo" and args.eps_high == 0.3 and args.drop_zero_variance
    assert args.resolve("dapo").eps_low == 0.2 and args.resolve("dapo").aggregation == "token-mean"
    with pytest.raises(ConfigError, match="loss_mode"):
        OBJECTIVES.parse_args("policy_gradient", {"loss_mode": "trpo"}, "a")
    with pytest.raises(ConfigError, match="advantage_estimator"):
        PG.PolicyGradientArgs(advantage_estimator="gae")
    assert dataclasses.replace(args, dynamic_sampling=False).drop_zero_variance is False
    with pytest.raises(ConfigError, match="old_logprobs"):
        PG.policy_gradient_loss(None, {"tokens": np.zeros((1, 2), np.int32)}, None)
