"""KV cache with fixed capacity and per-row lengths.

One pytree serves every decoder in jaxtok: AR decoding appends 1 token per step, speculative verification appends
γ+1 tokens and rolls back rejected ones, block diffusion appends a whole block. Rows advance independently: row b
writes its new entries at slots ``lengths[b] ... lengths[b]+T-1``.

Stale entries (slots at or beyond a row's length, e.g. after a rollback) are never read: attention masks them by
slot index, so rollback is just a smaller ``lengths`` (nothing is copied or cleared).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys/values and the bookkeeping attention needs.

    Attributes:
      k, v: ``[L, B, S, Hkv, Dh]`` keys (after RoPE) and values, S = capacity.
      positions: ``[B, S]`` int32 position of each written entry; -1 marks a padding entry (never attended).
      lengths: ``[B]`` int32 number of written slots per row (entries at slots >= length are stale).
    """

    k: jax.Array  # [L, B, S, Hkv, Dh]
    v: jax.Array  # [L, B, S, Hkv, Dh]
    positions: jax.Array  # [B, S]
    lengths: jax.Array  # [B]

    @classmethod
    def init(cls, cfg, batch: int, capacity: int, dtype=None) -> "KVCache":
        """An empty cache for ``cfg`` (a ``ModelConfig``) holding ``capacity`` slots per row."""
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.full((batch, capacity), -1, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def rollback(self, new_lengths: jax.Array) -> "KVCache":
        """Per-row rollback: keep only the first ``new_lengths[b]`` slots of row b (stale slots are masked)."""
        new_lengths = jnp.clip(jnp.asarray(new_lengths, jnp.int32), 0, self.lengths)
        return dataclasses.replace(self, lengths=new_lengths)

    def next_positions(self) -> jax.Array:
        """``[B]`` the position the next appended token of each row takes (max written position + 1)."""
        slot = jnp.arange(self.capacity)[None, :]
        live = (slot < self.lengths[:, None]) & (self.positions >= 0)
        return jnp.max(jnp.where(live, self.positions, -1), axis=-1) + 1

    def write_positions(self, positions: jax.Array) -> "KVCache":
        """Record ``positions [B, T]`` of T new entries at each row's offset (does not advance ``lengths``)."""
        return dataclasses.replace(self, positions=_write_rows(self.positions, positions, self.lengths))

    def write_layer(self, layer: int, k: jax.Array, v: jax.Array) -> "KVCache":
        """Write ``k, v [B, T, Hkv, Dh]`` of one layer at each row's offset (does not advance ``lengths``)."""
        new_k = self.k.at[layer].set(_write_rows(self.k[layer], k.astype(self.k.dtype), self.lengths))
        new_v = self.v.at[layer].set(_write_rows(self.v[layer], v.astype(self.v.dtype), self.lengths))
        return dataclasses.replace(self, k=new_k, v=new_v)

    def advance(self, num_tokens: int | jax.Array) -> "KVCache":
        """Advance every row's length by ``num_tokens`` after a forward wrote them."""
        return dataclasses.replace(self, lengths=self.lengths + jnp.asarray(num_tokens, jnp.int32))


def _write_rows(buf: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
    """Write ``new [B, T, ...]`` into ``buf [B, S, ...]`` at per-row slot ``offsets [B]``."""

    def one(row_buf, row_new, off):
        start = (off,) + (0,) * (row_buf.ndim - 1)
        return jax.lax.dynamic_update_slice(row_buf, row_new, start)

    return jax.vmap(one)(buf, new, offsets)
