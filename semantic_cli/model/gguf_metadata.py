"""What a GGUF file's metadata says, as the JSON files of an mlx-lm model directory.

A GGUF carries its hyperparameters and its whole tokenizer (vocabulary, BPE
merges or SentencePiece scores, token types, special ids, chat template) as
key/value metadata. This module turns them into `config.json` (llama, qwen2,
qwen3 and gemma3 architectures) and into `tokenizer.json` (rebuilt with the
`tokenizers` library) plus the small files transformers reads beside it.
convert.py reads the file and turns the tensors into weights.

Tokenizers: SmolLM2's byte-level BPE (llama.cpp calls the model `gpt2`, with
pre-tokenizer `smollm`: every digit its own piece, then the GPT-2 byte-level
step) is rebuilt here, exactly. Every other vocabulary (byte-level BPE with
another split regex, as Qwen's and Llama 3's; SentencePiece, as Llama 2's and
Gemma's) is built by transformers' own GGUF tokenizer builder, which needs no
torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

# llama.cpp `tokenizer.ggml.pre` values whose HF pre-tokenizer we rebuild ourselves.
# smollm and starcoder (same vocabulary family): every digit is its own piece,
# then the GPT-2 byte-level regex; this is SmolLM2's own tokenizer.json.
_DIGITS_THEN_BYTELEVEL = ("smollm", "starcoder", "refact")
_PLAIN_BYTELEVEL = ("gpt2", "default")

# llama.cpp token types (`tokenizer.ggml.token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Tokens that end a chat turn when the chat template writes them (llama.cpp's end-of-generation list).
_END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

# Chat templates for GGUFs that carry none (base models, older files), by the vocabulary's turn markers.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (first if loop.first else '') + (message['content'] | trim) }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
_TEMPLATES_BY_MARKER = (("<start_of_turn>", GEMMA_TEMPLATE), ("<|im_start|>", CHATML_TEMPLATE))


@dataclass(frozen=True)
class Extras:
    """What a model's packaging says beyond its GGUF (Ollama's template and params layers)."""

    template_hint: str = ""  # a template in another language (Go), read only for its turn markers
    stop: tuple[str, ...] = ()  # stop strings; those that are one token end a reply
    sampling: dict[str, float] = field(default_factory=dict)  # generation_config.json sampling defaults


def scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if hasattr(value, "item"):  # mlx returns numeric metadata as 0-d arrays
        value = value.item()
    return value


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


# --- hyperparameters and config.json ------------------------------------------


def hyperparameters(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """HF config values and the special token ids (`*_id`, None when absent); gemma3's own
    values under `extra`."""
    arch = scalar(meta, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path.name}: GGUF architecture {arch!r} is not supported (only {', '.join(SUPPORTED_ARCHITECTURES)}); "
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
        hp["vocab_size"] = int(scalar(meta, f"{arch}.vocab_size", len(tokens)))
        extra = _gemma3_values(meta, hp) if arch == "gemma3" else {}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path.name}: GGUF metadata is incomplete ({exc}); the file is damaged: fetch it again") from exc
    scaling = scalar(meta, f"{arch}.rope.scaling.type")
    if scaling == "linear" and arch == "gemma3":  # Gemma 3 4B and up: linear scaling on the global layers
        extra["rope_scaling"] = {"rope_type": "linear", "factor": float(scalar(meta, f"{arch}.rope.scaling.factor", 1.0))}
    elif scaling not in (None, "none"):
        raise ModelError(f"{path.name}: rope scaling {scaling!r} is not supported by this converter; pass an mlx-lm model instead")
    for key in ("bos", "eos", "padding", "unknown"):
        token_id = scalar(meta, f"tokenizer.ggml.{key}_token_id")
        hp[f"{key}_id"] = None if token_id is None else int(token_id)
    hp["architecture"], hp["extra"] = arch, extra
    return hp


def _gemma3_values(meta: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's sliding-window layout and scales: from the file where it says, else what
    llama.cpp assumes for gemma3 (llama-model.cpp): a global layer after every five
    sliding-window ones, local rope base 10000."""
    n_layers = hp["num_hidden_layers"]
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per layer, true for a sliding-window one
        period = pattern.index(False) + 1 if False in pattern else n_layers + 1
        if [bool(x) for x in pattern] != [(i + 1) % period != 0 for i in range(n_layers)]:
            raise ValueError("gemma3.attention.sliding_window_pattern is not periodic")
        pattern = period
    layer_types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(n_layers)]
    # The 27B model (62 layers) scales queries by hidden/heads; the others by the head dim.
    query_scale = hp["hidden_size"] // hp["num_attention_heads"] if n_layers == 62 else hp["head_dim"]
    return {
        "sliding_window": int(scalar(meta, "gemma3.attention.sliding_window")),
        "sliding_window_pattern": int(pattern),
        "layer_types": layer_types,
        "rope_local_base_freq": _f32(scalar(meta, "gemma3.rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": query_scale,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_scaling": None,
    }


def _f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.99999974e-06)."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return float(value)


_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def model_config(hp: dict[str, Any], has_lm_head: bool) -> dict[str, Any]:
    """config.json for mlx-lm's model of the GGUF's architecture."""
    arch = hp["architecture"]
    config: dict[str, Any] = {"architectures": [_HF_CLASSES[arch]], "model_type": "gemma3_text" if arch == "gemma3" else arch}
    if arch != "gemma3":
        config["hidden_act"] = "silu"
    if arch == "llama":
        config.update({"attention_bias": False, "mlp_bias": False})
    config.update(
        {
            "tie_word_embeddings": not has_lm_head,
            # The original checkpoint's dtype; the runtime picks what it computes in.
            "torch_dtype": "bfloat16",
        }
    )
    config.update({k: v for k, v in hp.items() if not k.endswith("_id") and k not in ("architecture", "extra", "eos_ids")})
    config.update(hp["extra"])
    config.update(_token_ids(hp))
    return config


def _token_ids(hp: dict[str, Any]) -> dict[str, Any]:
    pairs = (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("padding_id", "pad_token_id"))
    ids: dict[str, Any] = {hf_key: hp[key] for key, hf_key in pairs if hp[key] is not None}
    if len(hp.get("eos_ids", ())) > 1:  # a chat turn ends with another token than the file's EOS
        ids["eos_token_id"] = list(hp["eos_ids"])
    return ids


# --- tokenizer ----------------------------------------------------------------


def tokenizer_files(meta: dict[str, Any], hp: dict[str, Any], path: Path, extras: Extras | None = None) -> dict[str, str]:
    """tokenizer.json and the small JSON files transformers reads beside it: file name -> text.

    Sets hp["eos_ids"]: every id that ends a reply (the file's EOS first, then its turn end).
    """
    from tokenizers import processors

    extras = extras or Extras()
    kind = scalar(meta, "tokenizer.ggml.model")
    pre = scalar(meta, "tokenizer.ggml.pre", "default")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types = meta.get("tokenizer.ggml.token_type")
    token_types = list(token_types) if token_types is not None else [1] * len(tokens)
    if len(set(tokens)) != len(tokens) or len(token_types) != len(tokens):
        raise ModelError(f"{path.name}: the GGUF vocabulary is inconsistent; fetch it again")
    if kind == "gpt2" and pre in _DIGITS_THEN_BYTELEVEL + _PLAIN_BYTELEVEL:
        tokenizer = _byte_level_bpe(meta, tokens, token_types, digits=pre in _DIGITS_THEN_BYTELEVEL)
    else:
        tokenizer = _transformers_tokenizer(meta, hp["architecture"], kind, pre, path)

    def token(key: str) -> str | None:
        if hp[key] is None:
            return None
        if not 0 <= hp[key] < len(tokens):
            raise ModelError(f"{path.name}: special token id {hp[key]} is out of range; fetch it again")
        return tokens[hp[key]]

    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    add_bos = bool(scalar(meta, "tokenizer.ggml.add_bos_token", kind == "llama"))
    bos = token("bos_id")
    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, hp["bos_id"])]
        )
    elif kind == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    chat_template = scalar(meta, "tokenizer.chat_template") or _fallback_template(tokens, extras.template_hint)
    turn_end = _turn_end(tokens, token_types, chat_template)
    eos = turn_end or token("eos_id")  # a reply ends with the turn end where the template has one
    ids = [hp["eos_id"], *(i for t in (turn_end, *extras.stop) if t is not None for i in _single_token(tokens, t))]
    hp["eos_ids"] = list(dict.fromkeys(i for i in ids if i is not None))
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": token("unknown_id"), "pad_token": token("padding_id")}
    specials = {k: v for k, v in specials.items() if v is not None}
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(scalar(meta, "tokenizer.ggml.add_space_prefix", kind == "llama")),
        # Both kinds decode exactly; the legacy clean-up would eat spaces.
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp["max_position_embeddings"],
        **specials,
    }
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    generation = {**_token_ids(hp), **extras.sampling}
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": dumps(tokenizer_config),
        "special_tokens_map.json": dumps(specials),
        "generation_config.json": dumps(generation),
    }


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], token_types: list[int], digits: bool) -> Any:
    """SmolLM2's tokenizer: byte-level BPE, single digits first when `digits`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must match whole in text, never be cut up.
    # User-defined tokens too, as plain added tokens (llama.cpp matches them whole).
    tagged = list(zip(tokens, token_types, strict=False))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in tagged if k == _TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in tagged if k == _TOKEN_USER_DEFINED])
    return tokenizer


def _transformers_tokenizer(meta: dict[str, Any], arch: str, kind: Any, pre: Any, path: Path) -> Any:
    """transformers' GGUF tokenizer builder (SentencePiece, and byte-level BPE with a known split)."""
    try:  # transformers >= 5
        from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
    except ImportError:  # transformers 4
        from transformers.integrations import ggml as mapping  # type: ignore[no-redef]
    splits = getattr(mapping, "GGUF_PRE_TOKENIZER_SPLITS", {})
    if kind not in ("llama", "gpt2") or (kind == "gpt2" and pre not in splits):
        what = f"tokenizer {kind!r}" + (f" with pre-tokenizer {pre!r}" if kind == "gpt2" else "")
        raise ModelError(
            f"{path.name}: {what} is not supported (byte-level BPE and SentencePiece vocabularies are); pass an mlx-lm model instead"
        )
    fields = {
        name: meta[f"tokenizer.{key}"] for key, name in mapping.GGUF_TOKENIZER_MAPPING["tokenizer"].items() if f"tokenizer.{key}" in meta
    }
    try:
        tokenizer, _ = mapping.convert_gguf_tokenizer(arch, fields)
    except Exception as exc:  # transformers raises many kinds for a vocabulary it cannot build
        raise ModelError(f"{path.name}: cannot build its {kind} tokenizer ({exc}); pass an mlx-lm model instead") from exc
    return tokenizer


def _fallback_template(tokens: list[str], hint: str) -> str:
    """A chat template for a GGUF without one: by the turn markers of the hint, else of the vocabulary."""
    vocab = set(tokens)
    for source in (hint, None):
        for marker, template in _TEMPLATES_BY_MARKER:
            if marker in vocab and (source is None or marker in source):
                return template
    return PLAIN_TEMPLATE


def _turn_end(tokens: list[str], token_types: list[int], template: str) -> str | None:
    """The control token that ends a turn in the chat template (llama.cpp's end-of-generation list)."""
    kinds = dict(zip(tokens, token_types, strict=False))
    return next((t for t in _END_OF_TURN if kinds.get(t) == _TOKEN_CONTROL and t in template), None)


def _single_token(tokens: list[str], text: str) -> list[int]:
    """[the id of the token spelled `text`], or [] when no single token is."""
    try:
        return [tokens.index(text)]
    except ValueError:
        return []
