"""jaxtok.mesh: mesh construction, logical-axis rules, params and batches really sharded as declared."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from jaxtok import mesh as M
from jaxtok.models import Decoder
from jaxtok.train.step import init_train_state

from _worker import tiny_batch, tiny_model_config


def test_make_mesh_fill_and_axis_types():
    mesh = M.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert M.make_mesh(axis_type="explicit").axis_types == (AxisType.Explicit,) * 3
    assert dict(M.make_mesh(1, -1, 1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("kw, match", [
    (dict(data=3), "does not divide the 8"),
    (dict(data=2, fsdp=2, tensor=1), "!= 8 available"),
    (dict(data=-1, fsdp=-1), "only one axis"),
    (dict(data=0), "mesh.data=0"),
])
def test_make_mesh_errors(kw, match):
    from jaxtok.registry import ConfigError

    with pytest.raises(ConfigError, match=match):  # a user's mesh settings: exit 2 with the message
        M.make_mesh(**kw)


def test_logical_to_spec_rules():
    mesh = M.make_mesh(2, 2, 2)
    assert M.logical_to_spec(("batch", "length"), mesh=mesh) == P(("data", "fsdp"), None)
    assert M.logical_to_spec(("embed", "heads", "head_dim"), mesh=mesh) == P("fsdp", "tensor", None)
    # a mesh axis is used once per spec: "vocab" takes tensor, so "mlp" stays replicated
    assert M.logical_to_spec(("vocab", "mlp"), mesh=mesh) == P("tensor", None)
    # size-1 mesh axes are dropped
    assert M.logical_to_spec(("batch", "embed"), mesh=M.make_mesh(8, 1, 1)) == P("data", None)
    # dimensions a mesh axis does not divide are replicated over it (vocab 61, one kv head)
    assert M.logical_to_spec(("vocab", "embed"), mesh=mesh, shape=(61, 32)) == P(None, "fsdp")
    assert M.logical_to_spec(("embed", "kv_heads", None), mesh=mesh, shape=(32, 1, 8)) == P("fsdp", None, None)
    assert M.logical_to_spec(("batch",), mesh=mesh, shape=(2,)) == P("data")


def _shard_shape(x):
    return x.addressable_shards[0].data.shape


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_params_and_batches_sharded_as_declared(shape):
    mesh = M.make_mesh(*shape)
    data, fsdp, tensor = shape
    model = M.shard_model(Decoder(tiny_model_config(), rngs=nnx.Rngs(0)), mesh)
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    q = attn.q_weight_dhn.get_value()  # [D=32, H=4, N=8] ("embed", "heads", "head_dim")
    assert _shard_shape(q) == (32 // fsdp, 4 // tensor, 8)
    emb = model.embed_vd.get_value()  # [V=64, D=32] ("vocab", "embed")
    assert _shard_shape(emb) == (64 // tensor, 32 // fsdp)
    assert _shard_shape(mlp.down_weight_fd.get_value()) == (64 // tensor, 32 // fsdp)
    assert _shard_shape(model.final_norm.weight.get_value()) == (32 // fsdp,)
    expected = M.logical_to_spec(("embed", "heads", "head_dim"), mesh=mesh, shape=q.shape)
    assert q.sharding.spec == expected and q.sharding.mesh == mesh

    batch = M.put_batch(tiny_batch(), mesh)
    for x in batch.values():
        assert x.sharding.spec == M.batch_sharding(mesh).spec
        assert _shard_shape(x) == (8 // (data * fsdp), 12)
        assert len({s.device for s in x.addressable_shards}) == 8


def test_optimizer_state_follows_param_shardings():
    mesh = M.make_mesh(2, 2, 2)
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
    _, state = init_train_state(model, optax.adam(1e-3), mesh=mesh)
    adam = state.opt_state[0]
    for p, mu, nu in zip(jax.tree.leaves(state.params), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
        assert mu.sharding == p.sharding == nu.sharding
    assert adam.count.sharding.spec == P()
    assert state.params["layers"][0]["attn"]["q_weight_dhn"].get_value().sharding.spec == P("fsdp", "tensor", None)


def test_place_keeps_values():
    mesh = M.make_mesh(2, 2, 2)
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
    M.shard_model(model, mesh)
    for a, b in zip(before, jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_constrain_is_noop_outside_rules_and_applies_inside():
    mesh = M.make_mesh(2, 2, 2)
    x = np.ones((8, 4, 6), np.float32)
    assert M.constrain(x, ("batch", "length", "act_mlp")) is x

    @jax.jit
    def f(x):
        with M.axis_rules(mesh):
            return M.constrain(x * 2, ("batch", "length", "act_mlp"))

    out = f(x)
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")


def test_initialize_distributed_single_process_is_noop(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert M.initialize_distributed(None) is False

    class Section:
        distributed = True
        coordinator_address = "localhost:1"
        num_processes = 1
        process_id = 0

    assert M.initialize_distributed(Section()) is False
    assert jax.process_count() == 1
