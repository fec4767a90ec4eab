"""A draft vocabulary: the drafter proposes only from the N tokens most frequent in the answers it
was trained on (FR-Spec, Zhao et al. 2025, arXiv 2502.14856; EAGLE-3 drafts from 32k of
Llama-3's 128k tokens).

Why: the drafter borrows the target's LM head, and at Qwen2.5's 151,936 tokens that head is 136M
of the 0.5B's parameters: reading it is about half of a drafting pass at batch 1. Over N rows it
reads N / V of it. What it costs: a token outside the N is never drafted, so a draft the full head
would have got right there is lost (how often: `coverage`).

Verification is untouched (the target's full distribution decides), so greedy output is the
same and sampling stays lossless: the drafter's q is zero outside the N tokens, and the residual
max(0, p - q) gives them their mass.

The ranking is a property of a trained drafter: `save` writes it into the drafter's directory
(`FILE`; experiments/draft_vocab.py counts the training answers), `load` takes its first N.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Iterable, Sequence

import numpy as np

FILE = "draft_vocab.npz"  # not *.safetensors: those are the drafter's weights


@dataclasses.dataclass(frozen=True, eq=False)
class DraftVocab:
    """The token ids [N] a drafter may propose. Hashable by content: a drafter holding one is a
    static argument of the jitted loop, and the ids become a constant of its program."""

    ids: np.ndarray

    def __post_init__(self):
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"a draft vocabulary is a non-empty 1-D array of token ids, got "
                             f"shape {ids.shape} of {ids.dtype}")
        if ids.min() < 0 or np.unique(ids).size != ids.size:
            raise ValueError("a draft vocabulary's token ids must be distinct and >= 0")
        object.__setattr__(self, "ids", ids.astype(np.int32))

    @property
    def size(self) -> int:
        return int(self.ids.size)

    @functools.cached_property
    def _key(self) -> tuple[int, str]:
        return self.size, hashlib.sha1(self.ids.tobytes()).hexdigest()

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, DraftVocab) and self._key == other._key


def count(token_lists: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """How often each of the vocab_size token ids occurs in the lists [V] (int64)."""
    counts = np.zeros(vocab_size, np.int64)
    for tokens in token_lists:
        tokens = np.asarray(tokens, np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"token id {int(tokens.max())} is outside the vocabulary of "
                             f"{vocab_size}: count the answers of this drafter's target")
        counts += np.bincount(tokens, minlength=vocab_size)
    return counts


def ranking(counts: np.ndarray) -> np.ndarray:
    """Token ids from most to least frequent (equal counts: the lower id first)."""
    return np.argsort(-np.asarray(counts), kind="stable").astype(np.int32)


def coverage(counts: np.ndarray, sizes: Sequence[int]) -> dict[int, float]:
    """The share of counted tokens that the N most frequent cover, for each N in sizes."""
    cumulative = np.cumsum(np.sort(np.asarray(counts))[::-1])
    total = max(int(cumulative[-1]), 1)
    return {int(n): float(cumulative[min(n, cumulative.size) - 1] / total) for n in sizes}


def save(directory: str, counts: np.ndarray) -> str:
    """Writes the ranking (and the counts it came from) into a drafter's directory."""
    path = os.path.join(directory, FILE)
    np.savez(path, token_ids=ranking(counts), counts=np.asarray(counts, np.int64))
    return path


def load(directory: str, size: int, vocab_size: int) -> DraftVocab:
    """The `size` most frequent tokens of the ranking `save` wrote into `directory`, in id
    order: the drafter gathers their rows of the target's head at every call, and columns of an
    untied [D, V] head read in order touch each memory sector once instead of once per token."""
    path = os.path.join(directory, FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: count the drafter's training answers first "
            f"(python experiments/draft_vocab.py --data DIR[,DIR] --drafter {directory})")
    with np.load(path) as saved:
        ids = saved["token_ids"]
    if ids.size != vocab_size:
        raise ValueError(f"{path} ranks {ids.size} tokens but the target's vocabulary has "
                         f"{vocab_size}: it was counted for another target")
    if not 1 <= size <= vocab_size:
        raise ValueError(f"a draft vocabulary of {size} tokens: choose 1..{vocab_size}")
    return DraftVocab(np.sort(ids[:size]))
