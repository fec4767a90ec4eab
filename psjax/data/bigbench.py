"""Task prompts beyond ShareGPT: summarisation, translation, math and factual questions from
BIG-bench, for the drafter's self-distilled training data.

ShareGPT is chat; four of Spec-Bench's six categories are tasks (translation, summarisation,
question answering, math), and a drafter trained on chat alone drafts them worst. These prompts
come from other sources than Spec-Bench's (Spec-Bench draws on WMT14, CNN/DailyMail, Natural
Questions and GSM8K), so nothing it measures is trained on.

The data is the pinned source archive `bigbench==1.0.0` (358 MB, never installed, sha256-checked;
pip cannot download it without building it, so psjax.convert.registry.download_sdist fetches it
from the index's JSON API): `fetch()` takes out the five `task.json` files below, checks
their size and sha256, and caches them as `<root>/bigbench/<task>.json` (root as in
psjax.data.sharegpt.data_cache_root). A directory holding those files (a copy carried to a
machine without PyPI) works as well.

Prompts, one template per task, the texts cut at a sentence end to fit a prompt budget:
    xsum          BBC articles (GEM XSum, 1,001): "Summarize the following article."
    wikilingua    WikiHow texts (GEM WikiLingua en, 1,001): summarise the instructions
    mlsum_de      German news (GEM MLSUM de, 2,001): the opening sentences, into English
    math          word problems (elementary_math_qa, 7,688): solve step by step
    wikidata      factual statements (qa_wikidata, 20,442): complete and explain
`prompts()` interleaves the tasks round-robin, so the first N prompts are a mix.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Iterator

from psjax.data import sharegpt

REQUIREMENT = "bigbench==1.0.0"
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
TASK_FILES = {
    "xsum": sharegpt.PinnedFile(
        _ROOT + "gem/xsum/task.json", 2_191_986,
        "927d7a4c6ec326b79b41537538ac49525541a32e1e5bc0787bea3f2879ca8fb9", "xsum.json"),
    "wikilingua": sharegpt.PinnedFile(
        _ROOT + "gem/wikilingua_en/task.json", 2_397_253,
        "f805809664173074f6d6ea942d5bd08d9b8b8eb7e1cefea2471c870a6217dd67", "wikilingua.json"),
    "mlsum_de": sharegpt.PinnedFile(
        _ROOT + "gem/mlsum_de/task.json", 8_922_226,
        "12d537c2224d2c132681c512e4eb75a1c9ff940cb5794574ae438fa5b62121ff", "mlsum_de.json"),
    "math": sharegpt.PinnedFile(
        _ROOT + "elementary_math_qa/question_only/task.json", 2_968_430,
        "765c8817c43b068720fd3bf99abaed09132420df530e58b2e6bd5a16823d58eb", "math.json"),
    "wikidata": sharegpt.PinnedFile(
        _ROOT + "qa_wikidata/task.json", 2_033_369,
        "6340744cf2fb958564b70a071fd01624327c067f4335939e1db2fa3a353cc802", "wikidata.json"),
}
TASKS = tuple(TASK_FILES)

# (template, most characters of the task's text kept): ~4 characters a token, so every prompt
# stays under ~400 tokens.
TEMPLATES = {
    "xsum": ("Summarize the following article.\n\n{text}", 1400),
    "wikilingua": ("Summarize the following instructions in a few sentences.\n\n{text}", 1400),
    "mlsum_de": ("Translate the following German text into English.\n\n{text}", 500),
    "math": ("Solve the following problem step by step.\n\n{text}", 1400),
    "wikidata": ("Complete the following statement, then explain it in two or three sentences."
                 "\n\n{text} ...", 1400),
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def fetch(cache_dir: str | os.PathLike | None = None) -> str:
    """The directory of the cached, sha256-checked task files (downloaded on first use)."""
    paths = sharegpt.fetch_package_files(REQUIREMENT, TASK_FILES.values(), "bigbench", cache_dir,
                                         sdist_sha256=ARCHIVE_SHA256)
    return os.path.dirname(next(iter(paths.values())))


def clip(text: str, max_chars: int) -> str:
    """`text` whitespace-normalised and cut after its last sentence end within `max_chars`
    (the first sentence, hard-cut, when even that is longer)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    kept = ""
    for sentence in _SENTENCE_END.split(text):
        if len(kept) + len(sentence) + 1 > max_chars:
            break
        kept = f"{kept} {sentence}" if kept else sentence
    return kept or text[:max_chars]


def task_prompts(task: str, directory: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(id `bigbench/<task>/<index>`, prompt) for every example of one task."""
    if task not in TEMPLATES:
        raise ValueError(f"unknown BIG-bench task {task!r}: one of {', '.join(TASKS)}")
    path = os.path.join(os.fspath(directory), TASK_FILES[task].filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass the directory psjax.data.bigbench."
                                "fetch() fills (or a copy of it)")
    with open(path, encoding="utf-8") as f:
        examples = json.load(f)["examples"]
    template, max_chars = TEMPLATES[task]
    for index, example in enumerate(examples):
        text = clip(example["input"], max_chars)
        if text:
            yield f"bigbench/{task}/{index}", template.format(text=text)


def prompts(directory: str | os.PathLike | None = None,
            tasks: tuple[str, ...] = TASKS) -> Iterator[tuple[str, str]]:
    """(id, prompt) of `tasks`, round-robin (one of each task in turn until each runs out).
    `directory` None = `fetch()`."""
    directory = fetch() if directory is None else directory
    streams = [task_prompts(task, directory) for task in tasks]
    for group in itertools.zip_longest(*streams):
        yield from (p for p in group if p is not None)
