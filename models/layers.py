"""The weight building blocks shared by the decoder (:mod:`jaxtok.models.transformer`) and its mixture-of-experts
layer (:mod:`jaxtok.models.moe`): a flattened 2-D matmul :func:`dense` (with a wide-output variant whose backward
runs in the operands' dtype) and the parameter constructor :func:`_param` with its logical sharding axes."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """``x [..., *in] · w [*in, *out] -> [..., *out]``: the trailing ``n_in`` axes of ``x`` contracted with the leading
    ``n_in`` axes of ``w`` as ONE 2-D matmul ``[M, K] @ [K, N]`` (leading axes and the in/out axes flattened).

    Same values as ``jnp.einsum("btd,dhn->bthn", ...)``, but its gradient dots contract a single axis: the einsum's
    weight gradient contracts two axes (b, t), which XLA:CPU lowers far slower than a 2-D matmul (whole ``small``
    model forward+backward 1204 → 830 ms, ``scripts/dense_vs_einsum.py``; docs/results/dense_vs_einsum.json). On
    TPU/GPU the reshapes are layout no-ops."""
    lead, inner = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    if w.shape[:n_in] != inner:
        raise ValueError(f"dense: x's trailing axes {inner} do not match w's leading axes {w.shape[:n_in]}")
    k = int(np.prod(inner))
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != x.dtype == w.dtype:
        y = _dot_wide_out(x2, w2, jnp.dtype(preferred_element_type))  # float32 logits from bfloat16 operands
    else:
        y = jnp.dot(x2, w2, preferred_element_type=preferred_element_type)
    return y.reshape(lead + w.shape[n_in:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_wide_out(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """``x [M, K] @ w [K, N]`` accumulated and returned in the wider ``out_dtype`` (float32 logits from bfloat16
    operands). The backward pass casts the cotangent to the operands' dtype first, so both gradient matmuls run in
    the compute dtype like the forward one (with a float32 cotangent they would be float32 matmuls, e.g. the LM
    head's backward in mixed precision). Gradients come out in the operands' dtypes."""
    return jnp.dot(x, w, preferred_element_type=out_dtype)


def _dot_wide_out_fwd(x, w, out_dtype):
    return _dot_wide_out(x, w, out_dtype), (x, w)


def _dot_wide_out_bwd(out_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)  # [M, N]
    return jnp.dot(g, w.T), jnp.dot(x.T, g)


_dot_wide_out.defvjp(_dot_wide_out_fwd, _dot_wide_out_bwd)


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: Optional[float] = None, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dtype)
    return nnx.Param(value, logical_axes=axes)
