"""The target's KV cache: a plain pytree of static size.

Each row of a batch owns `lengths[b]` committed entries at slots [0, lengths[b]). A forward pass
writes its T new keys/values at slots [lengths[b], lengths[b] + T) but does not commit them: the
caller moves `lengths` forward by what it keeps. Rolling back rejected draft tokens is therefore
free (the index simply does not move), as in gemma's sampler.

Axes: L layers, B batch, S cache slots, K KV heads, H head dim. All layers' keys are one array,
and their values another, so that moving entries (`gather_new`) is one gather and one scatter for
the whole model instead of two per layer: on an H200 the per-layer form was 96 of a tree step's
664 kernels, and the stacked one took 8-11% off a lookup-in-front step at batch 1 (none at batch
8; results/profile_h200_stacked_cache/).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from psjax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    lengths: jax.Array  # [B] int32, committed slots per row

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_length: int,
               dtype=jnp.bfloat16) -> "KVCache":
        shape = (config.num_hidden_layers, batch_size, max_length, config.num_key_value_heads,
                 config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch_size,), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    def commit(self, num_new: jax.Array) -> "KVCache":
        """Keeps `num_new[b]` of the entries the last forward pass wrote after `lengths[b]`."""
        return self.replace(lengths=self.lengths + num_new.astype(jnp.int32))

    def gather_new(self, src_offsets: jax.Array) -> "KVCache":
        """Moves uncommitted entries into place: slot lengths[b] + j takes the entry at
        lengths[b] + src_offsets[b, j]. Used after tree verification, where the accepted path is
        scattered through the tree's slots. `src_offsets` is [B, J]; every layer moves alike."""
        rows = jnp.arange(src_offsets.shape[0])[:, None]
        src = self.lengths[:, None] + src_offsets
        dst = self.lengths[:, None] + jnp.arange(src_offsets.shape[1])
        move = lambda x: x.at[:, rows, dst].set(x[:, rows, src], unique_indices=True)
        return self.replace(k=move(self.k), v=move(self.v))


def write(cache: jax.Array, layer: int, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes layer `layer`'s new [B, T, K, H] entries into `cache` [L, B, S, K, H] at per-row
    slots starts[b]..starts[b]+T-1."""
    b, t = new.shape[:2]
    slots = starts[:, None] + jnp.arange(t)
    return cache.at[layer, jnp.arange(b)[:, None], slots].set(new.astype(cache.dtype),
                                                              unique_indices=True)


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
