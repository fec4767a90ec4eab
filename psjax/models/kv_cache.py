"""The target's KV cache: a plain pytree of static size.

Each row of a batch owns `lengths[b]` committed entries at slots [0, lengths[b]). A forward pass
writes its T new keys/values at slots [lengths[b], lengths[b] + T) but does not commit them: the
caller moves `lengths` forward by what it keeps. Rolling back rejected draft tokens is therefore
free (the index simply does not move), as in gemma's sampler.

Axes: L layers, B batch, S cache slots, K KV heads, H head dim.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from psjax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, S, K, H]
    v: tuple[jax.Array, ...]  # L x [B, S, K, H]
    lengths: jax.Array  # [B] int32, committed slots per row

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_length: int,
               dtype=jnp.bfloat16) -> "KVCache":
        shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(k=zeros(), v=zeros(), lengths=jnp.zeros((batch_size,), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1]

    def commit(self, num_new: jax.Array) -> "KVCache":
        """Keeps `num_new[b]` of the entries the last forward pass wrote after `lengths[b]`."""
        return self.replace(lengths=self.lengths + num_new.astype(jnp.int32))

    def gather_new(self, src_offsets: jax.Array) -> "KVCache":
        """Moves uncommitted entries into place: slot lengths[b] + j takes the entry at
        lengths[b] + src_offsets[b, j]. Used after tree verification, where the accepted path is
        scattered through the tree's slots. `src_offsets` is [B, J]."""
        def move(layer: jax.Array) -> jax.Array:
            def row(cache_row, start, offsets):
                picked = jnp.take(cache_row, start + offsets, axis=0, mode="clip")
                return jax.lax.dynamic_update_slice(cache_row, picked, (start, 0, 0))
            return jax.vmap(row)(layer, self.lengths, src_offsets)
        return self.replace(k=tuple(map(move, self.k)), v=tuple(map(move, self.v)))


def write(cache_layer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes new [B, T, K, H] entries at per-row slots starts[b]..starts[b]+T-1."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (s, 0, 0)))(
        cache_layer, new.astype(cache_layer.dtype), starts)


def attention_mask(lengths: jax.Array, block_mask: jax.Array, max_length: int) -> jax.Array:
    """[B, T, S] visibility of cache slots for T new queries written after `lengths`.

    A query sees every committed slot, and the new slots its `block_mask` [B, T, T] allows
    (causal for a chain, ancestor-only for a tree)."""
    t = block_mask.shape[1]
    rel = jnp.arange(max_length)[None, :] - lengths[:, None]  # [B, S]
    in_block = (rel >= 0) & (rel < t)
    block = jnp.take_along_axis(
        block_mask, jnp.broadcast_to(jnp.clip(rel, 0, t - 1)[:, None, :],
                                     (block_mask.shape[0], t, max_length)), axis=2)
    return (rel < 0)[:, None, :] | (in_block[:, None, :] & block)
