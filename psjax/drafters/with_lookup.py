"""Prompt lookup in front of another drafter: at every depth, the continuation of the latest
n-gram match in the context is the rank-0 candidate, the drafter's own candidates follow it.

Text that repeats its context (summaries, retrieval answers, code edits) gives long exact
continuations that a one-layer drafter predicts poorly, and the rest gives the drafter's
drafts: one static tree verifies both in one target pass. Where no match exists (or the
match's text ends) the drafter's candidates move up one rank, and a candidate equal to the
lookup's is not repeated, so no node of the tree is wasted on a duplicate. Past the
drafter's own depth (ParallelSpec drafts k + 1) only the lookup proposes.

The candidates are a deterministic function of the context: the drafter proposes greedily
(its top-ranked tokens) even when decoding samples, and verification takes each node's q as
one-hot on its token (`verify.stochastic` with draft_q None), which keeps sampling lossless.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from psjax.decoding.sampling import GREEDY
from psjax.drafters.base import Context, Drafter, Proposal
from psjax.drafters.prompt_lookup import PromptLookup


def merge_candidates(lookup: jax.Array, usable: jax.Array, own: jax.Array) -> jax.Array:
    """[B, D, W]: lookup [B, D] first where usable, then own [B, D, W] in its order, minus the
    lookup's token; unusable lookups and the duplicates move past the W kept."""
    width = own.shape[-1]
    merged = jnp.concatenate([lookup[..., None], own], axis=-1)
    duplicate = usable[..., None] & (own == lookup[..., None])
    key = jnp.concatenate([jnp.where(usable, 0, 2)[..., None],
                           jnp.where(duplicate, 2, 1)], axis=-1)
    order = jnp.argsort(key, axis=-1, stable=True)[..., :width]
    return jnp.take_along_axis(merged, order, axis=-1)


def combine(own: jax.Array, lookup: jax.Array, usable: jax.Array) -> jax.Array:
    """[B, D, W] candidates from the drafter's own [B, D_own, W] (D_own <= D) and the lookup's
    [B, D] continuation: `merge_candidates`, and past D_own the lookup's token alone at rank 0
    (0 where it has none; ranks above are 0)."""
    depth, own_depth, width = lookup.shape[1], own.shape[1], own.shape[2]
    merged = merge_candidates(lookup, usable,
                              jnp.pad(own, ((0, 0), (0, depth - own_depth), (0, 0))))
    deep = jnp.arange(depth)[:, None] >= own_depth
    return jnp.where(deep & (jnp.arange(width) > 0), 0, merged)


@dataclasses.dataclass(frozen=True)
class WithPromptLookup(Drafter):
    drafter: Drafter
    lookup: PromptLookup = PromptLookup()
    deterministic = True

    @property
    def vocab_size(self):
        return self.drafter.vocab_size

    @property
    def feature_layers(self):
        return self.drafter.feature_layers

    def _own_depth(self, depth: int) -> int:
        own = self.drafter.max_depth
        return depth if own is None else min(depth, own)

    def cache_lookahead(self, depth: int) -> int:
        return self.drafter.cache_lookahead(depth)

    def init_state(self, params, prompt, context, cache_length, depth=None):
        # The drafter's state must hold what a step commits, the lookup's deeper drafts too.
        return self.drafter.init_state(params, prompt, context, cache_length, depth)

    def propose(self, params, state, context: Context, depth, width, sampling, rng):
        own, state = self.drafter.propose(params, state, context, self._own_depth(depth), width,
                                          GREEDY, rng)
        tokens, usable = self.lookup.continuations(context, depth, 1)
        return Proposal(combine(own.candidates, tokens[..., 0], usable[..., 0]), None), state

    def commit(self, params, state, accepted):
        return self.drafter.commit(params, state, accepted)
