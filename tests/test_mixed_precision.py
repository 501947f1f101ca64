"""Mixed precision (model.dtype=bfloat16, model.param_dtype=float32): float32 master weights, gradients and optimizer
state; bfloat16 matmuls forward and backward; the loss curve follows the float32 one; float16 is refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtok.config import ConfigError, from_dict
from jaxtok.models import Decoder
from jaxtok.train.objectives.sft import sft_loss
from jaxtok.train.step import init_train_state, make_train_step

from _worker import tiny_batch, tiny_model_config

STEPS = 12
# bf16 vs f32 losses over 12 Adam steps of the tiny model on one batch (4.95 -> 1.75): largest relative gap
# measured 7.5e-4; the tolerance leaves ~13x room
RTOL_CURVE = 1e-2


def _model(dtype):
    return Decoder(dataclasses.replace(tiny_model_config(), dtype=dtype, param_dtype="float32"), rngs=nnx.Rngs(0))


def _curve(dtype):
    model = _model(dtype)
    opt = optax.adam(3e-3)
    _, state = init_train_state(model, opt)
    step = make_train_step(model, opt, sft_loss)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, tiny_batch(0))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def curves():
    return {dt: _curve(dt) for dt in ("float32", "bfloat16")}


def test_bf16_compute_follows_the_f32_loss_curve(curves):
    f32, bf16 = curves["float32"][0], curves["bfloat16"][0]
    assert f32[-1] < 0.5 * f32[0] and bf16[-1] < 0.5 * bf16[0]  # both learn the batch
    np.testing.assert_allclose(bf16, f32, rtol=RTOL_CURVE)
    assert np.max(np.abs(bf16 - f32)) > 0  # bfloat16 really ran: not bit-identical to float32


def test_master_weights_and_optimizer_state_stay_f32(curves):
    state = curves["bfloat16"][1]
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    floats = {x.dtype for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}


def _dots(jaxpr, out):
    """``[(operand dtypes, operand ranks)]`` of every dot_general in ``jaxpr`` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append((tuple(str(v.aval.dtype) for v in eqn.invars), tuple(v.aval.ndim for v in eqn.invars)))
        for p in eqn.params.values():
            for q in (p if isinstance(p, (tuple, list)) else (p,)):
                if hasattr(q, "jaxpr") and hasattr(q, "consts"):
                    _dots(q.jaxpr, out)
                elif hasattr(q, "eqns"):
                    _dots(q, out)
    return out


def test_train_step_matmuls_run_in_bf16():
    """Every projection and LM-head matmul of the step (2-D operands, forward and both gradients) takes bfloat16
    operands; none is a float32 x float32 matmul. (The attention einsums' backward may take a float32 cotangent of
    the float32 scores: 4-D and higher operands, not checked here.)"""
    model = _model("bfloat16")
    opt = optax.adam(1e-3)
    _, state = init_train_state(model, opt)
    step = make_train_step(model, opt, sft_loss, donate=False)
    dots = _dots(jax.make_jaxpr(step)(state, tiny_batch(0)).jaxpr, [])
    matmuls = [d for d, ranks in dots if max(ranks) == 2]
    assert len(matmuls) >= 3 * 8  # forward + two gradients of 7 projections and the LM head
    assert all(d == ("bfloat16", "bfloat16") for d in matmuls), matmuls
    assert ("float32", "float32") not in [d for d, _ in dots]


def test_float16_training_is_refused():
    for key in ("dtype", "param_dtype"):
        with pytest.raises(ConfigError, match=f"model.{key}='float16': .*loss scaling"):
            from_dict({"model": {key: "float16"}})
    model = Decoder(dataclasses.replace(tiny_model_config(), dtype="float16"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="loss scaling"):
        make_train_step(model, optax.adam(1e-3), sft_loss)


def test_lora_adapters_are_f32_under_bf16_compute():
    from jaxtok.models import lora

    model = _model("bfloat16")
    lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4, targets=("q", "o")), rngs=nnx.Rngs(1))
    assert {v[...].dtype for _, v in nnx.to_flat_state(lora.lora_state(model))} == {jnp.dtype(jnp.float32)}
    out = model(jnp.zeros((1, 4), jnp.int32)).logits
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
