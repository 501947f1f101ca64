"""Masked-diffusion (mdlm) and block-diffusion (bd3lm) objectives: hand-computed tail fills and masks, the all-masked
limit against a direct forward, the Dream shift, bd3lm's single-block limit and its per-block copies, empty
selections, and a few train steps through make_train_step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtok.models import Decoder, presets
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.train.objectives.mdlm import (BD3LMArgs, MDLMArgs, bd3lm_loss, fill_tail, loss_region, mask_tokens,
                                          mdlm_loss)
from jaxtok.train.step import init_train_state, make_train_step

ALL = 1.0 - 1e-7  # t_min this close to 1: every token of the loss region is masked, weight 1/t ~= 1


def tiny(**kw):
    cfg = presets.get("tiny_diffusion", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, **kw)
    return Decoder(cfg, rngs=nnx.Rngs(0))


def batch():
    tokens = jnp.array([[1, 11, 21, 12, 25, 13, 2, 0, 0, 0],
                        [1, 12, 25, 13, 14, 2, 0, 0, 0, 0]], jnp.int32)
    valid = tokens != 0
    loss_mask = jnp.array([[0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
                           [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]], bool)
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask,
            "positions": jnp.maximum(jnp.cumsum(valid, 1) - 1, 0).astype(jnp.int32)}


def manual_ce(model, inputs, targets, scored, *, valid=None, shift=False):
    logits = model(inputs, valid=valid, attention="bidirectional").logits.astype(jnp.float32)
    if shift:
        logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return float(jnp.sum(jnp.where(scored, nll, 0.0)))


def test_fill_tail_eos_and_rainbow_by_hand():
    tok = jnp.array([[1, 5, 2, 0, 0, 0], [0, 1, 6, 2, 0, 0]], jnp.int32)  # row 1 also left-padded
    valid = tok != 0
    lm = jnp.array([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]], bool)
    t, v, m = fill_tail(tok, valid, lm, "rainbow", first_id=4, num_pads=2)
    np.testing.assert_array_equal(t, [[1, 5, 2, 4, 5, 4], [0, 1, 6, 2, 4, 5]])
    np.testing.assert_array_equal(v, [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(m, [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    t, _, _ = fill_tail(tok, valid, lm, "eos", eos_id=2)
    np.testing.assert_array_equal(t, [[1, 5, 2, 2, 2, 2], [0, 1, 6, 2, 2, 2]])
    same = fill_tail(tok, valid, lm, "none")
    assert same[0] is tok and same[2] is lm


def test_loss_region_and_masking_limits():
    b = batch()
    resp = loss_region(b["valid"], b["loss_mask"], "response")
    np.testing.assert_array_equal(resp, b["loss_mask"])
    allr = loss_region(b["valid"], b["loss_mask"], "all")
    np.testing.assert_array_equal(allr, b["valid"] & (jnp.arange(10) > 0))
    noised, masked = mask_tokens(jax.random.key(0), b["tokens"], resp, jnp.ones((2, 1)), 3)
    np.testing.assert_array_equal(masked, resp)
    np.testing.assert_array_equal(noised, jnp.where(resp, 3, b["tokens"]))
    _, none = mask_tokens(jax.random.key(0), b["tokens"], resp, jnp.zeros((2, 1)), 3)
    assert not bool(none.any())


@pytest.mark.slow
@pytest.mark.parametrize("shift", [False, True])
def test_all_masked_limit_equals_direct_cross_entropy(shift):
    model, b = tiny(), batch()
    args = MDLMArgs(t_min=ALL, tail="none", shift_logits=shift)
    loss, count, aux = mdlm_loss(model, b, jax.random.key(1), args)
    region = b["loss_mask"]
    want = manual_ce(model, jnp.where(region, 3, b["tokens"]), b["tokens"], region, valid=b["valid"], shift=shift)
    assert float(count) == 5.0 and float(aux["masked_fraction"]) == 5.0
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_rainbow_tail_is_scored_with_recomputed_positions():
    model, b = tiny(), batch()
    args = MDLMArgs(t_min=ALL, tail="rainbow", rainbow_pads=7)
    loss, count, _ = mdlm_loss(model, b, jax.random.key(2), args)
    tokens, valid, lm = fill_tail(b["tokens"], b["valid"], b["loss_mask"], "rainbow")
    assert float(count) == float(lm.sum()) == 5 + 7
    np.testing.assert_allclose(float(loss), manual_ce(model, jnp.where(lm, 3, tokens), tokens, lm), rtol=1e-5)


def test_bd3lm_single_block_equals_mdlm():
    model, b = tiny(), batch()
    a = mdlm_loss(model, b, jax.random.key(3), MDLMArgs())
    c = bd3lm_loss(model, b, jax.random.key(3), BD3LMArgs(block_size=10))
    np.testing.assert_allclose(float(a[0]), float(c[0]), rtol=1e-6)
    assert float(a[1]) == float(c[1])


def test_bd3lm_blocks_see_clean_past_and_nothing_after():
    model, b = tiny(), batch()
    bs = 2
    loss, count, _ = bd3lm_loss(model, b, jax.random.key(4), BD3LMArgs(block_size=bs, t_min=ALL, tail="none"))
    tokens, region, valid = b["tokens"], b["loss_mask"], b["valid"]
    blk = b["positions"] // bs
    want = 0.0
    for k in range(5):
        inp = jnp.where((blk == k) & region, 3, tokens)
        keep = valid & (blk <= k)
        logits = model(inp, valid=keep, attention="block_causal", block_size=bs).logits
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
        want += float(jnp.sum(jnp.where((blk == k) & region, nll, 0.0)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(count) == 5.0


@pytest.mark.slow
def test_empty_region_gives_zero_loss_and_finite_grad():
    model, b = tiny(), batch()
    b = dict(b, loss_mask=jnp.zeros_like(b["loss_mask"]))
    args = MDLMArgs(tail="none")

    def f(m):
        return mdlm_loss(m, b, jax.random.key(0), args)[0]

    loss, grads = nnx.value_and_grad(f)(model)
    assert float(loss) == 0.0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_args_are_checked_and_registered():
    assert {"mdlm", "bd3lm"} <= set(OBJECTIVES.names())
    args = OBJECTIVES.parse_args("mdlm", {"tail": "rainbow", "scope": "all"}, "objective.args")
    assert args.tail == "rainbow"
    with pytest.raises(ConfigError, match="tail"):
        OBJECTIVES.parse_args("mdlm", {"tail": "zeros"}, "objective.args")
    with pytest.raises(ConfigError, match="block_size"):
        OBJECTIVES.parse_args("mdlm", {"attention": "block_causal"}, "objective.args")


def test_train_steps_reduce_the_loss():
    model, b = tiny(), batch()
    args = MDLMArgs(t_min=0.5)
    opt = optax.adam(1e-2)
    graphdef, state = init_train_state(model, opt, seed=0)
    step = make_train_step(model, opt, lambda m, bt, r: mdlm_loss(m, bt, r, args))
    losses = []
    for _ in range(15):
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3])
