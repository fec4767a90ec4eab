"""The Spec-Bench question file splits into Spec-Bench's six categories of 80."""

import collections

from conftest import SPEC_BENCH
from psjax.data import spec_bench


def test_all_questions():
    questions = spec_bench.load_questions(SPEC_BENCH)
    assert len(questions) == 480
    counts = collections.Counter(q["category"] for q in questions)
    assert set(counts) == set(spec_bench.CATEGORIES)
    assert all(n == 80 for n in counts.values())
    mt = [q["question_id"] for q in questions if q["category"] == spec_bench.MT_BENCH]
    assert mt == list(range(81, 161))
    assert all(q["turns"] and all(isinstance(t, str) for t in q["turns"]) for q in questions)


def test_per_category_and_filter():
    questions = spec_bench.load_questions(SPEC_BENCH, per_category=3)
    assert len(questions) == 18
    assert collections.Counter(q["category"] for q in questions) == {
        c: 3 for c in spec_bench.CATEGORIES}
    assert [q["question_id"] for q in questions] == sorted(q["question_id"] for q in questions)
    assert [q["question_id"] for q in questions[:3]] == [81, 82, 83]  # first by id
    only = spec_bench.load_questions(SPEC_BENCH, per_category=2, categories=["Translation"])
    assert [q["category"] for q in only] == ["Translation"] * 2
    mixed = spec_bench.interleave(questions)
    assert len({q["category"] for q in mixed[:6]}) == 6
    assert sorted(q["question_id"] for q in mixed) == sorted(q["question_id"] for q in questions)


def test_first_turns():
    turns = spec_bench.first_turns(SPEC_BENCH, 8)
    by_id = {q["question_id"]: q for q in spec_bench.load_questions(SPEC_BENCH)}
    assert len(turns) == 8 and all(len(t) == 1 for t in turns)
    assert turns[0] == by_id[81]["turns"][:1]  # MT-bench first, its first turn only
    assert turns[6] == by_id[82]["turns"][:1]  # then round-robin again
