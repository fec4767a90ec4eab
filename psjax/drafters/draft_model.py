"""Draft-model speculative decoding (SpS): a smaller model with the target's tokenizer drafts
autoregressively, e.g. Qwen2.5-Coder-0.5B for the 1.5B.

Its cache keeps the committed sequence (the root included); the drafts it writes while proposing
are rolled back by resetting the index.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from psjax.decoding import common
from psjax.decoding.sampling import Sampling, probabilities, top_k
from psjax.drafters.base import Context, Drafter, Proposal
from psjax.models.kv_cache import KVCache
from psjax.models.llama import Transformer


def candidates_from_logits(logits: jax.Array, width: int, sampling: Sampling, rng: jax.Array):
    """Rank-ordered candidates [B, width] and the distribution they came from [B, V].

    Greedy: the top-`width` tokens (`sampling.top_k`: fused rounds of argmax). Sampling:
    `width` independent draws from q, as the lossless multi-candidate rule requires."""
    if sampling.greedy:
        return top_k(logits, width)[1], None
    q = probabilities(logits, sampling)
    draws = jax.random.categorical(rng, jnp.log(q)[:, None, :], axis=-1,
                                   shape=(q.shape[0], width))
    return draws.astype(jnp.int32), q


@dataclasses.dataclass(frozen=True)
class DraftModel(Drafter):
    module: Transformer

    @property
    def vocab_size(self):
        return self.module.config.vocab_size

    def cache_lookahead(self, depth: int) -> int:
        return depth + 1  # the catch-up block, then the drafts after the root

    def init_state(self, params, prompt, context, cache_length, depth=None):
        cache = KVCache.create(self.module.config, prompt.tokens.shape[0], cache_length,
                               self.module.dtype)
        _, _, cache = common.prefill(self.module, params, prompt.tokens, prompt.lengths, cache)
        return cache

    def propose(self, params, cache: KVCache, context: Context, depth, width, sampling, rng):
        seq, seq_len = context.sequence, context.seq_len
        # Catch up on what was committed since the last step (at most depth + 1 tokens).
        index = cache.lengths[:, None] + jnp.arange(depth + 1)
        pending = jnp.take_along_axis(seq, jnp.clip(index, 0, seq.shape[1] - 1), axis=1)
        out = self.module.apply({"params": params}, pending, index, cache,
                                logits_at=seq_len - 1 - cache.lengths)
        cache = out.cache.replace(lengths=seq_len)
        keys = jax.random.split(rng, depth)
        cands, q = candidates_from_logits(out.logits[:, 0], width, sampling, keys[0])

        def step(carry, key):
            cache, token = carry
            out = self.module.apply({"params": params}, token[:, None], cache.lengths[:, None],
                                    cache)
            cands, q = candidates_from_logits(out.logits[:, 0], width, sampling, key)
            return (out.cache.commit(jnp.ones_like(cache.lengths)), cands[:, 0]), (cands, q)

        (final, _), (later, later_q) = jax.lax.scan(step, (cache, cands[:, 0]), keys[1:])
        candidates = jnp.concatenate([cands[:, None], jnp.moveaxis(later, 0, 1)], axis=1)
        if q is not None:
            q = jnp.concatenate([q[:, None], jnp.moveaxis(later_q, 0, 1)], axis=1)
        # Roll the drafts back: their entries stay in place, uncommitted.
        return Proposal(candidates, q), final.replace(lengths=seq_len)
