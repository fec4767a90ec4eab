"""Training batches: self-distilled sequences, in a deterministic order that resumes exactly.

An example is a dict with `tokens` (prompt + answer ids) and `prompt_length`. Any random-access
source works: a TFDS ArrayRecord data source (psjax.data.builders.SelfDistilled) or a list. The
order is a fixed permutation per epoch, so a position (examples consumed) names the next batch.
`split_holdout` keeps a seeded random sample out of training, to measure on data never
trained on.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np


def collate(examples: Sequence[dict], max_length: int, pad_id: int = 0) -> dict:
    """Crops/pads to [B, max_length]; `lengths` counts real tokens, `prompt_lengths` the prompt.

    A sequence longer than `max_length` loses prompt tokens from the front first, down to the
    last `max_length // 4` of its prompt, then answer tokens from the end (`crop_start`):
    groups are anchored in the answer only, so a head crop would train nothing on an answer
    after a long prompt. The target's features and distributions are computed on the window
    itself, so what the drafter learns stays self-consistent."""
    b = len(examples)
    tokens = np.full((b, max_length), pad_id, np.int32)
    lengths = np.zeros((b,), np.int32)
    prompt_lengths = np.zeros((b,), np.int32)
    for i, ex in enumerate(examples):
        seq = np.asarray(ex["tokens"], np.int32)
        start = crop_start(len(seq), int(ex["prompt_length"]), max_length)
        seq = seq[start:start + max_length]
        tokens[i, :len(seq)] = seq
        lengths[i] = len(seq)
        prompt_lengths[i] = min(int(ex["prompt_length"]) - start, len(seq))
    return {"tokens": tokens, "lengths": lengths, "prompt_lengths": prompt_lengths}


def crop_start(length: int, prompt_length: int, max_length: int) -> int:
    """Where `collate`'s window of `max_length` tokens starts in a sequence of `length`."""
    return max(0, min(length - max_length, prompt_length - max_length // 4))


class _Subset(Sequence):
    """source[indices] without copying (a TFDS data source does not slice)."""

    def __init__(self, source: Sequence[Any], indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.source[int(self.indices[i])]


def split_holdout(source: Sequence[Any], num: int, batch_size: int, max_length: int,
                  seed: int = 0) -> tuple[Sequence[Any], list[dict]]:
    """(training examples, held-out batches): `num` examples drawn at random (seeded), rounded
    down to whole batches, are collated once and never trained on. Drawn from the whole source,
    not its tail, so that a mix of sets (data.jsonl_dir A,B,C, concatenated in that order) is
    held out in its proportions: the tail would be the last set alone."""
    num = (min(num, len(source) - 1) // batch_size) * batch_size if num > 0 else 0
    # A stream of its own: `batches` seeds its epochs with [seed, epoch].
    held = np.sort(np.random.default_rng([seed, 2**32 - 1]).choice(len(source), num,
                                                                   replace=False))
    return (_Subset(source, np.setdiff1d(np.arange(len(source)), held)),
            [collate([source[int(i)] for i in held[b:b + batch_size]], max_length)
             for b in range(0, num, batch_size)])


def batches(source: Sequence[Any], batch_size: int, max_length: int, seed: int,
            position: int = 0) -> Iterator[tuple[int, dict]]:
    """Yields (position after this batch, batch) forever, starting at `position`."""
    n = len(source)
    if n == 0:
        raise ValueError("the training data source is empty")
    while True:
        epoch, offset = divmod(position, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        ids = [order[(offset + i) % n] if offset + i < n else
               np.random.default_rng([seed, epoch + 1]).permutation(n)[offset + i - n]
               for i in range(batch_size)]
        position += batch_size
        yield position, collate([source[int(i)] for i in ids], max_length)
