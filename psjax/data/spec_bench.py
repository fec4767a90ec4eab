"""Spec-Bench questions (`question.jsonl`) grouped into Spec-Bench's six display categories."""

from __future__ import annotations

import json
import os
from typing import Iterable

MT_BENCH = "Multi-turn Conversation"
CATEGORIES = (MT_BENCH, "Translation", "Summarization", "Question Answering",
              "Mathematical Reasoning", "Retrieval-aug. Generation")
_DISPLAY = {"translation": "Translation", "summarization": "Summarization",
            "qa": "Question Answering", "math_reasoning": "Mathematical Reasoning",
            "rag": "Retrieval-aug. Generation"}
# The 8 MT-bench categories (ids 81-160) together form "Multi-turn Conversation".
_MT_BENCH_RAW = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                 "humanities")

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                            "spec_bench", "question.jsonl")


def display_category(raw: str) -> str:
    if raw in _MT_BENCH_RAW:
        return MT_BENCH
    if raw in _DISPLAY:
        return _DISPLAY[raw]
    raise ValueError(f"unknown Spec-Bench category {raw!r}")


def load_questions(path: str | os.PathLike = DEFAULT_PATH, per_category: int | None = None,
                   categories: Iterable[str] | None = None) -> list[dict]:
    """Questions ordered by question id: dicts with `question_id`, `category` (one of
    CATEGORIES), `source_category` (the file's own, e.g. 'writing') and `turns`.

    `per_category` keeps the first that many (by question id) of each display category;
    `categories` (display names) keeps only those categories."""
    wanted = None
    if categories is not None:
        wanted = set(categories)
        unknown = wanted - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; known: {list(CATEGORIES)}")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: r["question_id"])
    out, taken = [], {}
    for row in rows:
        category = display_category(row["category"])
        if wanted is not None and category not in wanted:
            continue
        if per_category is not None and taken.get(category, 0) >= per_category:
            continue
        taken[category] = taken.get(category, 0) + 1
        out.append({"question_id": row["question_id"], "category": category,
                    "source_category": row["category"], "turns": list(row["turns"])})
    return out


def interleave(questions: list[dict]) -> list[dict]:
    """Round-robin over categories (in CATEGORIES order): the first n cover as many categories
    as possible, and consecutive questions (a batch) differ in category and length."""
    groups = [[q for q in questions if q["category"] == c] for c in CATEGORIES]
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def first_turns(path: str | os.PathLike, n: int) -> list[list[str]]:
    """The first turn of n questions, interleaved across categories (n = 18: 3 per category),
    each as a one-turn conversation for a chat template: the benchmarks' fixed prompt set."""
    per_category = -(-n // len(CATEGORIES))
    return [q["turns"][:1] for q in interleave(load_questions(path, per_category))[:n]]
