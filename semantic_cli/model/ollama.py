"""Ollama's models: `--model ollama:NAME[:TAG]`, found in Ollama's store and converted once.

Ollama keeps each model as an OCI-style manifest and content-addressed blobs:
`<store>/manifests/<registry>/<namespace>/<name>/<tag>` is JSON whose `layers`
name blobs by media type and digest, and `<store>/blobs/sha256-<hex>` holds each
one. The `application/vnd.ollama.image.model` layer is a plain GGUF file; the
`...template` layer is the chat template in Go's template language and the
`...params` layer JSON (`stop`, `temperature`, `top_k`, ...). The store is
`$OLLAMA_MODELS`, `~/.ollama/models` (a user's `ollama serve`) or
`/usr/share/ollama/.ollama/models` (the Linux service), searched in that order.

`ollama:gemma3` means `registry.ollama.ai/library/gemma3:latest`, as in Ollama;
`ollama:user/model:tag` and `ollama:host/namespace/model:tag` name the others.
The GGUF is converted like any other (convert.py) into the models dir, under a
name keyed by the digests of its model, template and params layers, so a pulled
update converts again. The params' stop strings that are single tokens end a
reply, their sampling values become the model's generation_config.json defaults,
and the Go template, when the GGUF carries no chat template of its own, picks
the turn markers of the one written instead. Nothing here talks to Ollama.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import ModelError, NotFoundError
from .gguf_metadata import Extras

PREFIX = "ollama:"
REGISTRY = "registry.ollama.ai"
NAMESPACE = "library"
DEFAULT_TAG = "latest"
MODEL_LAYER = "application/vnd.ollama.image.model"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"
PARAMS_LAYER = "application/vnd.ollama.image.params"
ADAPTER_LAYER = "application/vnd.ollama.image.adapter"

# Ollama's sampling parameters -> generation_config.json keys (transformers' names).
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repetition_penalty"}
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
_CHUNK = 1 << 22

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class OllamaModel:
    name: str  # as Ollama shows it: "gemma3:latest", "user/model:tag"
    store: Path
    gguf: Path  # the model layer's blob
    digest: str  # its sha256 (hex)
    size: int
    template: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    layer_digests: tuple[str, ...] = ()  # of every layer that shapes the conversion


def stores() -> list[Path]:
    """Where Ollama keeps models on this machine, in the order they are searched."""
    found = [Path(os.environ["OLLAMA_MODELS"]).expanduser()] if os.environ.get("OLLAMA_MODELS") else []
    found += [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]
    return list(dict.fromkeys(found))


def parse_name(name: str) -> tuple[str, str, str, str]:
    """(registry, namespace, model, tag) of `model[:tag]`, `namespace/model[:tag]` or `registry/namespace/model[:tag]`."""
    path, colon, tag = name.partition(":")
    parts = path.split("/")
    if len(parts) == 1:
        parts = [REGISTRY, NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [REGISTRY, *parts]
    tag = tag if colon else DEFAULT_TAG
    if len(parts) != 3 or not all(_PART.fullmatch(p) for p in (*parts, tag)):
        raise NotFoundError(f"{PREFIX}{name} is not an Ollama model name: use {PREFIX}NAME[:TAG], e.g. {PREFIX}gemma3:1b")
    return parts[0], parts[1], parts[2], tag


def display_name(registry: str, namespace: str, model: str, tag: str) -> str:
    """The name as `ollama list` shows it."""
    if registry == REGISTRY:
        return f"{model}:{tag}" if namespace == NAMESPACE else f"{namespace}/{model}:{tag}"
    return f"{registry}/{namespace}/{model}:{tag}"


def find(name: str) -> OllamaModel:
    """The model `name` (without the `ollama:` prefix) in the first store that has it."""
    parts = parse_name(name)
    for store in stores():
        manifest = store / "manifests" / Path(*parts)
        if manifest.is_file():
            return _read_manifest(store, manifest, display_name(*parts))
    where = ", ".join(str(s) for s in stores())
    raise NotFoundError(f"no Ollama model {display_name(*parts)!r} here (looked in {where}); `ollama pull` it, or set OLLAMA_MODELS")


def list_models() -> Iterator[OllamaModel | ModelError]:
    """Every model in every store (a damaged one as its error), without reading any blob."""
    for store in stores():
        root = store / "manifests"
        for manifest in sorted(root.glob("*/*/*/*")) if root.is_dir() else []:
            if manifest.is_file():
                try:
                    yield _read_manifest(store, manifest, display_name(*manifest.relative_to(root).parts))
                except ModelError as exc:
                    yield exc


def _read_manifest(store: Path, manifest: Path, name: str) -> OllamaModel:
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        by_type = {layer["mediaType"]: layer for layer in layers}
        digests = {kind: _digest(layer["digest"]) for kind, layer in by_type.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"Ollama's manifest for {name} ({manifest}) is damaged ({exc}); `ollama pull` it again") from exc
    if MODEL_LAYER not in by_type:
        raise ModelError(f"Ollama's {name} has no model layer; `ollama pull` it again")
    if ADAPTER_LAYER in by_type:
        raise ModelError(f"Ollama's {name} adds a LoRA adapter to its model, which semantic cannot apply; pass the base model instead")
    blob = _blob(store, digests[MODEL_LAYER], name)
    template = _blob(store, digests[TEMPLATE_LAYER], name).read_text(encoding="utf-8") if TEMPLATE_LAYER in by_type else ""
    params: dict[str, Any] = {}
    if PARAMS_LAYER in by_type:
        try:
            params = json.loads(_blob(store, digests[PARAMS_LAYER], name).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelError(f"Ollama's params layer of {name} is not JSON ({exc}); `ollama pull` it again") from exc
    shaping = tuple(digests[k] for k in (MODEL_LAYER, TEMPLATE_LAYER, PARAMS_LAYER) if k in digests)
    return OllamaModel(
        name, store, blob, digests[MODEL_LAYER], blob.stat().st_size, template, params if isinstance(params, dict) else {}, shaping
    )


def _digest(text: str) -> str:
    match = _DIGEST.fullmatch(text)
    if match is None:
        raise ValueError(f"unexpected digest {text!r}")
    return match.group(1)


def _blob(store: Path, digest: str, name: str) -> Path:
    blob = store / "blobs" / f"sha256-{digest}"
    if not blob.is_file():
        raise ModelError(f"Ollama's blob sha256-{digest[:12]}... of {name} is missing from {store / 'blobs'}; `ollama pull` it again")
    return blob


# --- conversion ----------------------------------------------------------------


def converted_dir(model: OllamaModel) -> Path:
    """Where the model's conversion is kept: named by the digests of the layers that shape it."""
    key = hashlib.sha256("|".join(model.layer_digests).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.name)
    return paths.models_dir() / "ollama" / f"{slug}-{key}"


