"""A Llama-family decoder (Llama, Qwen2, Mistral) as pure-functional Flax Linen modules.

Parameter names follow Hugging Face (`embed_tokens`, `layers_{i}/self_attn/q_proj`, `mlp/gate_proj`,
`input_layernorm`, `norm`, `lm_head`) and RoPE is HF's rotate-half layout, so weight import and
export are one table of transposes (psjax/convert/hf.py).

Axis legend: B batch, T query length, S key length (cache slots), N query heads, K KV heads,
G = N // K query heads per KV head, H head dim, D model dim, F MLP dim, V vocab.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from psjax.models import attention_kernel, kv_cache
from psjax.models.config import ModelConfig

_init = nn.initializers.normal(stddev=0.02)


def _dense(features, axes, name, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32):
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


# Per backend, a product of fewer rows is padded with zero rows to this many, if its kernel has
# at least GEMM_PAD_MIN_WEIGHTS weights. XLA's GPU compiler rewrites a vector-matrix product of
# under 10^7 multiply-adds into a multiply and a reduction (DotStrengthReduction, which no flag
# of jax 0.11.2 turns off): at batch 1 that is every projection of a small model's decode step
# (results/profile_h200_lookup/: reductions were 0.77 of the 1.19 ms busy in a step). Two rows
# keep a product a GEMM, which reads a large kernel faster; a small one is latency-bound either
# way, and as a reduction XLA fuses it with its neighbours. H200, Qwen2.5-0.5B shape, 512
# tokens of context (results/attention_h200_gemm_rows/): 1.140 ms a step as reductions, 1.055
# with every projection padded, 1.036 with only gate/up and down (8.7M and 4.4M weights);
# SmolLM2's thinner layers, all padded, went 1.002 -> 1.052, and none of them reaches the
# threshold. Not on a CPU, where the padded product is the slower one (46 -> 72 ms a step).
GEMM_MIN_ROWS = {"gpu": 2}
GEMM_PAD_MIN_WEIGHTS = 2**22


def gemm_min_rows() -> int:
    """GEMM_MIN_ROWS for the backend in use (1: no padding)."""
    return GEMM_MIN_ROWS.get(jax.default_backend(), 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, kernel: jax.Array, out_dtype) -> jax.Array:
    """x [..., D] times kernel [D, F], both in the compute dtype: products accumulate in float32,
    the output is `out_dtype`. The backward computes in the inputs' dtype: left to autodiff, a
    float32 output's cotangent promotes both backward products to float32 (TF32 GEMMs on a
    GPU): the trainer's head and the drafter layer's 14 products in a bfloat16 step (the
    layer's projections return float32, DecoderLayer). In float32 it is autodiff's backward."""
    rows, min_rows = math.prod(x.shape[:-1]), gemm_min_rows()
    if rows >= min_rows or kernel.size < GEMM_PAD_MIN_WEIGHTS:
        return jnp.einsum("...d,df->...f", x, kernel, preferred_element_type=out_dtype)
    # The barriers hide the zero rows from XLA's simplifier, which would slice them off again.
    padded = jax.lax.optimization_barrier(
        jnp.pad(x.reshape(rows, x.shape[-1]), ((0, min_rows - rows), (0, 0))))
    y = jax.lax.optimization_barrier(
        jnp.einsum("nd,df->nf", padded, kernel, preferred_element_type=out_dtype))
    return y[:rows].reshape(*x.shape[:-1], kernel.shape[-1])


def _matmul_fwd(x, kernel, out_dtype):
    return matmul(x, kernel, out_dtype), (x, kernel)


def _matmul_bwd(out_dtype, residuals, cotangent):
    x, kernel = residuals
    cotangent = cotangent.astype(x.dtype)
    grad_x = jnp.einsum("...f,df->...d", cotangent, kernel, preferred_element_type=jnp.float32)
    grad_kernel = jnp.einsum("nd,nf->df", x.reshape(-1, x.shape[-1]),
                             cotangent.reshape(-1, cotangent.shape[-1]),
                             preferred_element_type=jnp.float32)
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_float32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum(spec, a, b) accumulated and returned in float32, with matmul's backward: in
    the inputs' dtype (autodiff would promote the float32 cotangent and both backward products
    to float32; attention's scores in a bfloat16 train step through the einsum form)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_float32_fwd(spec, a, b):
    return einsum_float32(spec, a, b), (a, b)


def _einsum_float32_bwd(spec, residuals, cotangent):
    a, b = residuals
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
    return vjp(cotangent.astype(jnp.result_type(a, b)))


einsum_float32.defvjp(_einsum_float32_fwd, _einsum_float32_bwd)


def _project(module: nn.Module, x, names, features, axes, use_bias=False, out_dtype=None):
    """x through the Dense layers `names` (HF names and nn.Dense parameters), in order, each
    output in `out_dtype` (default the module's dtype; products accumulate in float32 either way).

    With `module.fused`, one matmul against their kernels concatenated along the output axis,
    split afterwards: in a decode step each projection of a small model is a latency-bound
    kernel, and fusing q/k/v and gate/up removes three of the seven per layer. Parameters keep
    HF's layout; inside the decoding while_loop XLA hoists the concatenation of the
    loop-invariant weights out of the loop."""
    if module.is_initializing():  # the Dense layers declare the parameters (names, axes)
        return [_dense(f, a, n, use_bias=use_bias, dtype=module.dtype,
                       param_dtype=module.param_dtype)(x)
                for n, f, a in zip(names, features, axes)]
    params = nn.meta.unbox(module.variables["params"])

    def product(group):  # x times the kernels of `group`, side by side
        kernel = jnp.concatenate([params[n]["kernel"] for n in group], axis=1)
        y = matmul(x.astype(module.dtype), kernel.astype(module.dtype), out_dtype or module.dtype)
        if use_bias:
            y = y + jnp.concatenate([params[n]["bias"] for n in group]).astype(y.dtype)
        return y

    if not module.fused:
        return [product([n]) for n in names]
    return jnp.split(product(names), list(itertools.accumulate(features))[:-1], axis=-1)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps, self.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    # HF casts back to the input dtype before the weight multiply; rounding matches it.
    return scale.astype(dtype) * x32.astype(dtype)


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse frequencies [H/2], with Llama-3 scaling where the config asks for it."""
    h = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if config.rope_llama3_scaling is None:
        return inv_freq
    factor, low_ff, high_ff, original = config.rope_llama3_scaling
    low_wavelen, high_wavelen = original / low_ff, original / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [B, T, heads, H], positions [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return x * cos + rotated * sin


# Attention of T queries over S cache slots in B rows runs as multiply-and-sum while B * T * S is
# at most this (see attend). Measured on an H100, Qwen2.5-0.5B shapes, batch 1
# (results/attention_h100/attention_verify_qwen05b.json):
# multiply-and-sum is faster for T = 1 and 3 at 2,304 slots and up to T = 17 at 768, matmuls for
# T = 11 and 17 at 2,304; the crossover is near 14k pairs. At batch 8 (results/profile_h100/) the
# multiply-and-sum attention of a 17-node tree took 1.5 ms of a 3.6 ms step (H100, 2026-11-27).
# The one-token step follows the same count (results/attention_h100/attention_cudnn_b8_b32.json,
# context 512: multiply-and-sum 1.11 vs matmuls 1.14 ms at batch 8, 1.43 vs 1.25 ms at batch 32).
# That is the default in front of the XLA forms; in front of the Pallas kernel (MATMUL_ATTENTION
# below) it is 0, every pass over a cache through the kernel: on an H200 (Qwen2.5-Coder-0.5B, 18
# Spec-Bench questions x 1,024 tokens, autoregressive, two runs a setting alternating;
# results/ar_one_token_steps_h200_kernel/) a one-token step took 1.05-1.07 / 1.08-1.11 ms at
# 512- / 2,048-wide prompts through the kernel, 1.11-1.16 / 1.23-1.24 as multiply-and-sum.
# None: those defaults (`multiply_sum_pairs`); a number: that count for every form.
MULTIPLY_SUM_PAIRS: int | None = None
# ... and only for rows of at most this many queries: one-token steps. On an H200 (jax 0.11.2,
# Qwen2.5-Coder-0.5B, 12 Spec-Bench questions x 1,024 new tokens, one process a setting;
# results/attention_h200_verify_form_1024_12q/) a 9-query verify pass over ~1,550 slots (~13.9k
# pairs, under the count above) as multiply-and-sum made the lookup-in-front tree 968 tok/s,
# as matmuls 1,343-1,352; at 256 new tokens the two forms tied within 2% for 17 queries over
# ~785 slots (results/attention_h200_multiply_sum_ab_12q/); the one-token step kept
# multiply-and-sum's lead at ~3,100 slots (Summarization: 759-763 vs 588 tok/s as matmuls).
MULTIPLY_SUM_QUERIES = 1
# How the matmul form runs: "chunked" (`chunked_attention`: two einsums around a softmax taken
# within SLOT_CHUNK-slot chunks, then across them), "pallas" (the same chunks as one Pallas
# kernel, psjax.models.attention_kernel; Triton on a GPU, interpreted elsewhere), "einsum" (the
# same over all slots at once) or a jax.nn.dot_product_attention implementation, "xla" or
# "cudnn" (one fused kernel; GPU, bfloat16); "fastest": see `matmul_attention_form`. On an H200
# (Qwen2.5-0.5B shape, batch 1, a chain of 8 over ~1,660 slots, cuDNN unpadded:
# results/profile_h200_verify_attention/) a verify step took 1.256 ms chunked, 1.596 einsum,
# 1.513 cuDNN; at batch 8, cuDNN was 3% faster than einsum at 17 queries and 17% slower at 3
# (H100, results/attention_h100/attention_cudnn_b8_b32.json). The Pallas kernel then took a
# lookup-in-front step (8 nodes, 512-token prompts) from 1.381 to 1.199 ms at batch 1 and from
# 2.090 to 1.593 ms at batch 8 (results/profile_h200_attention_kernel/), and reading the
# cache in place (`attend`'s `layer`) to 1.098 and 1.484 ms (results/profile_h200_attention_inplace/).
MATMUL_ATTENTION = "fastest"
DOT_PRODUCT_ATTENTION = ("xla", "cudnn")  # jax.nn.dot_product_attention implementations
MATMUL_ATTENTION_FORMS = ("fastest", "chunked", "pallas", "einsum") + DOT_PRODUCT_ATTENTION


def matmul_attention_form(form: str) -> str:
    """The form `attend` runs for `form`: "fastest" is the Pallas kernel on a GPU (Triton), the
    chunked XLA form elsewhere (a TPU, where the kernel's Triton calls do not lower; a CPU,
    where Pallas would only interpret it); any other form is itself."""
    if form != "fastest":
        return form
    return "pallas" if jax.default_backend() == "gpu" else "chunked"


def multiply_sum_pairs(form: str) -> int:
    """MULTIPLY_SUM_PAIRS for passes whose matmul form is `form` (resolved: "pallas" where the
    kernel takes the pass)."""
    if MULTIPLY_SUM_PAIRS is not None:
        return MULTIPLY_SUM_PAIRS
    return 0 if form == "pallas" else 14_336  # the crossover measured above


def numerics() -> dict:
    """The module's knobs above as they stand ("fastest" resolved): what a results file records
    besides its command line, which does not show defaults."""
    return dict(matmul_attention=matmul_attention_form(MATMUL_ATTENTION),
                multiply_sum_pairs=multiply_sum_pairs(matmul_attention_form(MATMUL_ATTENTION)),
                multiply_sum_queries=MULTIPLY_SUM_QUERIES,
                gemm_min_rows=gemm_min_rows(), gemm_pad_min_weights=GEMM_PAD_MIN_WEIGHTS,
                kernel_min_rows=attention_kernel.MIN_QUERY_ROWS)


_THIS = sys.modules[__name__]
# numerics()'s names -> (module, attribute, how a value is stored there)
_KNOBS = {
    "matmul_attention": (_THIS, "MATMUL_ATTENTION", str),
    "multiply_sum_pairs": (_THIS, "MULTIPLY_SUM_PAIRS",
                           lambda pairs: None if pairs is None else int(pairs)),
    "multiply_sum_queries": (_THIS, "MULTIPLY_SUM_QUERIES", int),
    "gemm_min_rows": (_THIS, "GEMM_MIN_ROWS", lambda rows: {jax.default_backend(): int(rows)}),
    "gemm_pad_min_weights": (_THIS, "GEMM_PAD_MIN_WEIGHTS", int),
    "kernel_min_rows": (attention_kernel, "MIN_QUERY_ROWS", int),
}
# ... and what a value must be, where not every int or string is one
_KNOB_RULES = {
    "matmul_attention": (lambda form: form in MATMUL_ATTENTION_FORMS,
                         f"one of {MATMUL_ATTENTION_FORMS}"),
    "kernel_min_rows": (attention_kernel.is_tile_rows, "a power of two, at least 16"),
}


@contextlib.contextmanager
def numerics_as(**knobs):
    """The knobs `numerics()` names set to `knobs` inside the block (gemm_min_rows for this
    backend), the old values back after it. Functions jitted before keep what they traced:
    `jax.clear_caches()` inside the block recompiles under the new values."""
    unknown = sorted(set(knobs) - set(_KNOBS))
    if unknown:
        raise ValueError(f"unknown numerics knobs {unknown}; known: {sorted(_KNOBS)}")
    values = {}
    for name, given in knobs.items():
        ok, takes = _KNOB_RULES.get(name, (lambda _: True, "a number"))
        try:
            value = _KNOBS[name][2](given)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={given!r}: it takes {takes}") from None
        if not ok(value):
            raise ValueError(f"{name}={given!r}: it takes {takes}")
        values[name] = value
    saved = {name: getattr(*_KNOBS[name][:2]) for name in knobs}
    try:
        for name, value in values.items():
            setattr(*_KNOBS[name][:2], value)
        yield
    finally:
        for name, value in saved.items():
            setattr(*_KNOBS[name][:2], value)


def fastest_uncached_attention(dtype) -> str:
    """Transformer.uncached_attention for passes without a cache and prompt passes: cuDNN's
    flash attention on a GPU in 16-bit compute, the einsum form elsewhere (a CPU; float32,
    which cuDNN's kernel does not take)."""
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and sixteen_bit else "einsum"


# cuDNN's flash attention backward (9.19, as jax 0.11.2 bundles it) gives a masked pass whose
# length is 64 modulo 128 NaN query gradients in any row whose log-sum-exp is below -88.7 (ln of
# float32's largest value); pytorch/pytorch#196678 meets it through the same kernel. The
# drafter's k = 3 training pass is 512 + 64 x 3 = 704 long: its runs went NaN after a few
# hundred steps (results/train_h200/cudnn_masked_nan/). Masked cuDNN passes are padded to
# whole tiles.
CUDNN_TILE = 128

# "chunked" attention's chunk of cache slots (a cache whose length it does not divide runs the
# einsum form; the decoding loops size their caches in multiples of it).
SLOT_CHUNK = 128


def pad_to_tiles(q, keys, values, mask, tile: int = CUDNN_TILE):
    """q [B, T, N, H], keys and values [B, S, K, H], mask [B, 1, T, S] padded with zeros to T
    and S multiples of `tile`. Real queries see no padded key; padded queries see every key
    (a row that sees nothing has no softmax), and their outputs are dropped by the caller."""
    t, s = q.shape[1], keys.shape[1]
    pad_t, pad_s = -t % tile, -s % tile
    if not pad_t and not pad_s:
        return q, keys, values, mask
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
    mask = jnp.pad(mask, [(0, 0), (0, 0), (0, pad_t), (0, pad_s)])
    mask = mask | (jnp.arange(t + pad_t) >= t)[:, None]
    return pad(q, pad_t), pad(keys, pad_s), pad(values, pad_s), mask


def chunked_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
                      dtype, chunk: int) -> jax.Array:
    """`attend`'s matmul form with the S slots split into S / chunk chunks (flash-decoding's
    split, in XLA ops): each chunk's softmax max, sum and probability-weighted values, then
    the chunks combined by their maxima. The same attention up to float32 rounding.

    Why: XLA's GPU compiler lays the scores GEMM's output out slots-major ([K, S, T*G]), so the
    softmax's max and sum over S become column reductions with only K*T*G outputs: on an H200
    (Qwen2.5-0.5B shape, 9 queries over 1,547 slots) the masked max alone took 13 us a layer,
    0.31 of a 1.74 ms verify step (results/profile_h200_verify_attention/). Reduced within
    chunks, the same reductions have S / chunk times as many outputs."""
    b, t, k, g, h = q.shape
    n = keys.shape[1] // chunk
    keys = keys.reshape(b, n, chunk, k, h)
    values = values.reshape(b, n, chunk, k, h)
    scores = einsum_float32("btkgh,bnckh->bkgtnc", q.astype(keys.dtype), keys)
    scores = jnp.where(mask.reshape(b, 1, 1, t, n, chunk), scores * h ** -0.5,
                       jnp.finfo(jnp.float32).min)
    chunk_max = jnp.max(scores, axis=-1)  # [B, K, G, T, N]
    probs = jnp.exp(scores - chunk_max[..., None])
    chunk_sum = jnp.sum(probs, axis=-1)
    chunk_out = einsum_float32("bkgtnc,bnckh->bkgtnh", probs.astype(values.dtype), values)
    weight = jnp.exp(chunk_max - jnp.max(chunk_max, axis=-1, keepdims=True))  # [B, K, G, T, N]
    out = jnp.einsum("bkgtn,bkgtnh->btkgh", weight, chunk_out) / jnp.einsum(
        "bkgtn,bkgtn->btkg", weight, chunk_sum)[..., None]
    return out.astype(dtype)


def causal_mask(b: int, t: int, implementation: str | None = None) -> jax.Array | None:
    """[B, T, T] causal attention among T tokens, or None where `implementation` (a pass
    without a cache) is a jax.nn.dot_product_attention one: its causal mode needs no mask
    tensor (`attend`)."""
    if implementation in DOT_PRODUCT_ATTENTION:
        return None
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array | None,
           dtype, implementation: str = "einsum", pad_tiles: bool = True,
           layer: int | None = None) -> jax.Array:
    """Softmax attention of q [B, T, K, G, H] over keys, values [B, S, K, H] where mask [B, T, S]
    allows; returns [B, T, K, G, H] in `dtype`. Scores and sums accumulate in float32. With
    `layer`, keys and values are a cache's every layer ([L, B, S, K, H]) and the layer's are
    read, as `keys[layer].astype(dtype)` (the Pallas kernel reads them in place).

    `implementation`: "einsum", "chunked" (`chunked_attention`, where SLOT_CHUNK divides S;
    else "einsum"), "pallas" (attention_kernel.attend: the chunked form as one kernel; same
    condition), "fastest" (`matmul_attention_form`), or jax.nn.dot_product_attention's "xla"
    or "cudnn" (cuDNN's flash attention: the [T, S] scores never reach memory) for every call
    but the few-query ones below. Attention passes Transformer.uncached_attention for a pass
    without a cache, MATMUL_ATTENTION for one with. mask None: causal attention of T tokens
    among themselves (needs "xla" or "cudnn"). `pad_tiles`: masked cuDNN passes are padded to
    whole tiles (`pad_to_tiles`: a gradient's NaN); passes over a cache, never differentiated,
    need not be.

    For a few queries against a long cache the products are written as multiply-and-sum, which
    XLA fuses into one reduction per product whatever the cache size. Written as matmuls, they
    stay fused only while small (XLA's GPU compiler rewrites a dot under 10^6 multiply-adds as a
    reduction); past that (a cache of ~1,100 slots for Qwen2.5-0.5B) each becomes a batched GEMM
    of 7 rows with transposes around it. But the reduction reads the keys and values once per
    query, so it loses to the GEMM once rows x queries x slots passes `multiply_sum_pairs` (by
    default never in front of the Pallas kernel), or a row has more than MULTIPLY_SUM_QUERIES
    queries (a verify pass); the GEMMs run as two einsums or through `implementation`."""
    h = q.shape[-1]
    b, t, s = q.shape[0], q.shape[1], keys.shape[-3]
    implementation = matmul_attention_form(implementation)
    chunks = mask is not None and s % SLOT_CHUNK == 0
    if implementation == "pallas" and not chunks:
        implementation = "einsum"
    few = (mask is not None and t <= MULTIPLY_SUM_QUERIES
           and b * t * s <= multiply_sum_pairs(implementation))
    kernel = not few and implementation == "pallas"
    if layer is not None and not (kernel and keys.dtype == dtype):
        keys, values, layer = keys[layer].astype(dtype), values[layer].astype(dtype), None
    if kernel:
        return attention_kernel.attend(q, keys, values, mask, dtype, SLOT_CHUNK, layer)
    if not few and implementation == "chunked" and chunks:
        return chunked_attention(q, keys, values, mask, dtype, SLOT_CHUNK)
    if not few and implementation in DOT_PRODUCT_ATTENTION:
        # query head k * G + g reads kv head k, as here
        q_heads, mask_heads = q.reshape(b, t, -1, h).astype(keys.dtype), None
        if mask is not None:
            mask_heads = mask[:, None]
            if implementation == "cudnn" and pad_tiles:
                q_heads, keys, values, mask_heads = pad_to_tiles(q_heads, keys, values,
                                                                 mask_heads)
        out = jax.nn.dot_product_attention(q_heads, keys, values, mask=mask_heads,
                                           is_causal=mask is None, implementation=implementation)
        return out[:, :t].reshape(q.shape).astype(dtype)
    if few:
        q32 = jnp.moveaxis(q, 1, 3).astype(jnp.float32)  # [B, K, G, T, H]
        k32 = jnp.moveaxis(keys, 1, 2).astype(jnp.float32)  # [B, K, S, H]
        scores = jnp.sum(q32[:, :, :, :, None, :] * k32[:, :, None, None, :, :], axis=-1)
    else:
        scores = einsum_float32("btkgh,bskh->bkgts", q.astype(keys.dtype), keys)
    scores = jnp.where(mask[:, None, None, :, :], scores * h ** -0.5,
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S]
    if not few:
        return jnp.einsum("bkgts,bskh->btkgh", probs.astype(dtype), values)
    v32 = jnp.moveaxis(values, 1, 2).astype(jnp.float32)  # [B, K, S, H]
    out = jnp.sum(probs[..., None] * v32[:, :, None, None, :, :], axis=4)
    return jnp.moveaxis(out, 3, 1).astype(dtype)


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    fused: bool = False
    uncached_attention: str = "einsum"  # see Transformer
    layer_index: int = 0  # this layer's entries in the cache's [L, ...] arrays

    @nn.compact
    def __call__(self, x, positions, mask, cache_kv=None, starts=None, prefill=False):
        """x [B, T, D]; mask [B, T, S] (S = T without a cache or with `prefill`), or None:
        causal among the T tokens (`attend`). cache_kv: the cache's keys and values, every
        layer's ([L, B, S, K, H] each, KVCache); this layer's new entries are written at
        `starts`. `prefill`: the cache is empty, so the T tokens attend among themselves as a
        pass without a cache does, and are written to it. Returns (out, (keys, values)): the
        whole cache arrays, written."""
        c = self.config
        b, t, _ = x.shape
        n, k_heads, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q, k, v = _project(self, x, ("q_proj", "k_proj", "v_proj"),
                           (n * h, k_heads * h, k_heads * h),
                           (("embed", "heads"), ("embed", "kv_heads"), ("embed", "kv_heads")),
                           use_bias=c.attention_bias, out_dtype=jnp.float32)
        q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, k_heads, h), v.reshape(b, t, k_heads, h)
        inv_freq = rope_frequencies(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k, v = k.astype(self.dtype), v.astype(self.dtype)  # as the cache keeps them

        keys, values, layer, new_kv = k, v, None, None
        if cache_kv is not None:
            new_kv = tuple(kv_cache.write(c, self.layer_index, new, starts)
                           for c, new in zip(cache_kv, (k, v)))
            if not prefill:
                (keys, values), layer = new_kv, self.layer_index  # [L, B, S, K, H]
        uncached = cache_kv is None or prefill

        q = q.reshape(b, t, k_heads, n // k_heads, h)  # [B, T, K, G, H]
        out = attend(q, keys, values, mask, self.dtype,
                     self.uncached_attention if uncached else MATMUL_ATTENTION,
                     pad_tiles=uncached, layer=layer)
        out = out.reshape(b, t, n * h)
        # Into the float32 residual stream (DecoderLayer) without a bfloat16 rounding.
        out, = _project(self, out, ("o_proj",), (c.hidden_size,), (("heads", "embed"),),
                        out_dtype=jnp.float32)
        return out, new_kv


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    fused: bool = False
    hidden_dtype: jnp.dtype = jnp.float32  # of gate, up and silu(gate) * up (Transformer)

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate, up = _project(self, x, ("gate_proj", "up_proj"), (c.intermediate_size,) * 2,
                            (("embed", "mlp"),) * 2, out_dtype=self.hidden_dtype)
        out, = _project(self, nn.silu(gate) * up, ("down_proj",), (c.hidden_size,),
                        (("mlp", "embed"),), out_dtype=jnp.float32)
        return out


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    fused: bool = False
    uncached_attention: str = "einsum"  # see Transformer
    mlp_hidden_dtype: jnp.dtype = jnp.float32  # see Transformer
    layer_index: int = 0  # see Attention

    @nn.compact
    def __call__(self, x, positions, mask, cache_kv=None, starts=None, prefill=False):
        """The residual stream stays in float32 whatever the compute dtype, and every projection
        returns float32 (matmul inputs are rounded to the compute dtype, outputs are not). In
        bfloat16, rounding the outputs and the 2L residual sums (as HF does) is most of the
        noise that makes a verify pass over T tokens and a one-token step part at clear float32
        choices (issue 3's mismatches): keeping them in float32 halved the logit difference of
        the two on the CPU and the divergences on Spec-Bench on an H100 (README), at no cost to
        a decode step."""
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(jnp.float32)
        attn_out, new_kv = Attention(c, name="self_attn", fused=self.fused,
                                     uncached_attention=self.uncached_attention,
                                     layer_index=self.layer_index, **kw)(
            RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x), positions, mask,
            cache_kv, starts, prefill)
        x = x + attn_out
        x = x + MLP(c, name="mlp", fused=self.fused, hidden_dtype=self.mlp_hidden_dtype, **kw)(
            RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), new_kv


class LMHead(nn.Module):
    """An untied output projection [D, V] with float32 accumulation."""

    vocab_size: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(_init, ("embed", "vocab")),
                            (x.shape[-1], self.vocab_size), self.param_dtype)
        return jnp.einsum("...d,dv->...v", x, kernel.astype(x.dtype),
                          preferred_element_type=jnp.float32)


