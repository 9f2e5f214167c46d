"""Tiny, deterministic random-weight mlx-lm model directories for fast tests.

Each directory looks like a real mlx-lm checkpoint (config.json,
model.safetensors, a byte-level BPE tokenizer with SmolLM2's ChatML template),
so the engine can be exercised end to end in well under a second per model.
Weights come from numpy's legacy RandomState, whose streams are frozen across
numpy versions, and are generated per parameter name, so the bytes do not
depend on mlx's RNG or on module construction order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the output of a build changes, so ensure_tiny_model rebuilds caches.
BUILD_VERSION = 1
MARKER = "tiny_model.json"
KINDS = ("llama", "qwen3", "gemma3_text", "qwen2")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
EOS_ID = 2
TARGET_VOCAB = 1000

# Verbatim from SmolLM2-135M-Instruct (GGUF metadata tokenizer.chat_template).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' "
    "+ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fixed training corpus: English prose, dialogue, code, numbers, a little unicode.
CORPUS = r"""
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins
with a single step. What is the capital of France? The capital of France is Paris.
Berlin is the capital of Germany, Rome of Italy, Madrid of Spain and Tokyo of Japan.
Water boils at 100 degrees Celsius and freezes at 0 degrees at sea level.
The assistant answered the question politely, then asked whether the user needed
anything else. Agents remember their conversations between sessions because the
transcript is stored on disk and the key value cache is saved in blocks.
Once upon a time, in a small village by the sea, there lived an old fisherman who
told stories every evening. Children gathered around the fire to listen, and the
wind carried his voice across the harbour where the boats rocked gently.
Summarise this paragraph in one sentence. Explain why the sky is blue. Write a short
poem about autumn leaves falling in the garden. Translate "good morning" into French:
bonjour. Please list three fruits: apple, banana, cherry. Thank you very much!
I think, therefore I am. To be, or not to be, that is the question. All that glitters
is not gold. Knowledge is power. Time flies like an arrow; fruit flies like a banana.
The planner proposes a plan; the critic reviews it and points out the weak steps.
Memory, storage, network, processor, graphics, keyboard, monitor, terminal, shell.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April
May June July August September October November December spring summer autumn winter.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Cache:
    def __init__(self, size=256):
        self.blocks = {}
        self.size = size

    def get(self, key):
        return self.blocks.get(key, None)

for i in range(10):
    print(f"step {i}: loss={0.5 / (i + 1):.4f}")

import json, os, sys
with open("config.json", "r") as f:
    config = json.load(f)
if __name__ == "__main__":
    sys.exit(main())

