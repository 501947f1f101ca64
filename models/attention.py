"""Scaled dot-product attention behind one function, :func:`attend`, with interchangeable kernels.

``softmax(q kᵀ / √N + mask) v`` (Vaswani et al. 2017) with grouped-query heads (Ainslie et al. 2023: H query heads
share K key/value heads, G = H / K). jaxtok's masks are general boolean ``[B, T, S]`` arrays (causal,
bidirectional, block-causal, siblings, padding, KV-cache slots, see :func:`jaxtok.models.transformer.attention_mask`);
the caller also passes a :data:`MaskKind` saying what the mask is, so a kernel that only knows structured masks can
rebuild it without reading the array:

* ``causal``: no KV cache, ``mask[b, t, s] = (s <= t) & valid[b, s] & valid[b, t]``: causal in index order,
  which equals jaxtok's causal-in-position mask whenever positions increase along T over the valid tokens
  (default positions, left padding, every jaxtok data pipeline; not for hand-made out-of-order positions).
* ``bidirectional``: no KV cache, ``mask[b, t, s] = valid[b, s] & valid[b, t]``.
* ``general``: anything else (block-causal, siblings, a KV cache): only kernels that take the mask array itself
  can run it.

Implementations (``model.attention_impl``):

* ``xla``: the einsum / float32-softmax path (jaxtok's original code, unchanged). Every mask. CPU default.
* ``dot_product_attention``: ``jax.nn.dot_product_attention`` with ``implementation='cudnn'`` (cuDNN flash
  attention) on GPU and ``'xla'`` elsewhere. ``causal`` uses ``is_causal=True`` plus a ``[B, 1, 1, S]`` key-padding
  mask; ``bidirectional`` only the padding mask; ``general`` the full ``[B, 1, T, S]`` mask (cuDNN then applies it
  as a bias, no block skipping). cuDNN itself refuses shapes/dtypes it does not support (e.g. float32).
* ``pallas``: JAX's Pallas TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``): a static
  ``CausalMask`` / ``FullMask`` plus segment ids for padding (valid tokens segment 1, padding segment 0), GQA as
  the MQA kernel vmapped over the K key/value heads (MaxText's arrangement). ``general`` masks are refused
  (:class:`ValueError` naming the kind and the impl): a per-row dynamic mask is not what the kernel takes.
  Off TPU it runs in Pallas interpret mode (slow; for parity tests only).
* ``auto``: ``pallas`` on TPU, ``dot_product_attention`` on GPU, ``xla`` elsewhere; where the chosen kernel cannot
  take the call it falls back to ``xla`` (:func:`resolve_impl` says which): ``general`` masks on TPU, a float32
  model or a head_dim cuDNN does not take on GPU.

Rows of padding queries (fully masked) differ between kernels: ``xla`` gives them a uniform softmax over all keys,
the segment-id kernels attend padding to padding. Their outputs are never read by valid tokens (padding keys are
masked), so only the padding positions' own hidden states differ.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_IMPLS = ("auto", "xla", "dot_product_attention", "pallas")
MASK_KINDS = ("causal", "bidirectional", "general")
MaskKind = Literal["causal", "bidirectional", "general"]
_MASKED = -1e30  # finite, so a fully masked (padding) query row gives a uniform softmax instead of NaN


def _backend() -> str:
    return jax.default_backend()


def _cudnn_refusal(dtype, head_dim: Optional[int]) -> Optional[str]:
    """Why cuDNN flash attention cannot take these operands (it runs float16/bfloat16, head_dim a multiple of 8 up
    to 128), or None."""
    if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention runs bfloat16/float16 only, got {jnp.dtype(dtype)} (model.dtype)"
    if head_dim is not None and (head_dim % 8 or head_dim > 128):
        return f"cuDNN flash attention needs head_dim a multiple of 8 up to 128, got {head_dim}"
    return None


def resolve_impl(impl: str, kind: str, backend: Optional[str] = None, dtype=None,
                 head_dim: Optional[int] = None) -> str:
    """The kernel ``attend`` runs for ``impl`` on ``backend`` (default: JAX's default backend) and mask ``kind``:
    ``auto`` -> ``pallas`` on TPU (``xla`` for ``general`` masks), ``dot_product_attention`` on GPU when cuDNN
    takes the compute ``dtype`` and ``head_dim`` (else ``xla``), ``xla`` otherwise. An explicit impl that cannot
    take the call raises :class:`ValueError` naming the impl and the reason (the mask kind, the dtype)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: allowed {ATTENTION_IMPLS}")
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind {kind!r}: allowed {MASK_KINDS}")
    backend = backend or _backend()
    if impl == "auto":
        if backend == "tpu":
            return "pallas" if kind != "general" else "xla"
        if backend == "gpu" and _cudnn_refusal(dtype, head_dim) is None:
            return "dot_product_attention"
        return "xla"
    if impl == "dot_product_attention" and backend == "gpu":
        why = _cudnn_refusal(dtype, head_dim)
        if why:
            raise ValueError(f"attention_impl='dot_product_attention' on GPU: {why}; use attention_impl='auto' "
                             f"(falls back to 'xla') or 'xla'")
    if impl == "pallas" and kind == "general":
        raise ValueError(
            "attention_impl='pallas' (splash attention) takes causal or bidirectional masks with padding only; "
            "this call's mask is 'general' (block_causal / siblings attention, or a KV cache). "
            "Use attention_impl='auto' (falls back to 'xla' for such calls), 'xla' or 'dot_product_attention'.")
    return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, kind: MaskKind = "general",
           valid: Optional[jax.Array] = None, impl: str = "xla", dtype=None) -> jax.Array:
    """Grouped-query attention ``q [B, T, H, N]``, ``k, v [B, S, K, N]``, ``mask [B, T, S]`` bool -> ``[B, T, H, N]``.

    ``kind`` says what ``mask`` is (module docstring); ``valid [B, T]`` (T == S) is the token validity the
    structured kernels rebuild padding from (default: every token valid). ``dtype``: the compute dtype of the
    probabilities (default ``q.dtype``); scores and softmax statistics are float32 in every impl."""
    dt = jnp.dtype(dtype or q.dtype)
    impl = resolve_impl(impl, kind, dtype=q.dtype, head_dim=q.shape[-1])
    # Masked keys get probability 0, but 0 * NaN is NaN: zero the values of keys no query may read (stale or
    # padding cache slots may hold anything).
    v = jnp.where(jnp.any(mask, axis=1)[:, :, None, None], v, jnp.zeros((), v.dtype))
    if impl == "xla":
        return attend_xla(q, k, v, mask, dt)
    if kind != "general":
        B, T = q.shape[:2]
        if k.shape[1] != T:
            raise ValueError(f"mask kind {kind!r} needs T == S (no cache); got T={T}, S={k.shape[1]}")
        valid = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)
    if impl == "dot_product_attention":
        return attend_dot_product(q, k, v, mask, kind, valid)
    return attend_splash(q, k, v, kind, valid, interpret=_backend() != "tpu")


