"""What every decoding loop shares: prompt batching, the capacity check, prefill, results."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psjax.models import llama
from psjax.models.kv_cache import KVCache
from psjax.models.llama import Transformer

MIN_PROMPT_WIDTH = 16  # prompts are padded to a power of two >= this, to bound recompilations


class CacheTooSmallError(ValueError):
    pass


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0,
                width: int | Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists into [B, P] and returns their lengths. P is `width` when it is an
    int (one compilation for every prompt: benchmarks), the smallest of several widths that
    holds the longest prompt (one compilation per width: short prompts skip a long prompt
    pass), else the next power of two."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    longest = int(lengths.max())
    if width is None:
        width = max(MIN_PROMPT_WIDTH, 1 << (longest - 1).bit_length())
    else:
        widths = [width] if isinstance(width, (int, np.integer)) else sorted(width)
        fits = [w for w in widths if w >= longest]
        if not fits:
            raise CacheTooSmallError(f"a prompt of {longest} tokens is longer than "
                                     f"prompt_width={max(widths)}; raise prompt_width")
        width = int(fits[0])
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    return tokens, lengths


def default_cache_length(padded_width: int, max_new_tokens: int, lookahead: int = 0) -> int:
    """Room for the padded prompts, the generation and one step's lookahead (draft tokens),
    in whole chunks of llama.SLOT_CHUNK slots (the unit of the chunked attention form)."""
    need = padded_width + max_new_tokens + lookahead
    return llama.SLOT_CHUNK * -(-need // llama.SLOT_CHUNK)


@functools.cache
def default_rng() -> jax.Array:
    """The key of calls given none: made once (each new key is a device dispatch, ~0.2 ms)."""
    return jax.random.PRNGKey(0)


def check_capacity(prompt_lengths: np.ndarray, padded_width: int, max_new_tokens: int,
                   cache_length: int, lookahead: int = 0) -> None:
    """Fails before any compilation when a prompt plus its generation cannot fit the cache.

    `lookahead` is how many slots past the committed end a step writes (draft tokens)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = int(np.max(prompt_lengths))
    need = max(longest + max_new_tokens + lookahead, padded_width)
    if need > cache_length:
        raise CacheTooSmallError(
            f"a prompt of {longest} tokens (padded to {padded_width}) plus max_new_tokens="
            f"{max_new_tokens}{f' plus {lookahead} draft slots' if lookahead else ''} needs "
            f"{need} cache slots, but cache_length={cache_length}; raise cache_length (or "
            "shorten the prompt / max_new_tokens)")


def prefill(module: Transformer, params, tokens: jax.Array, lengths: jax.Array,
            cache: KVCache):
    """One pass over the padded prompts into the empty `cache`. Returns the logits at each row's
    last prompt token, the features of all prompt positions [B, P, F] (`Output.features`), and
    the cache with the prompts committed."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    out = module.apply({"params": params}, tokens, positions, cache, logits_at=lengths - 1,
                       prefill=True)
    return out.logits[:, 0], out.features, out.cache.replace(lengths=lengths)


def step_lookahead(rows: int) -> int:
    """Cache slots reserved past the committed end for steps of `rows` rows (`step_pass`): a
    wide step's rows, as the speculative loop reserves a T-row verify pass's T, so that a chain's
    loop and autoregressive decoding at its width get the same cache length; none for one row."""
    return rows if rows > 1 else 0


def step_pass(module: Transformer, params, token: jax.Array, cache: KVCache, rows: int = 1):
    """A decoding step's target pass: `token` [B] at each row's next position, as a pass of
    `rows` rows (the token, then copies of it whose cache entries the next step overwrites: a
    verify pass's shapes; psjax.decoding.autoregressive says why). The cache is not committed."""
    if rows < 1:  # rows is static: this fails while tracing, before anything compiles
        raise ValueError(f"step_rows must be >= 1 (a step feeds its token), got step_rows={rows}")
    positions = cache.lengths[:, None] + jnp.arange(rows)[None]
    return module.apply({"params": params}, jnp.tile(token[:, None], (1, rows)), positions, cache)


@dataclasses.dataclass
class Generation:
    """What a generate call returns, on the host."""

    tokens: np.ndarray  # [B, max_new_tokens], rows padded after num_generated
    num_generated: np.ndarray  # [B], EOS included where it was produced
    steps: int  # target forward passes after prefill (loop iterations)
    accepted: np.ndarray | None = None  # [steps, B] tokens committed per step (speculative)

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.num_generated)]

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward pass (the bonus token included)."""
        if self.accepted is None:
            return 1.0
        live = self.accepted[self.accepted > 0]
        return float(live.mean()) if live.size else 0.0
