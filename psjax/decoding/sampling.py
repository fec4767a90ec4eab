"""How a token is chosen from logits: greedy, or sampling with temperature, top-k and top-p.

`probabilities` is the one definition of the distribution a sampler draws from; speculative
sampling verifies against exactly this distribution, which is what makes it lossless.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy (top_k and top_p are then ignored)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()

# Up to this k, `top_k` runs k rounds of argmax instead of XLA's TopK kernel (see top_k).
ROUNDS_TOP_K = 8


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest values along the last axis and their int32 indices, as `jax.lax.top_k`
    returns them (descending; equal values: the lower index first), for x without -inf (or, for
    integers, the dtype's minimum). For k <= ROUNDS_TOP_K, k rounds of argmax, each over x with
    the indices taken so far masked out: XLA fuses each round into one pass over x, where its
    TopK kernel took 0.15 ms of a 16-node tree's 1.78 ms step on an H200 (a drafter's top
    candidates over a 151,936-token vocabulary; results/profile_h200_lookup/), the rounds
    0.016 ms (results/top_k_h200/)."""
    if k > ROUNDS_TOP_K:
        values, indices = jax.lax.top_k(x, k)
        return values, indices.astype(jnp.int32)
    floor = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    iota = jnp.arange(x.shape[-1], dtype=jnp.int32)
    indices = []
    for _ in range(k):
        taken = functools.reduce(jnp.logical_or, [iota == i[..., None] for i in indices],
                                 jnp.zeros(x.shape, bool))
        indices.append(jnp.argmax(jnp.where(taken, floor, x), axis=-1).astype(jnp.int32))
    indices = jnp.stack(indices, axis=-1)
    return jnp.take_along_axis(x, indices, axis=-1), indices


def probabilities(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """[..., V] float32 probabilities after temperature, top-k and top-p (not for greedy)."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it
        # is below top_p.
        keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < sampling.top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1,
                            keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return jax.nn.softmax(logits, axis=-1)


def choose(rng: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row of [..., V] logits."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = probabilities(logits, sampling)
    return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)
