"""Mesh construction and logical-axis sharding rules (DESIGN.md, principle 4).

Parameters and activations name their dimensions with *logical* axes (``"vocab"``, ``"embed"``, ``"heads"``,
``"batch"``, ...). One rules table maps logical axes to the mesh axes ``data``, ``fsdp``, ``tensor``; changing the
parallelism layout means changing the table, never the model code.

Mixture-of-experts models add the mesh axis ``expert`` (``make_mesh(..., expert=n)``; absent when n = 1, so dense
meshes keep their three axes): the stacked expert weights' logical ``expert`` axis is split over it, and the batch
is split over it too (data parallel outside the expert layers).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxtok.registry import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
EXPERT_MESH_AXES = ("data", "fsdp", "expert", "tensor")  # make_mesh(..., expert > 1)

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("kv_length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("expert", "expert"),
)

_ACTIVE: contextvars.ContextVar[Optional[tuple[Mesh, tuple]]] = contextvars.ContextVar("jaxtok_mesh", default=None)


def logical_to_spec(
    logical_axes: Sequence[Optional[str]],
    rules=DEFAULT_RULES,
    mesh: Optional[Mesh] = None,
    shape: Optional[Sequence[int]] = None,
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec`` through ``rules``.

    A mesh axis is used at most once per spec (first logical axis wins); mesh axes of size 1 or absent from
    ``mesh`` are dropped so specs stay valid on any mesh shape. With ``shape``, a mesh axis that does not divide
    the dimension (e.g. 1 kv head on a tensor axis of 2, a vocabulary of 61) is dropped too: that dimension is
    replicated over it instead.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for a in axes:
            if a in used or (mesh is not None and (a not in mesh.shape or mesh.shape[a] == 1)):
                continue
            if shape is not None and mesh is not None and shape[i] % (math.prod(mesh.shape[b] for b in keep) * mesh.shape[a]):
                continue
            keep.append(a)
            used.add(a)
        out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return PartitionSpec(*out)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """Activate ``mesh`` and ``rules`` so :func:`constrain` annotates activations inside model code."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names; a no-op outside :func:`axis_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, x.shape)))


# ----------------------------------------------------------------------------------------------------------------
# Mesh construction, placement, multi-host
# ----------------------------------------------------------------------------------------------------------------


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, expert: int = 1, devices=None,
              axis_type: str = "auto") -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all (global) devices; one degree may be -1 = fill the rest. With
    ``expert`` > 1 the mesh is ``(data, fsdp, expert, tensor)`` (expert parallelism for MoE models).

    ``axis_types`` is always passed: ``auto`` (GSPMD propagates shardings from the declared params/batches and the
    :func:`constrain` hints) or ``explicit`` (sharding in types).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    degrees = {"data": data, "fsdp": fsdp, "tensor": tensor}
    if expert != 1:
        degrees["expert"] = expert
    for name, d in degrees.items():
        if d == 0 or d < -1:
            raise ConfigError(f"mesh.{name}={d}: a degree is a positive integer or -1 (fill)")
    fill = [k for k, d in degrees.items() if d == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh: only one axis may be -1 (fill), got {fill}")
    fixed = math.prod(d for d in degrees.values() if d != -1)
    ep = f" expert={expert}" if "expert" in degrees else ""
    if n % fixed:
        raise ConfigError(f"mesh: data={data} fsdp={fsdp} tensor={tensor}{ep} (product of fixed degrees {fixed}) does "
                         f"not divide the {n} available devices")
    if fill:
        degrees[fill[0]] = n // fixed
    elif fixed != n:
        raise ConfigError(f"mesh: data={data} x fsdp={fsdp} x tensor={tensor}{ep.replace(' ', ' x ')} = {fixed} != {n} "
                         f"available devices (set one degree to -1 to fill)")
    kinds = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
    if axis_type not in kinds:
        raise ValueError(f"axis_type={axis_type!r}: allowed {sorted(kinds)}")
    axes = EXPERT_MESH_AXES if "expert" in degrees else MESH_AXES
    shape = tuple(degrees[a] for a in axes)
    return jax.make_mesh(shape, axes, axis_types=(kinds[axis_type],) * len(axes), devices=devices)


def mesh_from_config(section) -> Mesh:
    """The mesh of a config ``MeshSection`` (``data``, ``fsdp``, ``tensor``, and ``expert`` if it has one)."""
    return make_mesh(section.data, section.fsdp, section.tensor, expert=getattr(section, "expert", 1))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(model_or_state, mesh: Mesh, rules=DEFAULT_RULES):
    """Shardings for every leaf of a model's state (or any pytree holding ``nnx.Variable`` nodes).

    A Variable with ``logical_axes`` metadata gets ``NamedSharding(mesh, logical_to_spec(axes))``; any other leaf
    (optimizer counters, a Variable without axes) is replicated. The result is a prefix tree of the input (one
    sharding where each Variable sits), usable as ``jit`` in/out shardings and with :func:`place`.
    """
    tree = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if _is_variable(x):
            axes = x.get_metadata().get("logical_axes")
            if axes is None:
                return replicated
            shape = tuple(getattr(x.get_value(), "shape", ()))
            if len(axes) != len(shape):
                raise ValueError(f"logical_axes={axes} do not match a variable of shape {shape}")
            return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))
        return replicated

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of batch arrays ``[B, ...]``: the leading axis over the rules' ``batch`` mesh axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules, mesh))


def _put_leaf(x, sharding):
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the same full value; each fills its addressable shards
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(tree, shardings):
    """Put every array of ``tree`` on ``shardings`` (a prefix tree); works across processes when every process
    holds the same full host value."""
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _put_leaf(x, s), sub), shardings, tree,
                        is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Place ``model``'s variables as their ``logical_axes`` declare (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, place(state, param_shardings(state, mesh, rules)))
    return model


def put_batch(batch: dict, mesh: Optional[Mesh], rules=DEFAULT_RULES) -> dict:
    """A host batch (the full global batch, the same on every process) as global arrays sharded on ``batch``."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return place(batch, batch_sharding(mesh, rules))


_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


def initialize_distributed(section=None) -> bool:
    """Multi-host start-up: ``jax.distributed.initialize`` from a ``MeshSection`` or the environment.

    Values come from the section (``coordinator_address``, ``num_processes``, ``process_id``) or else from
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. With ``section.distributed`` true and no
    values at all, JAX's cluster auto-detection (TPU pods, SLURM, ...) is used. A no-op (returns False) for a single
    process or when already initialized. Must run before any other JAX call that touches devices.
    """
    kw = {k: (getattr(section, k, None) if section is not None else None) for k in _ENV}
    for k, env in _ENV.items():
        if kw[k] is None and os.environ.get(env):
            kw[k] = os.environ[env] if k == "coordinator_address" else int(os.environ[env])
    wanted = bool(getattr(section, "distributed", False)) or kw["coordinator_address"] is not None
    if not wanted or (kw["num_processes"] is not None and kw["num_processes"] <= 1):
        return False
    if jax.distributed.is_initialized():
        return False
    if jax.config.jax_platforms in (None, "", "cpu") or jax.config.jax_platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in kw.items() if v is not None})
    return True
