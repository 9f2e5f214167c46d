"""Checks for the tiny random-weight model directories in tests/tiny_models.py."""

import ctypes
import os

# Route MLX's float32 GEMM to the system OpenBLAS; must happen before mlx loads.
_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
if os.path.exists(_OPENBLAS):
    ctypes.CDLL(_OPENBLAS, mode=os.RTLD_GLOBAL)

import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
import pytest  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache  # noqa: E402
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper  # noqa: E402
from tiny_models import (  # noqa: E402
    CHAT_TEMPLATE,
    KINDS,
    build_tiny_model,
    ensure_tiny_model,
)

TESTS_DIR = Path(__file__).resolve().parent
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


_loaded: dict[str, Any] = {}


def _load(root: Path, kind: str) -> tuple[Any, TokenizerWrapper, dict]:
    if kind not in _loaded:
        _loaded[kind] = mlx_lm.load(str(ensure_tiny_model(kind, root)), return_config=True)
    return _loaded[kind]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _chat_prompt(tok: TokenizerWrapper, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


# --- tokenizer -------------------------------------------------------------


def test_tokenizer_special_tokens_and_template(tiny_root: Path) -> None:
    _, tok, _ = _load(tiny_root, "llama")
    assert isinstance(tok, TokenizerWrapper)
    assert tok.detokenizer.__class__ is BPEStreamingDetokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token == "<|im_start|>" and tok.pad_token == "<|im_end|>"
    assert tok.eos_token_ids == {2}
    assert 900 <= len(tok.get_vocab()) <= 1000
    assert tok.chat_template == CHAT_TEMPLATE

    text = _chat_prompt(tok, "Hi")
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert DEFAULT_SYSTEM not in text and text.startswith("<|im_start|>system\nBe brief.")
    ids = list(tok.apply_chat_template(msgs))
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 3
    # No BOS is added to plain text (ByteLevel post-processor, as in SmolLM2).
    assert tok.encode("hello")[0] != 1
    # Digits split one per token before byte-level BPE, as in SmolLM2.
    assert len(tok.encode("12345", add_special_tokens=False)) == 5


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "def f(x):\n    return {'a': [1, 2.5, -3e10]}  # tabs\tand  spaces\n\n",
        "Unseen words: zyzzyva, quixotic, xylophones!",
        "Café naïve Zürich — “quotes” … Ελληνικά Привет 你好世界 こんにちは 🙂🚀👩‍💻",
        " leading and trailing spaces ",
    ],
)
def test_tokenizer_round_trip(tiny_root: Path, text: str) -> None:
    _, tok, _ = _load(tiny_root, "llama")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # The streaming detokenizer (what the CLI prints through) agrees too.
    detok = tok.detokenizer
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    # mlx-lm's BPEStreamingDetokenizer drops one leading space of a stream.
    assert detok.text == (text[1:] if text.startswith(" ") else text)


# --- building ----------------------------------------------------------------

_HASH_SCRIPT = """
import hashlib, json, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tiny_models import KINDS, build_tiny_model
root = Path(tempfile.mkdtemp())
out = {}
for kind in KINDS:
    d = build_tiny_model(kind, root / kind)
    out[kind] = [hashlib.sha256((d / f).read_bytes()).hexdigest()
                 for f in ("model.safetensors", "tokenizer.json", "config.json")]
print(json.dumps(out))
"""


def test_builds_are_deterministic_across_processes_and_fast(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _HASH_SCRIPT, str(TESTS_DIR)], capture_output=True, text=True, check=True, timeout=120)
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in KINDS:
        t0 = time.perf_counter()
        d = build_tiny_model(kind, tmp_path / kind)
        elapsed = time.perf_counter() - t0
        assert elapsed < 2.0, f"{kind} build took {elapsed:.2f}s"
        here = [_sha(d / f) for f in ("model.safetensors", "tokenizer.json", "config.json")]
        assert here == other[kind], kind
    # One shared tokenizer; a different seed gives different weights.
    assert len({other[k][1] for k in KINDS}) == 1
    d = build_tiny_model("llama", tmp_path / "llama-seed1", seed=1)
    assert _sha(d / "model.safetensors") != other["llama"][0]