class Output(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    hidden: jax.Array  # [B, T, D] after the final norm
    cache: kv_cache.KVCache | None
    # [B, T, D x n]: what a feature-mode drafter reads (Transformer.feature_layers); `hidden`
    # when no layers are named.
    features: jax.Array


class Transformer(nn.Module):
    """The target decoder. `dtype` is the compute dtype, `param_dtype` the weights'. `fused`:
    q/k/v and gate/up each as one matmul (same parameters; for decoding, see `_project`).
    `uncached_attention`: how a pass without a cache attends (the trainer's: the target's over
    whole sequences, causal, and the drafter's group-wise pass, masked), and a prompt pass
    (`prefill`): "einsum" as every other pass (`attend`), or a jax.nn.dot_product_attention
    implementation, "xla" or "cudnn" (GPU: flash attention; the einsum form's [T, T] softmax
    was most of the target pass's non-matmul time on an H100, and its transposes most of the
    drafter's on an H200, experiments/bench_train.py). `fastest_uncached_attention` picks.
    `feature_layers`: the layers whose outputs make `Output.features`, side by side: n in
    1..L is the residual stream after n layers as layer n + 1 reads it (through that layer's
    input norm), n = L the final norm's output (`hidden`). Empty: `hidden` alone.
    `mlp_hidden_dtype`: of the gate and up products and silu(gate) * up, float32 like every
    projection's output (DecoderLayer: decoding's numerics). The trainer's target pass, which
    only makes training targets, uses the compute dtype: that [B, T, 2I] array written and read
    in float32 was 2.3 ms of a 32.5 ms train step on an H200 (experiments/bench_train.py)."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    fused: bool = False
    uncached_attention: str = "einsum"
    feature_layers: tuple[int, ...] = ()
    mlp_hidden_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, name="embed_tokens", **kw,
            embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")))
        self.layers = [DecoderLayer(c, name=f"layers_{i}", fused=self.fused,
                                    uncached_attention=self.uncached_attention,
                                    mlp_hidden_dtype=self.mlp_hidden_dtype, layer_index=i, **kw)
                       for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, name="norm", **kw)
        if not c.tie_word_embeddings:
            self.lm_head = LMHead(c.vocab_size, param_dtype=self.param_dtype, name="lm_head")

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on post-norm features. The products accumulate into float32 logits: rounding
        bfloat16 logits (steps of 0.25 near 32) would turn near-ties into coin flips."""
        if self.config.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", hidden,
                              self.embed_tokens.embedding.astype(hidden.dtype),
                              preferred_element_type=jnp.float32)
        return self.lm_head(hidden)

    def __call__(self, tokens: jax.Array, positions: jax.Array,
                 cache: kv_cache.KVCache | None = None,
                 block_mask: jax.Array | None = None,
                 logits_at: jax.Array | None = None, compute_logits: bool = True,
                 prefill: bool = False) -> Output:
        """tokens, positions [B, T]; block_mask [B, T, T] among the new tokens (default causal).
        `logits_at` [B]: compute logits only at that index of each row ([B, 1, V]); prefill
        of long prompts needs no [B, T, V] array. `compute_logits=False`: hidden states only.

        With a cache, the new keys/values are written after `cache.lengths` (not committed) and
        every committed slot is visible; without one, the T tokens attend among themselves.
        `prefill`: the cache is empty (lengths 0), so the T tokens attend among themselves as
        without one (`uncached_attention`) and are written to it: the prompt pass computes no
        scores for the slots the generation will fill (a 2,048-token prompt with 1,024 new
        tokens: 2,048 x 2,048 instead of 2,048 x 3,081 per head)."""
        b, t = tokens.shape
        uncached = cache is None or prefill
        if block_mask is None:
            block_mask = causal_mask(b, t, self.uncached_attention if uncached else None)
        mask = block_mask if uncached else kv_cache.attention_mask(
            cache.lengths, block_mask, cache.max_length)
        x = nn.with_logical_constraint(self.embed(tokens).astype(jnp.float32),
                                       ("batch", "length", "act_embed"))
        kv, residuals = None if cache is None else (cache.k, cache.v), {}
        for i, layer in enumerate(self.layers):
            # Each layer writes its entries into the arrays it passes on: one buffer, in place.
            x, kv = layer(x, positions, mask, kv, None if cache is None else cache.lengths,
                          prefill)
            if i + 1 in self.feature_layers:
                residuals[i + 1] = x  # read by _features
        hidden = self.norm(x)
        features = self._features(residuals, hidden)
        new_cache = None if cache is None else cache.replace(k=kv[0], v=kv[1])
        if not compute_logits:
            return Output(None, hidden, new_cache, features)
        head_in = hidden if logits_at is None else jnp.take_along_axis(
            hidden, logits_at[:, None, None], axis=1)
        return Output(self.logits(head_in), hidden, new_cache, features)

    def _features(self, residuals: dict[int, jax.Array], hidden: jax.Array) -> jax.Array:
        """`feature_layers`' outputs side by side, each normalised as the next layer reads it
        (the target's own norm: residual streams differ in scale by orders of magnitude across
        layers)."""
        if not self.feature_layers:
            return hidden
        num_layers = self.config.num_hidden_layers
        if any(not 1 <= n <= num_layers for n in self.feature_layers):
            raise ValueError(f"feature_layers {self.feature_layers} must lie in 1..{num_layers}")
        parts = []
        for n in self.feature_layers:
            if n == num_layers:
                parts.append(hidden)
                continue
            scale = self.layers[n].variables["params"]["input_layernorm"]["scale"]
            parts.append(rms_norm(residuals[n], nn.meta.unbox(scale), self.config.rms_norm_eps,
                                  self.dtype))
        return jnp.concatenate(parts, axis=-1)
