"""Mesh construction and logical-axis sharding rules (DESIGN.md, principle 4).

Parameters and activations name their dimensions with *logical* axes (``"vocab"``, ``"embed"``, ``"heads"``,
``"batch"``, ...). One rules table maps logical axes to the mesh axes ``data``, ``fsdp``, ``tensor``; changing the
parallelism layout means changing the table, never the model code.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
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
)

_ACTIVE: contextvars.ContextVar[Optional[tuple[Mesh, tuple]]] = contextvars.ContextVar("jaxtok_mesh", default=None)


def logical_to_spec(logical_axes: Sequence[Optional[str]], rules=DEFAULT_RULES, mesh: Optional[Mesh] = None) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec`` through ``rules``.

    A mesh axis is used at most once per spec (first logical axis wins); mesh axes of size 1 or absent from
    ``mesh`` are dropped so specs stay valid on any mesh shape.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for a in axes:
            if a in used or (mesh is not None and (a not in mesh.shape or mesh.shape[a] == 1)):
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
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh)))
