"""Self-distilled training data: the target answers prompts with psjax's own batched decoding.

`generate_answers` writes JSON-lines shards into `out_dir`, one record a line:

    {"id": str, "prompt": str | null, "prompt_tokens": [int], "answer_tokens": [int],
     "finished": bool, "answer": str | null}

`prompt_tokens` is the chat-templated prompt exactly as the target saw it, `answer_tokens` what
it generated (the EOS token included when it stopped on one: `finished`). `out_dir/meta.json`
records the target, the decoding settings and eos ids; a re-run with other settings refuses to
mix them into the same directory.

`write_conversation_answers` writes the same records with the conversation's own replies as
answers (raw ShareGPT conversations: no decoding, only the tokenizer); training reads either,
or both mixed, and takes its targets from the target model either way.

Resumable: ids already in `out_dir` are skipped, so re-running the same command after an
interrupt continues where it stopped (shards are flushed after every batch; a line cut by a kill
is dropped on resume). psjax.data.builders.SelfDistilled turns the directory into a TFDS dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import time
import zlib
from typing import Iterator, Sequence

import jax
import numpy as np

from psjax.decoding import autoregressive
from psjax.decoding.sampling import GREEDY, Sampling

META = "meta.json"
SHARD_GLOB = "shard-*.jsonl"


def decoding_mode(sampling: Sampling | None) -> str:
    """`greedy`, or e.g. `t0.7-p0.9` / `t1-k50`, or `conversation` (None: the conversations'
    own replies): part of the TFDS config name."""
    if sampling is None:
        return "conversation"
    if sampling.greedy:
        return "greedy"
    mode = f"t{sampling.temperature:g}"
    if sampling.top_p < 1.0:
        mode += f"-p{sampling.top_p:g}"
    if sampling.top_k:
        mode += f"-k{sampling.top_k}"
    return mode


def config_name(target_name: str, sampling: Sampling | None) -> str:
    """TFDS config name `<target>-<mode>`, e.g. `smollm2-135m-instruct-greedy` (a directory
    path counts by its last component)."""
    base = os.path.basename(os.path.normpath(target_name)) if target_name else "target"
    base = re.sub(r"[^\w+.\-]", "_", base)
    return f"{base}-{decoding_mode(sampling)}"


def shard_paths(directory: str | os.PathLike) -> list[str]:
    return sorted(glob.glob(os.path.join(os.fspath(directory), SHARD_GLOB)))


def _read_lines(path: str, repair: bool = False) -> Iterator[dict]:
    """Complete records of one shard. A cut last line (killed mid-write) is skipped, and with
    `repair` cut off the file."""
    with open(path, "rb") as f:
        data = f.read()
    good_end = 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            record = json.loads(line)
        except ValueError:
            if good_end + len(line) < len(data):
                raise ValueError(f"{path}: malformed line at byte {good_end}") from None
            logging.warning("%s: dropping a cut last line (%d bytes)", path, len(line))
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(good_end)
            return
        good_end += len(line)
        yield record


def iter_records(directory: str | os.PathLike, repair: bool = False) -> Iterator[dict]:
    """All records under `directory` (shard order, first occurrence of an id wins)."""
    seen = set()
    for path in shard_paths(directory):
        for record in _read_lines(path, repair):
            if record["id"] not in seen:
                seen.add(record["id"])
                yield record


def read_meta(directory: str | os.PathLike) -> dict | None:
    path = os.path.join(os.fspath(directory), META)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass
class Stats:
    requested: int = 0
    already_done: int = 0  # ids found in out_dir (a resumed run)
    too_long: int = 0  # prompts over max_prompt_tokens, dropped
    too_short: int = 0  # prompts under min_prompt_tokens, dropped
    written: int = 0  # new records this call
    finished: int = 0  # of `written`, ended on an EOS token
    prompt_tokens: int = 0
    answer_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0  # decoding wall time, compilation included

    @property
    def tokens_per_second(self) -> float:
        return self.answer_tokens / self.seconds if self.seconds else 0.0


class _ShardWriter:
    def __init__(self, directory: str, shard_size: int):
        self.directory, self.shard_size = directory, shard_size
        existing = [int(re.search(r"(\d+)", os.path.basename(p)).group(1))
                    for p in shard_paths(directory)]
        self.next_index = max(existing, default=-1) + 1
        self.file, self.count = None, 0

    def write(self, records: list[dict]) -> None:
        for record in records:
            if self.file is None or self.count >= self.shard_size:
                self.close()
                path = os.path.join(self.directory, f"shard-{self.next_index:05d}.jsonl")
                self.next_index += 1
                self.file, self.count = open(path, "x", encoding="utf-8"), 0
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.count += 1
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _check_meta(out_dir: str, meta: dict) -> None:
    old = read_meta(out_dir)
    path = os.path.join(out_dir, META)
    if old is None:
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(path + ".tmp", path)
        return
    keys = ("target", "sampling", "max_new_tokens", "eos_ids", "seed")
    diff = {k: (old.get(k), meta.get(k)) for k in keys if old.get(k) != meta.get(k)}
    if diff:
        raise ValueError(f"{out_dir} holds data made with other settings ({{key: (there, now)}} "
                         f"= {diff}); use another out_dir")


def generate_answers(target,
                     prompts: Sequence[tuple[str, str | tuple[list, list] | Sequence[int]]],
                     out_dir: str | os.PathLike, *, batch_size: int = 8,
                     max_new_tokens: int = 512, sampling: Sampling = GREEDY,
                     max_prompt_tokens: int = 1024, min_prompt_tokens: int = 0,
                     cache_length: int | None = None, prompt_width: int | None = None,
                     shard_size: int = 1000, seed: int = 0,
                     target_name: str = "", eos_ids: Sequence[int] | None = None,
                     progress: bool = True) -> Stats:
    """Answers `prompts` ((id, prompt) pairs) with `target` and appends them to `out_dir`.

    A text prompt goes through `target.chat_prompt([text])`, a conversation given as a pair
    (user turns, assistant turns) through `target.chat_prompt(users, assistants)` (the record's
    `prompt` is then the last user turn); a prompt given as a sequence of token ids is taken as
    already templated (targets without a tokenizer). Prompts of more than
    `max_prompt_tokens` tokens are dropped, and those under `min_prompt_tokens` (answer only
    the long prompts a set with a lower `max_prompt_tokens` left out). The rest are sorted by
    length and cut into batches of similar length, `batch_size` each, decoded the longest
    first (out of memory shows at once), the others in a seeded random order (an interrupted
    run holds an unbiased sample), with
    psjax.decoding.autoregressive.generate, stopping on `eos_ids` (default: the target's); the
    last batch is filled up with copies so every batch has one shape (psjax pads prompt widths
    to powers of two, so there is one compilation per width). Sampling draws from a key derived
    from `seed` and the batch's ids. `cache_length` None = padded prompt width +
    max_new_tokens per batch; `prompt_width` (>= max_prompt_tokens) pads every batch to one
    width, hence one compilation."""
    from tqdm.auto import tqdm

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if eos_ids is None:
        eos_ids = target.eos_ids
    eos_ids = tuple(sorted(int(i) for i in eos_ids))
    _check_meta(out_dir, {
        "target": target_name, "config_name": config_name(target_name, sampling),
        "sampling": dataclasses.asdict(sampling), "max_new_tokens": max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens, "min_prompt_tokens": min_prompt_tokens,
        "eos_ids": list(eos_ids), "seed": seed})

    stats = Stats(requested=len(prompts))
    done = {r["id"] for r in iter_records(out_dir, repair=True)}
    todo = []  # (id, prompt text or None, token ids)
    for pid, prompt in prompts:
        pid = str(pid)
        if pid in done:
            stats.already_done += 1
            continue
        done.add(pid)  # a repeated id in `prompts` is answered once
        is_conversation = (isinstance(prompt, tuple) and len(prompt) == 2
                           and all(isinstance(p, list) for p in prompt))
        if isinstance(prompt, str) or is_conversation:
            if target.tokenizer is None:
                raise ValueError("text prompts need a target with a tokenizer; pass token ids")
            users, assistants = prompt if is_conversation else ([prompt], [])
            text, tokens = users[-1], target.chat_prompt(users, assistants)
        else:
            text, tokens = None, [int(t) for t in prompt]
        if not tokens or len(tokens) > max_prompt_tokens:
            stats.too_long += 1
            continue
        if len(tokens) < min_prompt_tokens:
            stats.too_short += 1
            continue
        todo.append((pid, text, tokens))
    todo.sort(key=lambda item: -len(item[2]))
    starts = list(range(0, len(todo), batch_size))
    starts[1:] = np.random.default_rng(seed).permutation(starts[1:]).tolist()

    writer = _ShardWriter(out_dir, shard_size)
    bar = tqdm(total=len(todo), desc="self-distill", unit="prompt", disable=not progress)
    start = time.perf_counter()
    try:
        for first in starts:
            batch = todo[first:first + batch_size]
            rows = [tokens for _, _, tokens in batch]
            rows += [rows[-1]] * (batch_size - len(rows))
            key = zlib.crc32("\n".join(pid for pid, _, _ in batch).encode()) & 0x7FFFFFFF
            gen = autoregressive.generate(
                target.module, target.params, rows, max_new_tokens=max_new_tokens,
                sampling=sampling, eos_ids=eos_ids, cache_length=cache_length,
                prompt_width=prompt_width,
                rng=jax.random.fold_in(jax.random.PRNGKey(seed), key))
            records = []
            for (pid, text, tokens), answer in zip(batch, gen.sequences()):
                finished = bool(answer) and answer[-1] in eos_ids
                records.append({
                    "id": pid, "prompt": text, "prompt_tokens": tokens, "answer_tokens": answer,
                    "finished": finished,
                    "answer": (target.tokenizer.decode(answer, skip_special_tokens=True)
                               if target.tokenizer is not None else None)})
                stats.finished += finished
                stats.prompt_tokens += len(tokens)
                stats.answer_tokens += len(answer)
            writer.write(records)
            stats.written += len(records)
            stats.batches += 1
            stats.seconds = time.perf_counter() - start
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{stats.tokens_per_second:.0f}",
                            finished=f"{stats.finished}/{stats.written}")
    finally:
        writer.close()
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def as_arrays(record: dict) -> dict:
    """A record as the SelfDistilled TFDS example (tokens = prompt + answer)."""
    prompt, answer = record["prompt_tokens"], record["answer_tokens"]
    return {"id": record["id"], "tokens": np.asarray(prompt + answer, np.int32),
            "prompt_length": np.int32(len(prompt)), "answer_length": np.int32(len(answer)),
            "finished": bool(record["finished"])}


def write_conversation_answers(target, turns, out_dir: str | os.PathLike, *,
                               max_prompt_tokens: int = 1024, max_answer_tokens: int = 512,
                               shard_size: int = 1000, target_name: str = "") -> Stats:
    """Writes `turns` ((id, user turns, assistant turns before, reply), as
    psjax.data.sharegpt.conversation_turns gives them) as records whose answer is the reply,
    templated as the target's chat template renders an assistant turn and cut after its first
    end-of-turn (EOS) token: `finished` unless cut at `max_answer_tokens`. Turns without a
    reply, and prompts over `max_prompt_tokens`, are skipped; ids already in `out_dir` too."""
    if target.tokenizer is None:
        raise ValueError("conversation answers are templated with the target's tokenizer: load "
                         "the target with its tokenizer (an HF directory or a registry name)")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    eos_ids = tuple(sorted(int(i) for i in target.eos_ids))
    _check_meta(out_dir, {
        "target": target_name, "config_name": config_name(target_name, None),
        "sampling": None, "answers": "conversation", "max_new_tokens": max_answer_tokens,
        "max_prompt_tokens": max_prompt_tokens, "eos_ids": list(eos_ids), "seed": None})
    stats = Stats()
    done = {r["id"] for r in iter_records(out_dir, repair=True)}
    writer, start = _ShardWriter(out_dir, shard_size), time.perf_counter()
    for pid, users, assistants, reply in turns:
        if reply is None:
            continue
        stats.requested += 1
        if pid in done:
            stats.already_done += 1
            continue
        prompt = target.chat_prompt(users, assistants)
        if len(prompt) > max_prompt_tokens:
            stats.too_long += 1
            continue
        full = target.chat_prompt(users, list(assistants) + [reply], add_generation_prompt=False)
        if full[:len(prompt)] != prompt:
            raise ValueError(f"{target_name or 'the target'}'s chat template renders the prompt "
                             f"of {pid!r} differently once a reply follows; it cannot be split "
                             "into prompt and answer tokens")
        answer = full[len(prompt):]
        end = next((i + 1 for i, t in enumerate(answer) if t in eos_ids), len(answer))
        finished = end <= max_answer_tokens and answer[end - 1] in eos_ids
        answer = answer[:min(end, max_answer_tokens)]
        writer.write([{"id": pid, "prompt": users[-1], "prompt_tokens": prompt,
                       "answer_tokens": answer, "finished": finished, "answer": reply}])
        stats.written += 1
        stats.finished += finished
        stats.prompt_tokens += len(prompt)
        stats.answer_tokens += len(answer)
    writer.close()
    stats.seconds = time.perf_counter() - start
    return stats
