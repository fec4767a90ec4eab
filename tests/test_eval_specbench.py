"""The Spec-Bench evaluation library on a tiny random target with pre-tokenized stub questions:
summary schema, the baseline's speedup of exactly 1, lossless prompt lookup and ParallelSpec
(random drafter: no divergence, no mismatch), a planted divergence caught and judged by the
float32 referee, a failing method isolated."""

import datetime
import json
import os

import jax
import pytest

import tiny_models
from psjax.bench import specbench
from psjax.convert import hf
from psjax.convert.drafter_hf import save_drafter
from psjax.data.spec_bench import CATEGORIES, MT_BENCH
from psjax.decoding.tree import Tree
from psjax.drafters import parallelspec
from psjax.models.llama import Transformer
from psjax.models.target import Target

VOCAB = 64
N_NEW = 12
SPECULATIVE = ["pld", "pld_tree", "parallelspec", "parallelspec_k2", "parallelspec_tree",
               "parallelspec_lookup", "parallelspec_lookup_n3"]
QUESTIONS = [
    {"question_id": 81, "category": MT_BENCH, "turns": ["write a poem", "now shorter"]},
    {"question_id": 161, "category": "Translation", "turns": ["translate: hello there"]},
    {"question_id": 241, "category": "Translation", "turns": ["translate: good night"]},
]


def prompt_fn(user_turns, assistant_turns):
    """A stand-in chat template: a few ids per turn, the answers' ids back in; under 16 ids so
    every prompt has one padded width."""
    ids = [1]
    for i, turn in enumerate(user_turns):
        ids += [2 + ord(c) % (VOCAB - 2) for c in turn[:4]]
        if i < len(assistant_turns):
            ids += [int(x) for x in assistant_turns[i].split()[:3]]
    return ids


def decode(tokens):
    return " ".join(map(str, tokens))


class Planted(specbench.Method):
    """The baseline's output with token 2 changed: a divergence at index 2."""

    def __init__(self, ar):
        self.name, self.ar = "planted", ar

    def generate(self, prompt):
        out = self.ar.generate(prompt)
        out.tokens[2] = (out.tokens[2] + 1) % VOCAB
        return out


class Renamed(specbench.Method):
    """Another method's output under a name: planted (token 2 changed) or as it came."""

    def __init__(self, name, inner):
        self.name, self.inner = name, inner

    def generate(self, prompt):
        return self.inner.generate(prompt)


class Broken(specbench.Method):
    name = "broken"

    def generate(self, prompt):
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _, path = tiny_models.make("llama_gqa_untied", vocab_size=VOCAB)
    config, params = hf.load_hf_dir(path)
    target = Target(Transformer(config), params)  # no tokenizer: no EOS ids
    # A random-weight ParallelSpec drafter, through its HF directory as a trained one would come.
    drafter_dir = str(tmp_path_factory.mktemp("drafter"))
    ps_config = parallelspec.ParallelSpecConfig(config, num_masks=2)
    drafter = parallelspec.build(ps_config, target.module)
    save_drafter(drafter_dir, ps_config, parallelspec.init_params(drafter, jax.random.PRNGKey(0)),
                 target_name="tiny")
    trees = tmp_path_factory.mktemp("trees") / "designed.json"  # as design_tree.py writes
    trees.write_text(json.dumps({"designed": {"3": [[0], [1], [0, 0]]}}))
    opts = specbench.Options(max_new_tokens=N_NEW, dtype="float32", pld_k=3, pld_tree_width=2,
                             drafter_dir=drafter_dir, ps_tree=Tree.from_branching((2, 1, 1)),
                             ps_lookup_tree=Tree.chain(5), ps_lookup_tree_file=str(trees))
    methods, skipped = specbench.make_methods(
        ["ar"] + SPECULATIVE, target, path, opts)
    assert not skipped
    methods += [Planted(methods[0]), Broken()]
    loads = []
    judge = specbench.Float32Judge(lambda: loads.append(1) or (target.module, params))
    records, failures = specbench.evaluate(QUESTIONS, methods, prompt_fn=prompt_fn,
                                           decode=decode, judge=judge, warmup=1,
                                           keep_text="diverged", log=lambda s: None)
    summary = specbench.summarize(records, card="cpu", target="tiny", command="pytest",
                                  failures=failures)
    return records, failures, summary, loads


