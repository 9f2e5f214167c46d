"""What a llama GGUF file's metadata says, as the JSON files of an mlx-lm model directory.

A GGUF carries its hyperparameters and its whole tokenizer (vocabulary, BPE
merges, token types, special ids, chat template) as key/value metadata. This
module turns them into `config.json` and into `tokenizer.json` (rebuilt with the
`tokenizers` library) plus the small files transformers reads beside it.
convert.py turns the tensors into weights and writes the directory.

Only byte-level BPE vocabularies are rebuilt (SmolLM2's: llama.cpp calls the
model `gpt2`); its pre-tokenizer splits every digit into its own piece before
the GPT-2 byte-level step, as SmolLM2's own tokenizer.json does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..errors import ModelError

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp `tokenizer.ggml.pre` values whose HF pre-tokenizer we know exactly.
# smollm and starcoder (same vocabulary family): every digit is its own piece,
# then the GPT-2 byte-level regex; this is SmolLM2's own tokenizer.json.
_DIGITS_THEN_BYTELEVEL = ("smollm", "starcoder", "refact")
_PLAIN_BYTELEVEL = ("gpt2", "default")

# llama.cpp token types (`tokenizer.ggml.token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if hasattr(value, "item"):  # mlx returns numeric metadata as 0-d arrays
        value = value.item()
    return value


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


# --- hyperparameters and config.json ------------------------------------------


def hyperparameters(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """HF llama config values and the special token ids (`*_id`, None when absent)."""
    arch = scalar(meta, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path.name}: GGUF architecture {arch!r} is not supported (only llama); "
            "pass an mlx-lm model instead (a Hugging Face repo id or a local mlx-lm directory)"
        )
    try:
        hidden = int(scalar(meta, f"{arch}.embedding_length"))
        heads = int(scalar(meta, f"{arch}.attention.head_count"))
        hp: dict[str, Any] = {
            "hidden_size": hidden,
            "intermediate_size": int(scalar(meta, f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(scalar(meta, f"{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(scalar(meta, f"{arch}.attention.head_count_kv", heads)),
            "rms_norm_eps": _f32(scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
            "rope_theta": _f32(scalar(meta, f"{arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(scalar(meta, f"{arch}.context_length", 2048)),
            "head_dim": int(scalar(meta, f"{arch}.attention.key_length", hidden // heads)),
        }
        tokens = meta["tokenizer.ggml.tokens"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path.name}: GGUF metadata is incomplete ({exc}); the file is damaged: fetch it again") from exc
    hp["vocab_size"] = int(scalar(meta, f"{arch}.vocab_size", len(tokens)))
    if scalar(meta, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ModelError(f"{path.name}: rope scaling is not supported by this converter; pass an mlx-lm model instead")
    for key in ("bos", "eos", "padding", "unknown"):
        token_id = scalar(meta, f"tokenizer.ggml.{key}_token_id")
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


def model_config(hp: dict[str, Any], has_lm_head: bool) -> dict[str, Any]:
    """config.json for mlx-lm's llama model."""
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


# --- tokenizer ----------------------------------------------------------------


def tokenizer_files(meta: dict[str, Any], hp: dict[str, Any], path: Path) -> dict[str, str]:
    """tokenizer.json and the small JSON files transformers reads beside it: file name -> text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = scalar(meta, "tokenizer.ggml.model")
    pre = scalar(meta, "tokenizer.ggml.pre", "default")
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

    add_bos = bool(scalar(meta, "tokenizer.ggml.add_bos_token", False))
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
        "add_eos_token": bool(scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        # Byte-level BPE decodes exactly; the legacy clean-up would eat spaces.
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp["max_position_embeddings"],
        **specials,
    }
    chat_template = scalar(meta, "tokenizer.chat_template")
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    generation = _token_ids(hp)
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": dumps(tokenizer_config),
        "special_tokens_map.json": dumps(specials),
        "generation_config.json": dumps(generation),
    }
