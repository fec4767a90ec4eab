"""The drafter interface: what the speculative loop asks of every drafter, and nothing more.

A drafter is a static, hashable description (a frozen dataclass: jitted functions take it as a
static argument); its parameters and its state (its own cache, pending target features) are
explicit pytrees. The loop owns the target's cache and the token sequence, and never branches on
the drafter's kind.

Per step the loop calls `propose` (candidates for each of the next `depth` positions, `width` per
position, which the static tree turns into nodes), verifies them with the target, then calls
`commit` with what was accepted.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import flax.struct
import jax

from psjax.decoding.sampling import Sampling


@flax.struct.dataclass
class Prompt:
    """What the drafter sees once, after the target's prefill."""

    tokens: jax.Array  # [B, P] right-padded prompts
    lengths: jax.Array  # [B]
    features: jax.Array  # [B, P, F] target features of the prompt positions (feature_layers)


@flax.struct.dataclass
class Context:
    """The state of generation when a draft is asked for."""

    sequence: jax.Array  # [B, S] prompt + generated tokens; slots >= seq_len are garbage
    seq_len: jax.Array  # [B]; sequence[b, seq_len-1] is the root: committed, not yet in the
    #                     target's cache
    target_params: Any  # the drafters that reuse the target's embeddings read them here


@flax.struct.dataclass
class Accepted:
    """What verification kept this step (the root included)."""

    num_path: jax.Array  # [B] nodes kept on the path: the old root plus the accepted drafts
    path_features: jax.Array  # [B, D+1, F] target features at those nodes (padded)
    seq_len: jax.Array  # [B] the new sequence length; the new root is the bonus token


class Proposal(NamedTuple):
    candidates: jax.Array  # [B, depth, width] int32, rank-ordered candidates per position
    # [B, depth, V]: the distribution each position's candidates were drawn from (sampling
    # with a non-deterministic drafter); None otherwise.
    q: jax.Array | None


class Drafter(abc.ABC):
    """Subclasses are frozen dataclasses."""

    # Candidates are a deterministic function of the context (q is one-hot on them).
    deterministic: bool = False

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int | None:
        """The vocabulary the drafter proposes from (None: any, it copies from the context)."""

    @property
    def max_depth(self) -> int | None:
        """The deepest draft it can propose in one step (None: unbounded)."""
        return None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The target layers whose outputs reach the drafter as features
        (`Transformer.feature_layers`; empty: the final hidden state)."""
        return ()

    def cache_lookahead(self, depth: int) -> int:
        """Cache slots past the root one step may write, for a draft `depth` deep."""
        return 0

    @abc.abstractmethod
    def init_state(self, params, prompt: Prompt, context: Context, cache_length: int,
                   depth: int | None = None) -> Any:
        """`cache_length` has room for the prompt, the generation and one step's lookahead;
        `depth`: the deepest draft a step verifies (the tree's), so a step commits at most
        depth + 1 tokens (None: `max_depth`)."""

    @abc.abstractmethod
    def propose(self, params, state, context: Context, depth: int, width: int,
                sampling: Sampling, rng: jax.Array) -> tuple[Proposal, Any]:
        ...

    def commit(self, params, state, accepted: Accepted) -> Any:
        return state
