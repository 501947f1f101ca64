"""LenVM (train/objectives/lenvm.py, spec §11): targets, TD identity, GAE limits, value<->length readout, the
objective on a tiny LengthValueModel and convergence on a constant-length toy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtok.models import Decoder, presets
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.train.objectives import lenvm as L

V, EOS = 16, 2


def _toy_batch():
    """Row 0: 1 pad + 2 prompt tokens, completion (7, 8, EOS), pad. Row 1: 3 prompt tokens, completion (9, EOS),
    2 pads. Row 2: truncated (no EOS). Row 3: no completion."""
    tokens = np.array([[0, 5, 6, 7, 8, EOS, 0],
                       [4, 5, 6, 9, EOS, 0, 0],
                       [4, 5, 6, 7, 8, 9, 10],
                       [4, 5, 6, 0, 0, 0, 0]], np.int32)
    valid = np.array([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0], [1] * 7, [1, 1, 1, 0, 0, 0, 0]], bool)
    loss_mask = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1], [0] * 7], bool)
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask,
            "positions": np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)}


def test_value_length_readout():
    g = 0.5
    np.testing.assert_allclose(L.length_to_value(np.array([0, 1, 3]), g), [0.0, -0.5, -0.875], rtol=1e-6)
    n = np.array([0.0, 1.0, 7.0, 123.0])
    np.testing.assert_allclose(L.value_to_length(L.length_to_value(n, 0.997), 0.997), n, rtol=1e-4, atol=1e-3)
    v = np.array([0.0, -0.1, -0.5, -0.9])
    np.testing.assert_allclose(L.length_to_value(L.value_to_length(v, 0.9), 0.9), v, rtol=1e-5, atol=1e-6)
    assert np.isfinite(float(L.value_to_length(-1.0, 0.9)))  # clamped, not inf


def test_closed_form_targets_and_td_identity():
    b = _toy_batch()
    g = 0.9
    target, mask, remaining = L.lenvm_targets(b["loss_mask"], b["tokens"], g, eos_id=EOS)
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0], [0] * 7, [0] * 7])
    np.testing.assert_array_equal(np.where(mask, remaining, -1)[0], [-1, -1, 3, 2, 1, 0, -1])
    np.testing.assert_allclose(target[0, 2:6], [-(1 - g**3), -(1 - g**2), -(1 - g), 0.0], rtol=1e-6)
    np.testing.assert_allclose(target[1, 2:5], [-(1 - g**2), -(1 - g), 0.0], rtol=1e-6)
    # TD identity V_t = r + γ V_{t+1} along each valued span, r = −(1 − γ)
    t = np.asarray(target)
    for row, (a, e) in ((0, (2, 5)), (1, (2, 4))):
        np.testing.assert_allclose(t[row, a:e], -(1 - g) + g * t[row, a + 1:e + 1], rtol=1e-6, atol=1e-7)
    # eos_id None: the truncated row is valued as if its last token ended it
    _, mask_any, rem = L.lenvm_targets(b["loss_mask"], b["tokens"], g, eos_id=None)
    np.testing.assert_array_equal(mask_any[2], [0, 0, 1, 1, 1, 1, 1])
    assert int(rem[2, 2]) == 4


def test_gae_limits():
    b = _toy_batch()
    g = 0.8
    target, mask, remaining = L.lenvm_targets(b["loss_mask"], b["tokens"], g, eos_id=EOS)
    v_old = -np.random.default_rng(0).uniform(0, 1, mask.shape)
    np.testing.assert_allclose(L.gae_targets(v_old, mask, g, 1.0), target, atol=1e-6)  # λ = 1: closed form
    td0 = np.asarray(L.gae_targets(v_old, mask, g, 0.0))  # λ = 0: one-step TD target r + γ v_{t+1}, v_EOS = 0
    np.testing.assert_allclose(td0[0, 2:5], -(1 - g) + g * np.append(v_old[0, 3:5], 0.0), rtol=1e-6)
    assert td0[0, 5] == 0.0 and np.all(td0[~np.asarray(mask)] == 0.0)


@pytest.fixture(scope="module")
def lvm():
    """Value models in γ 0.9 (the objective tests) and γ 0.8 (the toy), one backbone."""
    dec = Decoder(presets.get("tiny_draft", vocab_size=V), rngs=nnx.Rngs(0))
    model = L.with_value_head(dec, L.LenVMArgs(gamma=0.9), nnx.Rngs(1))
    np.testing.assert_allclose(model(jnp.ones((1, 3), jnp.int32)).logits, dec(jnp.ones((1, 3), jnp.int32)).logits)
    assert model.gamma == 0.9
    return {0.9: model, 0.8: L.with_value_head(dec, L.LenVMArgs(gamma=0.8), nnx.Rngs(1))}


def test_objective_value_and_count(lvm):
    lvm = lvm[0.9]
    b = _toy_batch()
    for args in (L.LenVMArgs(gamma=0.9), L.LenVMArgs(gamma=0.9, loss="bce")):
        loss_sum, count, aux = jax.jit(lambda x, a=args: L.lenvm_loss(lvm, x, None, a))(b)
        target, mask, _ = L.lenvm_targets(b["loss_mask"], b["tokens"], 0.9, EOS)
        raw = np.asarray(lvm.raw_values(b["tokens"], positions=b["positions"], valid=b["valid"]))
        pred = -1 / (1 + np.exp(-raw))
        m = np.asarray(mask)
        if args.loss == "huber":  # |pred − target| < 1: Huber is ½ (pred − target)²
            expected = 0.5 * np.sum(((pred - target) ** 2)[m])
        else:
            y = -np.asarray(target)
            expected = np.sum((np.logaddexp(0, raw) - y * raw)[m])
        assert float(count) == 7
        np.testing.assert_allclose(loss_sum, expected, rtol=1e-5)
        assert float(aux["finished_rows"][0]) == 2
    with pytest.raises(ConfigError, match="value head"):
        L.lenvm_loss(Decoder(presets.get("tiny_draft", vocab_size=V), rngs=nnx.Rngs(0)), b, None)
    with pytest.raises(ConfigError, match="gamma"):
        L.lenvm_loss(lvm, b, None, L.LenVMArgs(gamma=0.8))


def test_constant_length_toy_converges(lvm):
    """Every completion has 5 tokens ending in EOS: Adam on the LenVM loss fits −(1 − γ^n) and the readout gives
    the remaining lengths."""
    rng = np.random.default_rng(0)
    B, P, N = 8, 3, 5
    tokens = np.concatenate([rng.integers(4, V, (B, P)), rng.integers(4, V, (B, N - 1)), np.full((B, 1), EOS)], 1)
    loss_mask = np.zeros((B, P + N), bool)
    loss_mask[:, P:] = True
    batch = {"tokens": tokens.astype(np.int32), "loss_mask": loss_mask, "valid": np.ones_like(loss_mask),
             "positions": np.tile(np.arange(P + N, dtype=np.int32), (B, 1))}
    args = L.LenVMArgs(gamma=0.8)
    graphdef, params, rest = nnx.split(lvm[0.8], nnx.Param, ...)
    opt = optax.adam(1e-2)

    def loss(p):
        s, c, _ = L.lenvm_loss(nnx.merge(graphdef, p, rest), batch, None, args)
        return s / c

    @jax.jit
    def train(p):
        def body(carry, _):
            p, o = carry
            g = jax.grad(loss)(p)
            u, o = opt.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=150)
        return p

    trained = nnx.merge(graphdef, train(params), rest)
    n_pred = np.asarray(trained.remaining_length(batch["tokens"], positions=batch["positions"]))
    np.testing.assert_allclose(n_pred[:, P - 1:], np.tile(np.arange(N, -1, -1), (B, 1)), atol=0.3)


def test_registration():
    entry = OBJECTIVES.entry("lenvm")
    assert entry.spec.data == "rollout" and entry.spec.models == ("teacher",)
    assert entry.spec.wrap_model is L.with_value_head
    with pytest.raises(ConfigError, match="gamma"):
        OBJECTIVES.parse_args("lenvm", {"gamma": 1.0}, "a")
    with pytest.raises(ConfigError, match="loss"):
        L.LenVMArgs(loss="mse")
    assert math.isclose(OBJECTIVES.parse_args("lenvm", {"lam": 0.95}, "a").lam, 0.95)
