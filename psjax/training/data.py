"""Training batches: self-distilled sequences, in a deterministic order that resumes exactly.

An example is a dict with `tokens` (prompt + answer ids) and `prompt_length`. Any random-access
source works: a TFDS ArrayRecord data source (psjax.data.builders.SelfDistilled) or a list. The
order is a fixed permutation per epoch, so a position (examples consumed) names the next batch.
`split_holdout` keeps the last examples out of training, to measure on data never trained on.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np


def collate(examples: Sequence[dict], max_length: int, pad_id: int = 0) -> dict:
    """Crops/pads to [B, max_length]; `lengths` counts real tokens, `prompt_lengths` the prompt."""
    b = len(examples)
    tokens = np.full((b, max_length), pad_id, np.int32)
    lengths = np.zeros((b,), np.int32)
    prompt_lengths = np.zeros((b,), np.int32)
    for i, ex in enumerate(examples):
        seq = np.asarray(ex["tokens"], np.int32)[:max_length]
        tokens[i, :len(seq)] = seq
        lengths[i] = len(seq)
        prompt_lengths[i] = min(int(ex["prompt_length"]), len(seq))
    return {"tokens": tokens, "lengths": lengths, "prompt_lengths": prompt_lengths}


class _Range(Sequence):
    """source[start:stop] without copying (a TFDS data source does not slice)."""

    def __init__(self, source: Sequence[Any], start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.source[self.start + i]


def split_holdout(source: Sequence[Any], num: int, batch_size: int, max_length: int
                  ) -> tuple[Sequence[Any], list[dict]]:
    """(training examples, held-out batches): the last `num` examples, rounded down to whole
    batches, are collated once and never trained on."""
    num = (min(num, len(source) - 1) // batch_size) * batch_size if num > 0 else 0
    held = _Range(source, len(source) - num, len(source))
    return (_Range(source, 0, len(source) - num),
            [collate([held[i] for i in range(b, b + batch_size)], max_length)
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