#include <stdio.h>
int main(void) { int x = 42; printf("%d\n", x * 2); return 0; }
function add(a, b) { return a + b; } const items = [1, 2, 3].map(x => x * 2);
SELECT name, count(*) FROM agents WHERE tokens > 8192 GROUP BY name ORDER BY 2 DESC;
{"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "vocab_size": 49152}
$ semantic chat --agent planner --agent critic
$ echo "hello world" | grep -i hello | wc -l
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 32 64 100 128 256 512 1024 2048
3.14159 2.71828 1.41421 0.57721 1,000,000 2024-05-17 12:34:56 +1 (555) 010-9999 #42
1 + 1 = 2, 2 * 3 = 6, 10 / 4 = 2.5, 7 - 9 = -2, 2 ** 10 = 1024, 17 % 5 = 2.
User: Hi! How are you today?
Assistant: I'm doing well, thanks for asking. How can I help you?
User: Can you explain what a transformer model is?
Assistant: A transformer is a neural network that uses attention to relate every
token in a sequence to every other token. It has layers of attention and feed forward
blocks, with residual connections and normalisation between them.
User: What about the cache?
Assistant: During generation, the keys and values of past tokens are kept so that
each new token only needs one forward step instead of reprocessing the whole prompt.
Café, naïve, résumé, jalapeño, Zürich, São Paulo, Kraków, Ångström, façade, déjà vu.
Привет мир. Γειά σου κόσμε. 你好，世界。 こんにちは世界。 안녕하세요. مرحبا بالعالم. 🙂🚀✨
Science, history, music, mathematics, literature, geography, chemistry, biology,
physics, economics, philosophy, engineering, medicine, astronomy, architecture.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
It was the best of times, it was the worst of times, it was the age of wisdom.
The engine loads the model once, restores each agent's cache, and streams tokens
to the terminal. If a block is missing or corrupted, it quietly prefills again.
"""


def _train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # Same pipeline as SmolLM2: single digits, then GPT-2 byte-level splitting.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any unicode text encodes without unknowns.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.strip().splitlines(keepends=True), trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def build_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": "<|im_start|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 4096,
        "pad_token": "<|im_end|>",
        # Not GPT2Tokenizer: that class rebuilds the pipeline from vocab/merges.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
        "vocab_size": tok.get_vocab_size(),
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    special = {
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    }
    _write_json(out_dir / "special_tokens_map.json", special)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def model_config(kind: str, vocab_size: int) -> dict[str, Any]:
    """config.json contents for one kind (shapes deliberately differ by kind)."""
    common: dict[str, Any] = {
        "model_type": kind,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    if kind == "llama":
        return {
            **common,
            "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": 4,
            "head_dim": 16,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
        }
    if kind == "qwen3":
        # head_dim 32 != hidden/heads (16), as in real Qwen3: catches code that
        # derives head_dim from hidden_size.
        return {
            **common,
            "architectures": ["Qwen3ForCausalLM"],
            "num_hidden_layers": 3,
            "head_dim": 32,
            "rope_theta": 1000000.0,
            "hidden_act": "silu",
        }
    if kind == "qwen2":
        # qwen2 derives head_dim = hidden/heads = 16; untied lm_head and qkv biases.
        return {
            **common,
            "architectures": ["Qwen2ForCausalLM"],
            "num_hidden_layers": 2,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
        }
    if kind == "gemma3_text":
        # mlx-lm reads only sliding_window_pattern (layer i is global when
        # (i + 1) % pattern == 0); layer_types is written for HF compatibility.
        n, pattern = 4, 2
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        return {
            **common,
            "architectures": ["Gemma3ForCausalLM"],
            "num_hidden_layers": n,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "sliding_window": 32,
            "sliding_window_pattern": pattern,
            "layer_types": types,
            "hidden_activation": "gelu_pytorch_tanh",
            "bos_token_id": 1,
        }
    raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")


# Gains found by trying: with plain 1/sqrt(fan_in) init a random model is
# mostly a function of the last token, and (with tied embeddings, whose input
# row stays in the residual stream) greedy decoding falls into one-token loops
# within a few steps. Sharp attention (big q/k) plus residual branches that
# outweigh the embedding make each step depend on the whole context.
GAIN_IN = 3.0  # q/k/v/gate/up projections
GAIN_OUT = 6.0  # o_proj/down_proj, which write into the residual stream
QK_NORM_SCALE = 3.0  # qwen3/gemma3 normalise q and k, so sharpen via the norm
GEMMA_POST_NORM_SCALE = 6.0  # gemma3 normalises each residual branch


def _param(name: str, shape: tuple[int, ...], kind: str, rng: np.random.RandomState, hidden: int) -> np.ndarray:
    gemma = kind == "gemma3_text"
    # gemma3's RMSNorm multiplies by (1 + w), the others by w.
    norm = (lambda scale: np.full(shape, scale - 1.0)) if gemma else (lambda scale: np.full(shape, scale))
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return norm(QK_NORM_SCALE)
    if gemma and name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
        return norm(GEMMA_POST_NORM_SCALE)
    if gemma and name == "model.norm.weight":
        return norm(np.sqrt(hidden))  # undoes the small embedding std below
    if name.endswith("norm.weight"):
        return norm(1.0)
    if name.endswith(".bias"):
        return rng.normal(0.0, 0.1, shape)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        # Logit std ~sqrt(hidden) = 8: clear argmax gaps, so float noise
        # (chunked vs whole prefill, restored caches) rarely flips a token.
        # gemma3 multiplies embeddings by sqrt(hidden) itself.
        w = rng.normal(0.0, 1.0 / np.sqrt(hidden) if gemma else 1.0, shape)
        # Near-zero special-token rows: greedy decoding never emits EOS or
        # <|im_start|>, so generations always run to max_tokens.
        w[: len(SPECIAL_TOKENS)] *= 0.01
        return w
    gain = GAIN_OUT if name.endswith(("o_proj.weight", "down_proj.weight")) else GAIN_IN
    return rng.normal(0.0, gain / np.sqrt(shape[-1]), shape)


def _random_weights(shapes: dict[str, tuple[int, ...]], kind: str, seed: int, hidden: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        # A per-name stream: adding a parameter never shifts the others.
        digest = hashlib.sha256(name.encode()).digest()
        rng = np.random.RandomState([seed, *np.frombuffer(digest[:8], np.uint32)])
        out[name] = _param(name, shapes[name], kind, rng, hidden).astype(np.float32)
    return out


def build_tiny_model(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a complete model directory at out_dir (replaced if present)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, save_config

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        build_tokenizer(tmp)
        vocab_size = json.loads((tmp / "tokenizer_config.json").read_text())["vocab_size"]
        config = model_config(kind, vocab_size)
        model_cls, args_cls = _get_classes(config)
        # Instantiate only to learn parameter names and shapes. Tied
        # checkpoints carry no lm_head.weight; gemma3_text ignores
        # tie_word_embeddings and ties exactly when that key is absent.
        model = model_cls(args_cls.from_dict(config))
        shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        if config["tie_word_embeddings"]:
            shapes.pop("lm_head.weight", None)
        weights = _random_weights(shapes, kind, seed, config["hidden_size"])
        arrays = {k: mx.array(weights[k]) for k in sorted(weights)}
        mx.save_safetensors(str(tmp / "model.safetensors"), arrays, metadata={"format": "mlx"})
        save_config(dict(config), tmp / "config.json")
        _write_json(tmp / "generation_config.json", {"bos_token_id": 1, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID})
        # Written last: its presence marks a complete build.
        _write_json(tmp / MARKER, {"kind": kind, "seed": seed, "version": BUILD_VERSION})
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)  # atomic when dst does not exist
        return
    except OSError:
        if not dst.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / "d")
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def is_complete(path: Path, kind: str, seed: int = 0) -> bool:
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"kind": kind, "seed": seed, "version": BUILD_VERSION} and all(
        (Path(path) / f).is_file()
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    )


def ensure_tiny_model(kind: str, root: Path) -> Path:
    """root/kind, built once and reused while complete and current."""
    path = Path(root) / kind
    if is_complete(path, kind):
        return path
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)  # stale or partial
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}.build-", dir=_mkdir(root)))
    try:
        built = build_tiny_model(kind, tmp / kind)
        try:
            os.rename(built, path)
        except OSError:
            # A concurrent builder (e.g. another xdist worker) got there first.
            if not is_complete(path, kind):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _mkdir(p: Path) -> Path:
    Path(p).mkdir(parents=True, exist_ok=True)
    return Path(p)