def extras(model: OllamaModel) -> Extras:
    """What the template and params layers add to the GGUF."""
    stop = model.params.get("stop", [])
    stop = (stop,) if isinstance(stop, str) else tuple(s for s in stop if isinstance(s, str)) if isinstance(stop, list) else ()
    sampling = {
        key: float(value)
        for name, key in _SAMPLING.items()
        if isinstance(value := model.params.get(name), (int, float)) and not isinstance(value, bool)
    }
    if "top_k" in sampling:
        sampling["top_k"] = int(sampling["top_k"])
    return Extras(template_hint=model.template, stop=stop, sampling=sampling)


def ensure_converted(name: str, on_progress: Progress | None = None) -> Path:
    """The mlx-lm directory of Ollama's model `name`, converted on first use.

    Stages: "verify" (bytes of the blob hashed), "convert" (tensors).
    """
    from .convert import convert_gguf, is_converted

    model = find(name)
    out = converted_dir(model)
    if is_converted(out):
        return out
    _verify(model, None if on_progress is None else lambda done, total: on_progress("verify", done, total))
    report = (lambda done, total: on_progress("convert", done, total)) if on_progress else None
    return convert_gguf(model.gguf, out, report, extras(model))


def _verify(model: OllamaModel, progress: Callable[[int, int], None] | None) -> None:
    """The blob is what its name says (a damaged download would convert into garbage)."""
    digest, done = hashlib.sha256(), 0
    try:
        with open(model.gguf, "rb") as blob:
            while chunk := blob.read(_CHUNK):
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, model.size)
    except OSError as exc:
        raise ModelError(f"cannot read Ollama's {model.name} ({model.gguf}): {exc}") from exc
    if digest.hexdigest() != model.digest:
        raise ModelError(f"Ollama's blob of {model.name} ({model.gguf}) does not match its digest; `ollama pull {model.name}` again")
