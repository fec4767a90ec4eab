"""Prompt lookup: training-free drafting by n-gram match in the context.

The last n tokens (n from `max_ngram` down to `min_ngram`) are searched for earlier in the
sequence; the tokens that followed the most recent match are the draft. Rank r candidates come
from the r-th most recent match, so trees work too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from psjax.decoding.sampling import top_k
from psjax.drafters.base import Context, Drafter, Proposal


@dataclasses.dataclass(frozen=True)
class PromptLookup(Drafter):
    max_ngram: int = 3
    min_ngram: int = 1
    deterministic = True

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}")

    @property
    def vocab_size(self):
        return None

    def init_state(self, params, prompt, context, cache_length, depth=None):
        return ()

    def propose(self, params, state, context: Context, depth, width, sampling, rng):
        tokens, usable = self.continuations(context, depth, width)
        return Proposal(jnp.where(usable, tokens, 0), None), state

    def continuations(self, context: Context, depth: int, width: int
                      ) -> tuple[jax.Array, jax.Array]:
        """([B, depth, width] tokens, [B, depth, width] usable): rank r's continuation of the
        r-th most recent match, and whether it exists (a match was found and the text goes on
        that far)."""
        seq, seq_len = context.sequence, context.seq_len
        b, s = seq.shape
        found = jnp.zeros((b,), bool)
        starts = jnp.zeros((b, width), jnp.int32)  # where each rank's continuation begins
        valid = jnp.zeros((b, width), bool)
        for g in range(self.max_ngram, self.min_ngram - 1, -1):
            tail = jnp.take_along_axis(seq, jnp.clip(seq_len[:, None] - g + jnp.arange(g), 0),
                                       axis=1)  # [B, g]
            windows = s - g + 1
            equal = jnp.ones((b, windows), bool)
            for i in range(g):
                equal &= seq[:, i:i + windows] == tail[:, i:i + 1]
            j = jnp.arange(windows)
            # The match must end before the tail starts, and the tail must exist.
            ok = equal & (j[None, :] + g < seq_len[:, None]) & (seq_len[:, None] >= g + 1)
            score, where = top_k(jnp.where(ok, j[None, :], -1), width)
            take = ~found[:, None]
            starts = jnp.where(take, where + g, starts)
            valid = jnp.where(take, score >= 0, valid)
            found |= ok.any(axis=1)
        index = starts[:, None, :] + jnp.arange(depth)[None, :, None]  # [B, depth, width]
        tokens = jnp.take_along_axis(seq, jnp.clip(index, 0, s - 1).reshape(b, -1), axis=1)
        tokens = tokens.reshape(b, depth, width)
        return tokens, valid[:, None, :] & (index < seq_len[:, None, None])