def test_build_replaces_existing_dir_without_leftovers(tmp_path: Path) -> None:
    d = build_tiny_model("qwen2", tmp_path / "m")
    (d / "stale.txt").write_text("x")
    build_tiny_model("qwen2", tmp_path / "m")
    assert not (d / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left


def test_ensure_reuses_and_repairs(tmp_path: Path) -> None:
    d = ensure_tiny_model("llama", tmp_path)
    assert d == tmp_path / "llama"
    weights = d / "model.safetensors"
    stamp, digest = weights.stat().st_mtime_ns, _sha(weights)
    assert ensure_tiny_model("llama", tmp_path) == d
    assert weights.stat().st_mtime_ns == stamp  # reused, not rebuilt
    weights.unlink()  # an incomplete directory is rebuilt
    assert _sha(ensure_tiny_model("llama", tmp_path) / "model.safetensors") == digest
    (d / "tiny_model.json").write_text('{"version": -1}')  # stale builder version
    ensure_tiny_model("llama", tmp_path)
    assert json.loads((d / "tiny_model.json").read_text())["kind"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


# --- each kind -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_loads_with_expected_config(tiny_root: Path, kind: str) -> None:
    model, tok, config = _load(tiny_root, kind)
    assert config["model_type"] == kind
    assert config["eos_token_id"] == 2 and config["max_position_embeddings"] == 4096
    assert config["vocab_size"] == len(tok.get_vocab())
    params = dict(tree_flatten(model.parameters()))
    assert all(v.dtype == mx.float32 for v in params.values())
    assert ("lm_head.weight" in params) == (kind == "qwen2")  # others are tied
    n_layers = {"llama": 4, "qwen3": 3, "gemma3_text": 4, "qwen2": 2}[kind]
    assert len(model.layers) == n_layers == len(make_prompt_cache(model))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_is_deterministic_and_varied(tiny_root: Path, kind: str) -> None:
    model, tok, _ = _load(tiny_root, kind)
    prompt = _chat_prompt(tok, "What is the capital of France?")
    first = mlx_lm.generate(model, tok, prompt, max_tokens=20)
    assert mlx_lm.generate(model, tok, prompt, max_tokens=20) == first
    ids = [r.token for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=20)]
    assert len(ids) == 20  # never stops early on EOS
    assert len(set(ids)) >= 10, ids  # not stuck on one token
    assert not {0, 1, 2} & set(ids)
    other = [r.token for r in mlx_lm.stream_generate(model, tok, _chat_prompt(tok, "Write a poem."), max_tokens=20)]
    assert other != ids  # the output depends on the prompt


def test_gemma3_cache_mixes_sliding_and_global_layers(tiny_root: Path) -> None:
    model, _, config = _load(tiny_root, "gemma3_text")
    cache = make_prompt_cache(model)
    assert [type(c) for c in cache] == [RotatingKVCache, KVCache, RotatingKVCache, KVCache]
    assert all(c.max_size == config["sliding_window"] == 32 for c in cache if isinstance(c, RotatingKVCache))


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_longer_than_sliding_window(tiny_root: Path, kind: str) -> None:
    model, tok, _ = _load(tiny_root, kind)
    text = (
        "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories every evening to the children. "
    ) * 3
    prompt = tok.encode(_chat_prompt(tok, text), add_special_tokens=False)
    assert len(prompt) > 3 * 32

    def run(prefill_step_size: int) -> tuple[list[int], list[Any]]:
        cache = make_prompt_cache(model)
        ids = [
            r.token
            for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=20, prompt_cache=cache, prefill_step_size=prefill_step_size)
        ]
        return ids, cache

    ids, cache = run(2048)
    assert len(ids) == 20 and len(set(ids)) >= 10
    for c in cache:
        # generate_step runs one step ahead, so the last sampled token has
        # also been fed through the model and sits in the cache.
        assert c.offset == len(prompt) + len(ids)
        if isinstance(c, RotatingKVCache):
            assert c.keys.shape[2] == c.max_size  # the window has wrapped
    assert run(2048)[0] == ids
    # Chunked prefill (as after a partial cache restore) decodes the same.
    assert run(16)[0] == ids