def test_summary_schema(run, tmp_path):
    records, failures, summary, _ = run
    assert set(summary) == {"card", "date", "target", "command", "methods", "failed"}
    with_settings = specbench.summarize(records, card="cpu", target="tiny", command="pytest",
                                        settings={"matmul_attention": "chunked"})
    assert with_settings["settings"] == {"matmul_attention": "chunked"}
    datetime.date.fromisoformat(summary["date"])
    assert list(summary["methods"]) == ["ar", *SPECULATIVE, "planted"]
    columns = [MT_BENCH, "Translation", "overall"]
    for stats in summary["methods"].values():
        assert list(stats) == columns
        for cell in stats.values():
            assert set(cell) == {"speedup", "tau", "tokens_per_s", "divergences", "mismatches"}
            assert cell["tokens_per_s"] > 0
    assert all(c in CATEGORIES for c in columns[:-1])
    table = specbench.write_outputs(str(tmp_path), records, summary)
    assert table.splitlines()[-1].startswith("| broken | failed: RuntimeError: boom")
    assert "| pld | " in table
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == summary
    with open(tmp_path / "questions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 4 * (len(SPECULATIVE) + 2)  # 4 turns for each method that finished
    assert {"question_id", "category", "turn", "tokens", "seconds", "tokens_per_s", "accepted",
            "text", "diverged", "mismatch"} <= set(rows[0])
    assert os.path.getsize(tmp_path / "chart.png") > 1000


def test_baseline_is_one(run):
    _, _, summary, _ = run
    for cell in summary["methods"]["ar"].values():
        assert cell["speedup"] == 1.0 and cell["tau"] == 1.0
        assert cell["divergences"] == 0 and cell["mismatches"] == 0


def test_speculative_lossless(run):
    records, _, summary, _ = run
    for name in SPECULATIVE:
        for cell in summary["methods"][name].values():
            assert cell["divergences"] == 0 and cell["mismatches"] == 0
            assert cell["tau"] >= 1.0
        rows = [r for r in records if r["method"] == name]
        assert all(r["accepted"] and sum(r["accepted"]) == r["tokens"] - 1 for r in rows)
        assert all(r["text"] is None for r in rows)  # keep_text="diverged"
    ar = {(r["question_id"], r["turn"]): r["tokens"] for r in records if r["method"] == "ar"}
    assert set(ar.values()) == {N_NEW}  # no EOS ids: every turn runs to the limit


def test_planted_divergence_judged(run):
    records, failures, summary, loads = run
    rows = [r for r in records if r["method"] == "planted"]
    assert all(r["diverged"] and r["diverged_at"] == 2 for r in rows)
    assert all(r["mismatch"] == (r["gap"] > specbench.MISMATCH_GAP) for r in rows)
    assert all(r["gap_ulps"] > 0 and 0 <= r["float32_token"] < VOCAB for r in rows)
    assert all(r["text"] is not None for r in rows)
    assert summary["methods"]["planted"]["overall"]["divergences"] == 4
    assert loads == [1]  # the float32 model loads once, on the first divergence
    assert failures == {"broken": "RuntimeError: boom"}


def test_reference_ar_rows(tmp_path):
    """`reference="ar_rowsN"`: that method (autoregressive, N-row steps) runs second, is checked
    against ar, and every later method is checked against it instead of ar."""
    _, path = tiny_models.make("llama_gqa_untied", vocab_size=VOCAB)
    config, params = hf.load_hf_dir(path)
    target = Target(Transformer(config), params)
    opts = specbench.Options(max_new_tokens=N_NEW, dtype="float32", pld_k=3)
    (ar, ar_rows4, pld), _ = specbench.make_methods(["ar", "ar_rows4", "pld"], target, path, opts)
    assert (ar.step_rows, ar_rows4.step_rows) == (None, 4) and specbench.ar_rows("ar_rows4") == 4
    assert specbench.ar_rows("ar") is None and not specbench.is_known("ar_rows0")
    reference = Renamed("ar_rows4", Planted(ar))  # a reference that parts from ar at token 2
    methods = [ar, reference, Renamed("as_ar", ar), Renamed("as_reference", Planted(ar))]
    judge = specbench.Float32Judge(lambda: (target.module, params))
    kw = dict(prompt_fn=prompt_fn, decode=decode, judge=judge, log=lambda s: None)
    records, _ = specbench.evaluate(QUESTIONS, methods, reference="ar_rows4", **kw)
    diverged = {m.name: sum(r["diverged"] for r in records if r["method"] == m.name)
                for m in methods}
    assert diverged == {"ar": 0, "ar_rows4": 4, "as_ar": 4, "as_reference": 0}
    records, _ = specbench.evaluate(QUESTIONS[1:], [ar, ar_rows4, pld], reference="ar_rows4",
                                    **kw)
    assert not any(r["diverged"] for r in records)  # float32: the widths agree
    for bad in ([ar, pld, ar_rows4], [ar, pld]):
        with pytest.raises(ValueError, match="ar_rowsN method run right after it"):
            specbench.evaluate(QUESTIONS, bad, reference="ar_rows4", **kw)


def test_interleaved_order():
    """`interleave=True`: the baseline alone first (dropped), then each turn by every method in
    turn; the same tokens and checks as method by method, the baseline checked against its first
    run, a failing method isolated, what is done so far handed on every `progress_every`
    questions."""
    _, path = tiny_models.make("llama_gqa_untied", vocab_size=VOCAB)
    config, params = hf.load_hf_dir(path)
    target = Target(Transformer(config), params)
    opts = specbench.Options(max_new_tokens=N_NEW, dtype="float32", pld_k=3)
    (ar, pld), _ = specbench.make_methods(["ar", "pld"], target, path, opts)
    methods = [ar, pld, Planted(ar), Broken()]
    judge = specbench.Float32Judge(lambda: (target.module, params))
    logged = []
    kw = dict(prompt_fn=prompt_fn, decode=decode, judge=judge, log=logged.append)
    by_method, _ = specbench.evaluate(QUESTIONS, methods, **kw)
    logged.clear()
    progress = []
    records, failures = specbench.evaluate(
        QUESTIONS, methods, interleave=True, progress_every=1,
        on_progress=lambda done, failed: progress.append((len(done), dict(failed))), **kw)
    assert failures == {"broken": "RuntimeError: boom"}
    assert progress == [(6, failures), (9, failures), (12, failures)]  # 3 methods' turns
    key = lambda r: (r["method"], r["question_id"], r["turn"], r["tokens"], r["diverged"])
    assert sorted(map(key, records)) == sorted(map(key, by_method))
    assert [r["method"] for r in records] == ["ar"] * 4 + ["pld"] * 4 + ["planted"] * 4
    turns = [line.split("]")[0][1:] for line in logged if " turn " in line]
    assert turns[:4] == ["ar"] * 4  # the baseline alone, then the turns interleaved
    assert turns[4:7] == ["ar", "pld", "planted"]
    assert not any(r["diverged"] for r in records if r["method"] != "planted")


def test_first_difference():
    assert specbench.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert specbench.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert specbench.first_difference([1, 2], [1, 2, 7]) == 2


def test_baseline_must_come_first():
    with pytest.raises(ValueError, match="baseline"):
        specbench.evaluate(QUESTIONS, [Broken()], prompt_fn=prompt_fn, decode=decode,
                           judge=None, check=False)


def test_method_names():
    assert specbench.is_known("parallelspec_k4") and specbench.is_known("hf_pld")
    assert not specbench.is_known("parallelspec_k0") and not specbench.is_known("medusa")
    with pytest.raises(ValueError, match="parallelspec_kN"):
        specbench.make_methods(["ar", "parallelspec_kx"], None, "", specbench.Options())


def test_tree_sizes_side_by_side(tmp_path):
    """parallelspec_lookup_nN / parallelspec_tree_nN verify the N-node tree of the design_tree.py
    file that --ps_lookup_tree / --ps_tree name; without such a file, a clear error."""
    assert specbench.is_known("parallelspec_lookup_n16")
    assert specbench.is_known("parallelspec_tree_n8")
    assert not specbench.is_known("parallelspec_lookup_n0")
    path = tmp_path / "trees.json"
    path.write_text(json.dumps({"designed": {"2": [[0], [1]], "3": [[0], [1], [0, 0]]}}))
    opts = specbench.Options(ps_lookup_tree_file=str(path),
                             ps_tree_file=Tree.designed_file(f"{path}:2"))
    assert specbench.parallelspec_tree("parallelspec_lookup_n3", opts).num_nodes == 3
    assert specbench.parallelspec_tree("parallelspec_tree_n2", opts).num_nodes == 2
    assert specbench.parallelspec_tree("parallelspec_k4", opts).num_nodes == 4
    with pytest.raises(ValueError, match="--ps_tree as FILE.json:N"):
        specbench.parallelspec_tree("parallelspec_tree_n2", specbench.Options())
    with pytest.raises(ValueError, match=r"not 5"):
        specbench.parallelspec_tree("parallelspec_lookup_n5", opts)
