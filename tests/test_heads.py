"""Tests for jaxtok.models.heads: shapes, padding never changes valid outputs, determinism, gradients flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.mesh import logical_to_spec
from jaxtok.models.heads import PAD_LOGIT, FilterHead, MLPHead, TraceController, ValueHead

B, T, D = 2, 5, 8


@nnx.jit
def call(module, *args):
    """One compiled call instead of op-by-op dispatch (keeps the file fast on a shared CPU)."""
    return module(*args)


def _x(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _grads_nonzero(module, loss_fn):
    graphdef, params = nnx.split(module, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p))))(params)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves), "a parameter receives no gradient"


def test_value_head_shapes_linear_and_mlp():
    h = _x(0, (B, T, D))
    lin = ValueHead(D, rngs=nnx.Rngs(0))
    mlp = ValueHead(D, hidden=16, rngs=nnx.Rngs(0))
    for head in (lin, mlp):
        out = call(head, h)
        assert out.shape == (B, T) and out.dtype == jnp.float32
    # the linear head is exactly h @ w + b
    w, b = lin.mlp.out.kernel[...], lin.mlp.out.bias[...]
    np.testing.assert_allclose(call(lin, h), (h @ w)[..., 0] + b[0], rtol=1e-6, atol=1e-6)
    # per-position: a change at one position changes only that position's value
    h2 = h.at[:, 2].set(100.0)
    d = np.abs(np.asarray(call(mlp, h2) - call(mlp, h)))
    assert d[:, 2].min() > 0 and d[:, [0, 1, 3, 4]].max() == 0


def test_value_head_bf16_input_f32_output_and_grads():
    head = ValueHead(D, hidden=16, rngs=nnx.Rngs(1))
    assert call(head, _x(0, (B, T, D)).astype(jnp.bfloat16)).dtype == jnp.float32
    _grads_nonzero(head, lambda m: jnp.sum(m(_x(0, (B, T, D))) ** 2))


def test_value_head_logical_axes():
    head = ValueHead(D, hidden=16, rngs=nnx.Rngs(0))
    assert head.mlp.layers[0].kernel.get_metadata()["logical_axes"] == ("embed", None)
    assert head.mlp.out.kernel.get_metadata()["logical_axes"] == (None, None)
    for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param)):
        assert len(var.get_metadata()["logical_axes"]) == var.get_value().ndim, path


def test_mlp_head_specdec_residual_blocks():
    """SpecDec++ (§A2): x -> depth x (x + silu(W x + b)) -> Linear(D->2); blocks do not share weights."""
    head = MLPHead(D, None, 2, depth=3, residual=True, rngs=nnx.Rngs(0))
    x = _x(3, (B, T, D))
    h = x
    for layer in head.layers:
        h = h + jax.nn.silu(h @ layer.kernel[...] + layer.bias[...])
    expected = h @ head.out.kernel[...] + head.out.bias[...]
    out = call(head, x)
    assert out.shape == (B, T, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    k0, k1 = head.layers[0].kernel[...], head.layers[1].kernel[...]
    assert not np.allclose(k0, k1)
    p_accept = jax.nn.softmax(out, axis=-1)[..., 1]
    assert bool(jnp.all((p_accept > 0) & (p_accept < 1)))
    _grads_nonzero(head, lambda m: jnp.sum(jax.nn.log_softmax(m(x))[..., 1]))


def test_mlp_head_speckv_gamma_predictor():
    """SpecKV (§A3): 6 step features -> 16 ReLU -> logits over gamma in {2,4,6,8}."""
    head = MLPHead(6, 16, 4, depth=1, activation="relu", rngs=nnx.Rngs(0))
    feats = _x(4, (3, 6))
    out = call(head, feats)
    assert out.shape == (3, 4) and out.dtype == jnp.float32
    l0 = head.layers[0]
    expected = jax.nn.relu(feats @ l0.kernel[...] + l0.bias[...]) @ head.out.kernel[...] + head.out.bias[...]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    _grads_nonzero(head, lambda m: -jnp.sum(jax.nn.log_softmax(m(feats))[:, 1]))


def test_mlp_head_depth_zero_is_linear():
    head = MLPHead(D, 99, 3, depth=0, rngs=nnx.Rngs(0))
    x = _x(5, (4, D))
    assert len(head.layers) == 0
    np.testing.assert_allclose(call(head, x), x @ head.out.kernel[...] + head.out.bias[...], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_features=0, hidden=4, out_features=2), "in_features=0"),
    (dict(in_features=4, hidden=4, out_features=2, depth=-1), "depth=-1"),
    (dict(in_features=4, hidden=8, out_features=2, residual=True), "hidden=8"),
    (dict(in_features=4, hidden=4, out_features=2, activation="swish2"), "activation='swish2'"),
])
def test_mlp_head_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPHead(**kwargs, rngs=nnx.Rngs(0))


def test_heads_deterministic():
    x = _x(6, (B, T, D))
    a = ValueHead(D, hidden=8, rngs=nnx.Rngs(7))
    b = ValueHead(D, hidden=8, rngs=nnx.Rngs(7))
    c = ValueHead(D, hidden=8, rngs=nnx.Rngs(8))
    np.testing.assert_array_equal(call(a, x), call(b, x))
    np.testing.assert_array_equal(call(a, x), call(a, x))
    assert not np.allclose(call(a, x), call(c, x))
    f1 = TraceController(3, d_model=8, num_heads=2, num_layers=1, rngs=nnx.Rngs(3))
    f2 = TraceController(3, d_model=8, num_heads=2, num_layers=1, rngs=nnx.Rngs(3))
    feats, ids = _x(1, (B, T, 3)), jnp.zeros((B, T), jnp.int32)
    np.testing.assert_array_equal(call(f1, feats, ids).logits, call(f2, feats, ids).logits)


# ---------------------------------------------------------------- Learn2PD filter

L = 6


def test_filter_head_shapes_and_padding():
    head = FilterHead(L, hidden=16, rngs=nnx.Rngs(0))
    conf = jax.nn.sigmoid(_x(0, (B, L)))
    out = call(head, conf)
    assert out.shape == (B, L) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, call(head, conf[..., None]))
    # the filter sees the whole block: changing one position's confidence moves other positions' logits
    assert np.abs(np.asarray(call(head, conf.at[:, 0].set(0.99)) - out))[:, 1:].max() > 0
    # padding (block past the sequence end): garbage there never changes valid outputs
    valid = jnp.array([[True] * L, [True] * 4 + [False] * 2])
    clean = call(head, jnp.where(valid, conf, 0.0), valid)
    for garbage in (jnp.nan, 1e30, -7.0):
        dirty = call(head, jnp.where(valid, conf, garbage), valid)
        np.testing.assert_array_equal(dirty, clean)
    assert bool(jnp.all(clean[1, 4:] == PAD_LOGIT))
    np.testing.assert_array_equal(clean[0], out[0])
    y = (conf > 0.5).astype(jnp.float32)
    _grads_nonzero(head, lambda m: jnp.sum(bce_with_logits(m(conf), y)))


def bce_with_logits(logits, labels):
    return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def test_filter_head_bad_shape():
    head = FilterHead(L, hidden=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_size=6"):
        head(jnp.zeros((B, L + 1)))
    with pytest.raises(ValueError, match="block_size=0"):
        FilterHead(0, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- TraceLock controller

F = 3


def _controller(layers=2):
    return TraceController(F, d_model=16, num_heads=4, num_layers=layers, ffn=24, rngs=nnx.Rngs(0))


def test_trace_controller_shapes_and_commit_logits():
    for layers in (1, 2):
        ctl = _controller(layers)
        feats, ids = _x(0, (B, T, F)), jax.random.randint(jax.random.key(1), (B, T), 0, 4)
        out = call(ctl, feats, ids)
        assert out.logits.shape == (B, T) and out.threshold_logit.shape == (B,)
        assert out.logits.dtype == jnp.float32
        np.testing.assert_allclose(out.commit_logits, out.logits - out.threshold_logit[:, None], rtol=1e-6)
        # bidirectional encoder: a later position's state changes earlier logits
        changed = call(ctl, feats, ids.at[:, -1].set((ids[:, -1] + 1) % 4))
        assert np.abs(np.asarray(changed.logits[:, 0] - out.logits[:, 0])).min() > 0


def test_trace_controller_padding_garbage_and_left_padding():
    """Garbage in padding never changes valid outputs; left and right padding give the same valid outputs."""
    ctl = _controller()
    n = 3
    feats, ids = _x(2, (1, n, F)), jnp.array([[0, 2, 1]], jnp.int32)
    ref = call(ctl, feats, ids)  # unpadded, length 3
    pad = T - n
    junk_f = jnp.full((1, pad, F), jnp.nan)
    junk_i = jnp.full((1, pad), 99, jnp.int32)  # out-of-range ids in padding are never read
    right = ctl(jnp.concatenate([feats, junk_f], 1), jnp.concatenate([ids, junk_i], 1),
                jnp.arange(T)[None] < n)
    left = call(ctl, jnp.concatenate([junk_f * -1e30, feats], 1), jnp.concatenate([junk_i, ids], 1),
               jnp.arange(T)[None] >= pad)
    np.testing.assert_allclose(right.logits[:, :n], ref.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(left.logits[:, pad:], ref.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(right.threshold_logit, ref.threshold_logit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(left.threshold_logit, ref.threshold_logit, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(right.logits[:, n:] == PAD_LOGIT)) and bool(jnp.all(left.logits[:, :pad] == PAD_LOGIT))
    assert bool(jnp.all(right.commit_logits[:, n:] == PAD_LOGIT))
    # a batch mixing both rows gives the same per-row results (no leakage across rows)
    both = call(ctl, jnp.concatenate([jnp.concatenate([feats, junk_f], 1), jnp.concatenate([junk_f, feats], 1)]),
               jnp.concatenate([jnp.concatenate([ids, junk_i], 1), jnp.concatenate([junk_i, ids], 1)]),
               jnp.stack([jnp.arange(T) < n, jnp.arange(T) >= pad]))
    np.testing.assert_allclose(both.logits[0, :n], ref.logits[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both.logits[1, pad:], ref.logits[0], rtol=1e-5, atol=1e-5)


def test_trace_controller_grads_jit_and_errors():
    ctl = _controller()
    feats, ids = _x(3, (B, T, F)), jnp.full((B, T), 2, jnp.int32)
    valid = jnp.array([[True] * T, [True] * 3 + [False] * 2])
    y = jnp.array([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0]], jnp.float32)

    def loss(m):
        out = m(feats, ids, valid)
        return jnp.sum(jnp.where(valid, bce_with_logits(out.commit_logits, y), 0.0))

    _grads_nonzero(ctl, loss)
    graphdef, state = nnx.split(ctl)
    jitted = jax.jit(lambda s, f, i, v: nnx.merge(graphdef, s)(f, i, v).logits)
    np.testing.assert_allclose(jitted(state, feats, ids, valid), call(ctl, feats, ids, valid).logits,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="state_ids: token id 4"):
        ctl(feats, ids.at[0, 1].set(4))
    with pytest.raises(ValueError, match="features: shape"):
        ctl(feats[..., :2], ids)
    with pytest.raises(ValueError, match="num_heads=3"):
        TraceController(F, d_model=16, num_heads=3, rngs=nnx.Rngs(0))


def test_head_params_map_to_valid_specs():
    """Every head parameter has logical_axes of its rank; internal widths are replicated."""
    for head in (ValueHead(D, hidden=4, rngs=nnx.Rngs(0)), MLPHead(D, None, 2, 2, residual=True, in_axis="embed",
                 rngs=nnx.Rngs(0)), FilterHead(L, rngs=nnx.Rngs(0)), _controller()):
        for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param)):
            axes = var.get_metadata()["logical_axes"]
            assert len(axes) == var.get_value().ndim, path
            spec = logical_to_spec(axes)
            assert len(spec) == len(axes)


@pytest.mark.parametrize("kind, ctor", [
    ("specdecpp", {"hidden_size": D, "depth": 2}),
    ("speckv", {"hidden": 4}),
    ("learn2pd_filter", {"block_size": 4, "hidden": 8, "num_features": 1, "depth": 1}),
    ("tracelock_controller", {"in_features": 3, "d_model": 8, "num_heads": 2, "num_layers": 1}),
])
def test_head_files_round_trip_every_kind(kind, ctor, tmp_path):
    """``save_head`` -> ``load_head`` rebuilds every kind with identical parameters; the kind's policy slot names
    the diffusion heads (``load_policy_heads``)."""
    from jaxtok.models.heads import HEAD_KINDS, build_head, head_kind, load_head, load_policy_heads, save_head

    head = build_head(kind, seed=3, **ctor)
    save_head(head, tmp_path, kind, **ctor)
    assert head_kind(tmp_path) == kind
    again = load_head(tmp_path, kinds=(kind,))
    for a, b in zip(jax.tree.leaves(nnx.state(head, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    assert list(load_policy_heads(tmp_path)) == [HEAD_KINDS[kind].slot]
    other = "speckv" if kind != "speckv" else "specdecpp"
    with pytest.raises(ValueError, match=f"kind={kind!r}"):
        load_head(tmp_path, kinds=(other,))


def test_head_files_errors(tmp_path):
    from jaxtok.models.heads import load_head, save_head, speckv_head

    with pytest.raises(FileNotFoundError, match="head_path=.*head.json"):
        load_head(tmp_path / "none")
    with pytest.raises(ValueError, match="kind='value'"):
        save_head(speckv_head(4), tmp_path / "v", "value", hidden=4)
    save_head(speckv_head(4), tmp_path / "kv", "speckv", hidden=8)  # constructor arguments that do not fit
    with pytest.raises(ValueError, match="lacks parameters|shape"):
        load_head(tmp_path / "kv")
