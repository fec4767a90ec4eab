"""Attention of a few queries per row over the cache as one Pallas kernel (flash-decoding).

Why: a verify pass is a step of small kernels (results/profile_h200_batch8_temperature1/
step_kernels_lk8_1.txt: 664 a lookup-in-front step on an H200, 10 of them a layer for attention
in `llama.chunked_attention`'s XLA form: transposes, two GEMMs, the chunks' maxima and sums).
Here each (row, KV head, chunk of SLOT_CHUNK slots) is one program of one kernel that reads its
keys and values once and keeps scores in registers; a small XLA fusion combines the chunks by
their maxima, as `chunked_attention` does. Same arithmetic up to float32 summation order:
scores and sums in float32, probabilities rounded to the values' dtype for their product.

On a GPU the kernel compiles through Pallas' Triton backend (deprecated since JAX 0.11 in favour
of Mosaic GPU, still run by the GPU machine's jax 0.11.2); elsewhere (a CPU: the tests) Pallas
interprets it. `llama.MATMUL_ATTENTION`'s default, "fastest", picks it on a GPU. On an H200 it
took a lookup-in-front step (8 nodes, random weights of Qwen2.5-0.5B's shape) from 1.381 to
1.199 ms at batch 1 and from 2.090 to 1.593 ms at batch 8 (results/profile_h200_attention_kernel/);
reading the cache's layer in place (`layer`) then took off a copy a layer: 1.160 -> 1.098 ms and
1.581 -> 1.484 ms (results/profile_h200_attention_inplace/).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Keys per inner iteration of a program (at most the chunk). Triton tiles are powers of two.
BLOCK_K = 64
# A program's query rows (T x G) are padded to a power of two, at least this: Triton's smallest
# dot takes 16. Raised, passes of different query counts run the same tile, so a one-token step
# and a verify pass compute a row alike (`eval_specbench.py --kernel_min_rows`, issue 3's
# exactness probe; on a GPU the dot's instruction may follow the tile).
MIN_QUERY_ROWS = 16
_NEG = -1e30  # masked scores: finite, so a fully masked chunk gives exp(0) nowhere (see _kernel)


def is_tile_rows(n: int) -> bool:
    """Whether n query rows can be a program's tile (MIN_QUERY_ROWS' values)."""
    return n >= 16 and n & (n - 1) == 0


def _dot(a: jax.Array, b: jax.Array, b_contracting: int, precision) -> jax.Array:
    """a [M, C] times b ([C, N], or [N, C] with b_contracting 1), accumulated in float32: the
    lax call Pallas' `dot` made (deprecated in JAX 0.11, gone from jax.experimental.pallas in
    0.12); the same jaxpr, so the same Triton kernel."""
    return jax.lax.dot_general(a, b, (((1,), (b_contracting,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, m_ref, l_ref, *, block: int, scale: float,
            precision):
    """One (row, KV head, chunk): q [R, H], keys and values [C, H], mask [R, C] (int8) ->
    unnormalised output [R, H], the rows' score maximum [R] and exp-sum [R] over the chunk."""
    q = q_ref[...]
    rows, head_dim = q.shape

    def body(i, carry):
        out, top, total = carry
        slots = pl.ds(i * block, block)
        visible = mask_ref[:, slots] != 0
        scores = _dot(q, k_ref[slots, :], 1, precision) * scale
        scores = jnp.where(visible, scores, _NEG)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        # Masked slots weigh 0 even where a row sees nothing yet (new_top still _NEG).
        probs = jnp.where(visible, jnp.exp(scores - new_top[:, None]), 0.0)
        rescale = jnp.exp(top - new_top)
        values = v_ref[slots, :]
        out = out * rescale[:, None] + _dot(probs.astype(values.dtype), values, 0, precision)
        return out, new_top, total * rescale + jnp.sum(probs, axis=1)

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    out, top, total = jax.lax.fori_loop(0, k_ref.shape[0] // block, body, init)
    o_ref[...] = out
    m_ref[...] = top
    l_ref[...] = total


@functools.partial(jax.jit, static_argnames=("dtype", "chunk", "layer", "interpret"))
def attend(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, dtype,
           chunk: int, layer: int | None = None, interpret: bool | None = None) -> jax.Array:
    """`llama.attend`'s contract: q [B, T, K, G, H], keys and values [B, S, K, H], mask [B, T, S]
    -> [B, T, K, G, H] in `dtype`; S a multiple of `chunk`, a power of two. Every query must
    see at least one slot (a verify pass's queries see the committed ones). With `layer`, keys
    and values are every layer's [L, B, S, K, H] (KVCache's arrays) and the kernel reads that
    layer's in place: a slice passed in would be copied first, a custom call's operand."""
    if layer is None:
        keys, values, layer = keys[None], values[None], 0
    b, t, k, g, h = q.shape
    s = keys.shape[2]
    if s % chunk or chunk & (chunk - 1):
        raise ValueError(f"{s} cache slots must split into chunks of {chunk}, a power of two")
    block = min(BLOCK_K, chunk)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    # Query row r = t * G + g of KV head k; rows padded to a power of two (Triton), at least
    # MIN_QUERY_ROWS. Padded rows see every slot and are dropped.
    rows = t * g
    padded = max(MIN_QUERY_ROWS, 1 << (rows - 1).bit_length())
    q_rows = jnp.moveaxis(q, 2, 1).reshape(b, k, rows, h).astype(keys.dtype)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded - rows), (0, 0)))
    mask_rows = jnp.repeat(mask, g, axis=1).astype(jnp.int8)  # [B, R, S], shared by the layers
    mask_rows = jnp.pad(mask_rows, ((0, 0), (0, padded - rows), (0, 0)), constant_values=1)
    n = s // chunk
    # float32 inputs (the exactness tests) multiply in float32, not TF32.
    precision = (jax.lax.Precision.HIGHEST if keys.dtype == jnp.float32
                 else jax.lax.Precision.DEFAULT)
    kernel = functools.partial(_kernel, block=block, scale=1 / math.sqrt(h),
                               precision=precision)
    per_chunk = jax.ShapeDtypeStruct((b, k, n, padded), jnp.float32)
    out, top, total = pl.pallas_call(
        kernel,
        grid=(b, k, n),
        in_specs=[
            pl.BlockSpec((None, None, padded, h), lambda i, j, c: (i, j, 0, 0)),
            pl.BlockSpec((None, None, chunk, None, h), lambda i, j, c: (layer, i, c, j, 0)),
            pl.BlockSpec((None, None, chunk, None, h), lambda i, j, c: (layer, i, c, j, 0)),
            pl.BlockSpec((None, padded, chunk), lambda i, j, c: (i, 0, c)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, padded, h), lambda i, j, c: (i, j, c, 0, 0)),
            pl.BlockSpec((None, None, None, padded), lambda i, j, c: (i, j, c, 0)),
            pl.BlockSpec((None, None, None, padded), lambda i, j, c: (i, j, c, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, k, n, padded, h), jnp.float32), per_chunk,
                   per_chunk],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="verify_attention",
    )(q_rows, keys, values, mask_rows)
    # The chunks combined by their maxima (chunks a row does not see weigh exp(_NEG - top) = 0).
    weight = jnp.exp(top - jnp.max(top, axis=2, keepdims=True))  # [B, K, N, R]
    combined = jnp.einsum("bknr,bknrh->bkrh", weight, out) / jnp.einsum(
        "bknr,bknr->bkr", weight, total)[..., None]
    combined = combined[:, :, :rows].reshape(b, k, t, g, h)
    return jnp.moveaxis(combined, 2, 1).astype(dtype)