def attend_xla(q, k, v, mask, dt) -> jax.Array:
    """The einsum path: float32 scores ``q·k / √N``, masked to -1e30, float32 softmax cast to ``dt``, ``probs·v``."""
    B, T, H, N = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, N)
    scores = jnp.einsum("btkgn,bskn->bkgts", q, k, preferred_element_type=jnp.float32) * (N**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # [B, K, G, T, S]
    return jnp.einsum("bkgts,bskn->btkgn", probs, v).reshape(B, T, H, N)


def attend_dot_product(q, k, v, mask, kind: str, valid) -> jax.Array:
    """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU, its XLA reference elsewhere); GQA native."""
    implementation = "cudnn" if _backend() == "gpu" else "xla"
    if kind == "general":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)
    keys = valid[:, None, None, :]  # [B, 1, 1, S] key padding
    return jax.nn.dot_product_attention(q, k, v, mask=keys, is_causal=kind == "causal",
                                        implementation=implementation)


def _block(n: int) -> int:
    """The splash tile along a length ``n``: the largest of 512/256/128 dividing it (the kernel's tiles are
    multiples of the 128 TPU lanes, also in interpret mode)."""
    for b in (512, 256, 128):
        if n % b == 0:
            return b
    raise ValueError(f"attention_impl='pallas' (splash attention) needs query and key lengths that are multiples of "
                     f"128 (its tile width); got length {n}. Pad the sequence (data.seq_len) or use "
                     f"attention_impl='auto' / 'xla'.")


@functools.lru_cache(maxsize=32)
def _splash_kernel(kind: str, groups: int, T: int, S: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((T, S)) if kind == "causal" else sm.FullMask((T, S))
    mask = sm.MultiHeadMask([one] * groups)
    bq, bkv = _block(T), _block(S)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def attend_splash(q, k, v, kind: str, valid, *, interpret: bool) -> jax.Array:
    """Pallas splash attention: the MQA kernel (G query heads over one kv head) vmapped over K kv heads and B rows;
    padding as segment ids. The kernel does not scale scores, so q is scaled by 1/√N first."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, T, H, N = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    kernel = _splash_kernel(kind, G, T, S, bool(interpret))
    qh = (q * jnp.asarray(N**-0.5, q.dtype)).reshape(B, T, K, G, N).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, N]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, N]
    seg = valid.astype(jnp.int32)  # [B, T]

    def row(qb, kb, vb, sb):  # [K, G, T, N], [K, S, N], [K, S, N], [T]
        ids = sk.SegmentIds(q=sb, kv=sb)
        return jax.vmap(lambda qk, kk, vk: kernel(qk, kk, vk, segment_ids=ids))(qb, kb, vb)

    out = jax.vmap(row)(qh, kh, vh, seg)  # [B, K, G, T, N]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, N).astype(q.dtype)
