"""Static draft trees: the shape of what a drafter proposes and the target verifies at once.

A tree is a tuple of nodes; node i (1-based, 0 is the root: the last committed token) sits at
`depth[i]`, takes the candidate of rank `rank[i]` that the drafter proposed for that depth, and
hangs under `parent[i]`. A chain of k drafts is the tree whose nodes all take rank 0. Everything
here is numpy and static: the decode loop compiles once per tree.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tree:
    parents: tuple[int, ...]  # parent of node i+1 (0 = the root); parents precede children
    ranks: tuple[int, ...]  # candidate rank of node i+1 at its depth

    def __post_init__(self):
        if len(self.parents) != len(self.ranks):
            raise ValueError("a tree needs one parent and one rank per node")
        if not self.parents:
            raise ValueError("a tree needs at least one node (k >= 1)")
        for i, (p, r) in enumerate(zip(self.parents, self.ranks), start=1):
            if not 0 <= p < i:
                raise ValueError(
                    f"node {i} has parent index {p}; a parent must be the root (0) or an "
                    f"earlier node (1..{i - 1})")
            if r < 0:
                raise ValueError(f"node {i} has negative rank {r}")
        siblings = [(p, r) for p, r in zip(self.parents, self.ranks)]
        if len(set(siblings)) != len(siblings):
            raise ValueError("two children of one node take the same candidate rank")

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def chain(cls, k: int) -> "Tree":
        if k < 1:
            raise ValueError(f"the draft length k must be >= 1, got {k}")
        return cls(tuple(range(k)), (0,) * k)

    @classmethod
    def from_branching(cls, branching: Sequence[int]) -> "Tree":
        """Every node at depth d has branching[d] children (ranks 0..b-1): e.g. (4, 2, 1)."""
        if not branching or any(b < 1 for b in branching):
            raise ValueError(f"branching needs positive entries, got {tuple(branching)}")
        return cls.from_paths(
            path for depth in range(1, len(branching) + 1)
            for path in itertools.product(*(range(b) for b in branching[:depth])))

    @classmethod
    def from_paths(cls, paths) -> "Tree":
        """Medusa-style choices: each node is the tuple of candidate ranks on its path."""
        paths = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        index = {(): 0}
        parents, ranks = [], []
        for i, path in enumerate(paths, start=1):
            if path[:-1] not in index:
                raise ValueError(f"path {path} has no parent path {path[:-1]} in the tree")
            index[path] = i
            parents.append(index[path[:-1]])
            ranks.append(path[-1])
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def parse(cls, spec: str) -> "Tree":
        """A command-line tree: branching per depth ("4,2,2,1"), or "FILE.json:N", the
        designed tree of N nodes in a file experiments/design_tree.py wrote."""
        if ":" not in spec:
            return cls.from_branching([int(b) for b in spec.split(",")])
        path, size = spec.rsplit(":", 1)
        with open(path) as f:
            designed = json.load(f)["designed"]
        if size not in designed:
            raise ValueError(f"{path} holds designed trees of {sorted(designed, key=int)} "
                             f"nodes, not {size}")
        return cls.from_paths(designed[size])

    @staticmethod
    def designed_file(spec: str) -> str | None:
        """The design_tree.py file a "FILE.json:N" spec names; None for a branching."""
        return spec.rsplit(":", 1)[0] if ":" in spec else None

    @classmethod
    def design(cls, ranks: np.ndarray, num_nodes: int) -> "Tree":
        """The tree of at most `num_nodes` nodes that accepts the most drafts on `ranks` (see
        `accepted_per_step`), for a drafter whose candidates at a depth do not depend on the
        path above (ParallelSpec, Medusa). A path is accepted on a row iff the row's ranks
        start with it, so a tree accepts the sum of its paths' counts; a path never counts more
        than its parent, so the `num_nodes` most-counted paths (shorter first on ties) form a
        tree, and the best one (Medusa's sparse-tree construction, exact on these rows).
        Paths no row reaches are left out."""
        counts = {}
        for row in np.asarray(ranks):
            for depth in range(len(row)):
                if row[depth] < 0:
                    break
                path = tuple(int(r) for r in row[:depth + 1])
                counts[path] = counts.get(path, 0) + 1
        best = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:num_nodes]
        if not best:
            raise ValueError("no row accepts even one draft: nothing to build a tree from")
        return cls.from_paths(best)

    @functools.cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """Each node's path of candidate ranks from the root (from_paths' input)."""
        out = [()]
        for p, r in zip(self.parents, self.ranks):
            out.append(out[p] + (r,))
        return tuple(out[1:])

    def accepted_per_step(self, ranks: np.ndarray) -> float:
        """tau (drafts accepted + the bonus token) this tree gets on `ranks` [N, D]: for N
        drafting positions, the rank among the drafter's candidates of the target's greedy
        token at each depth (-1: not a candidate, or past the end of the text), averaged over
        the positions. Decoding drafts only where a step starts, which skips the positions a
        long accept covers: `decoded` gives its tau."""
        return position_mean(self.accepted(ranks))

    def accepted(self, ranks: np.ndarray) -> np.ndarray:
        """[N] drafts each row accepts: the longest start of its ranks that is a path."""
        paths = set(self.paths)
        out = np.zeros(len(ranks), np.int64)
        for i, row in enumerate(np.asarray(ranks)):
            while out[i] < len(row) and tuple(int(r) for r in row[:out[i] + 1]) in paths:
                out[i] += 1
        return out

    def decoded(self, ranks: np.ndarray) -> tuple[int, int]:
        """(tokens, steps) of greedy decoding over one text whose consecutive drafting
        positions are the rows of `ranks` (`decode_walk` of their `accepted`)."""
        return decode_walk(self.accepted(ranks))

    # --- derived static arrays ---------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @functools.cached_property
    def depths(self) -> np.ndarray:
        """[T+1] depth of each node, the root's 0."""
        depth = [0]
        for p in self.parents:
            depth.append(depth[p] + 1)
        return np.array(depth, np.int32)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @property
    def width(self) -> int:
        """How many candidates a drafter must propose per depth."""
        return max(self.ranks) + 1

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(self.num_nodes))

    @functools.cached_property
    def all_parents(self) -> np.ndarray:
        """[T+1] parent of each node; the root points at itself."""
        return np.array((0,) + self.parents, np.int32)

    @functools.cached_property
    def ancestors(self) -> np.ndarray:
        """[T+1, D+1]: row i is the path root -> i, padded by repeating i."""
        out = np.zeros((self.num_nodes + 1, self.max_depth + 1), np.int32)
        for i in range(self.num_nodes + 1):
            path, node = [], i
            while node:
                path.append(node)
                node = self.all_parents[node]
            path = [0] + path[::-1]
            out[i] = path + [i] * (self.max_depth + 1 - len(path))
        return out

    @functools.cached_property
    def attention(self) -> np.ndarray:
        """[T+1, T+1] bool: node i sees node j iff j is on the path root -> i."""
        mask = np.zeros((self.num_nodes + 1,) * 2, bool)
        for i, path in enumerate(self.ancestors):
            mask[i, path] = True
        return mask

    @functools.cached_property
    def earlier_siblings(self) -> np.ndarray:
        """[T, T] bool: node j+1 shares node i+1's parent and comes before it in rank order."""
        parents, ranks = np.array(self.parents), np.array(self.ranks)
        return (parents[:, None] == parents[None, :]) & (ranks[None, :] < ranks[:, None])

    @functools.cached_property
    def children(self) -> np.ndarray:
        """[T+1, W] children of each node in rank order, -1 padded."""
        width = max(1, max(np.bincount(self.parents, minlength=self.num_nodes + 1)))
        out = -np.ones((self.num_nodes + 1, width), np.int32)
        for node in range(self.num_nodes + 1):
            kids = [i for i, p in enumerate(self.parents, start=1) if p == node]
            kids.sort(key=lambda i: self.ranks[i - 1])
            out[node, :len(kids)] = kids
        return out


def position_mean(accepted: np.ndarray) -> float:
    """tau as the mean over drafting positions that accept `accepted` drafts each
    (`Tree.accepted`): 1 + their mean, the bonus token included; 1.0 for no position."""
    return 1.0 + float(np.mean(accepted)) if len(accepted) else 1.0


def decode_walk(accepted: np.ndarray) -> tuple[int, int]:
    """(tokens, steps) of greedy decoding over one text whose consecutive drafting positions
    accept `accepted` drafts each (`Tree.accepted`): from the first, each step accepts its
    drafts and emits one more token, and the next step drafts after them; tau = tokens / steps."""
    tokens, steps, i = 0, 0, 0
    while i < len(accepted):
        tokens, steps, i = tokens + int(accepted[i]) + 1, steps + 1, i + int(accepted[i]) + 1
    return tokens, steps
