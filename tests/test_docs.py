"""The generated completions and man page: current, complete, and working; and the
commands that need no model stay free of mlx imports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semantic_cli import config

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "scripts" / "gen_docs.py"
sys.path.insert(0, str(ROOT / "scripts"))

import gen_docs  # noqa: E402


@pytest.fixture(scope="module")
def tree() -> gen_docs.Cmd:
    return gen_docs.load()


@pytest.fixture
def fake_semantic(tmp_path: Path) -> dict[str, str]:
    """A `semantic` on PATH whose `agents ls --json` names two agents (the completions call it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "semantic"
    script.write_text("#!/bin/sh\necho '" + json.dumps([{"name": "planner", "model": "m"}, {"name": "critic"}]) + "'\n")
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_committed_files_are_current(tmp_path):
    """Regenerating gives exactly the committed files (else: run `python scripts/gen_docs.py`)."""
    subprocess.run([sys.executable, str(GEN), "--out", str(tmp_path)], check=True, capture_output=True)
    stale = [rel for rel in gen_docs.OUTPUTS if (tmp_path / rel).read_text() != (ROOT / rel).read_text()]
    assert not stale, f"stale generated files: {stale}; run `python scripts/gen_docs.py` and commit them"
    check = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_check_mode_fails_on_a_stale_file(tmp_path):
    subprocess.run([sys.executable, str(GEN), "--out", str(tmp_path)], check=True, capture_output=True)
    (tmp_path / "man" / "semantic.1").write_text(".TH OLD 1\n")
    check = subprocess.run([sys.executable, str(GEN), "--check", "--out", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 1 and "man/semantic.1" in check.stderr


def test_tree_has_every_command(tree):
    names = {c.name for c in tree.walk()}
    assert {"semantic chat", "semantic doctor", "semantic config get", "semantic agents", "semantic cache", "semantic bench"} <= names


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_page_renders_every_command_and_option(tree):
    env = dict(os.environ, MANWIDTH="200", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
    out = subprocess.run(["man", "-l", str(ROOT / "man" / "semantic.1")], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr.lower(), out.stderr
    text = out.stdout.replace("\u2010", "-").replace("\u2212", "-")
    for c in tree.walk()[1:]:
        assert c.name in text, f"{c.name} missing from the man page"
        for o in c.options:
            for n in o.names:
                assert n in text, f"{c.name} {n} missing from the man page"
    for section in ("EXIT STATUS", "ENVIRONMENT", "FILES", "INTERACTIVE COMMANDS"):
        assert section in text
    for code, _, _ in gen_docs.exit_codes():
        assert re.search(rf"^\s+{code}\b", text, re.M), f"exit status {code} missing"
    for var in [s.env for s in config.SETTINGS.values() if s.env] + ["SEMANTIC_HOME", "SEMANTIC_DEBUG", "NO_COLOR"]:
        assert var in text, f"{var} missing from the man page"


def test_exit_codes_come_from_errors_py():
    from semantic_cli import errors

    codes = {code: name for code, name, _ in gen_docs.exit_codes()}
    defined = {v: k[5:] for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert codes == defined
    assert {0, 1, 2, 3, 4, 5, 6, 7, 8, 130} <= set(codes)


def test_every_environment_variable_in_the_code_is_described():
    documented = dict(gen_docs.environment())
    for var, text in documented.items():
        assert text and text != "See README.md.", f"{var} has no description in scripts/gen_docs.py"


def test_completion_files_name_every_command_and_option(tree):
    files = {rel: (ROOT / rel).read_text() for rel in gen_docs.OUTPUTS if rel.startswith("completions/")}
    for c in tree.walk()[1:]:
        for rel, text in files.items():
            assert c.path[-1] in text, f"{c.name} missing from {rel}"
            for o in c.options:
                for n in o.names:
                    assert n.lstrip("-") in text, f"{c.name} {n} missing from {rel}"


def _bash_complete(words: list[str], env: dict[str, str]) -> list[str]:
    script = (
        f"source {ROOT / 'completions' / 'semantic.bash'}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; COMPREPLY=()\n"
        "_semantic; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    out = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    return [w for w in out.stdout.split("\n") if w]


def test_bash_completion_works(tree, fake_semantic):
    top = [c.path[-1] for c in tree.subs]
    assert _bash_complete(["semantic", ""], fake_semantic) == top
    assert _bash_complete(["semantic", "ag"], fake_semantic) == ["agents"]
    assert "--max-tokens" in _bash_complete(["semantic", "chat", "--max"], fake_semantic)
    assert _bash_complete(["semantic", "chat", "--agent", ""], fake_semantic) == ["planner", "critic"]
    assert _bash_complete(["semantic", "chat", "-a", "cr"], fake_semantic) == ["critic"]
    keys = _bash_complete(["semantic", "config", "get", ""], fake_semantic)
    assert "model" in keys and "block_tokens" in keys
    assert _bash_complete(["semantic", "config", "set", "model", ""], fake_semantic) == []


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_parses():
    out = subprocess.run(["zsh", "-n", str(ROOT / "completions" / "_semantic")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion_works(fake_semantic):
    path = ROOT / "completions" / "semantic.fish"

    def complete(line: str) -> list[str]:
        script = f"source {path}; complete -C '{line}'"
        out = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True, text=True, env=fake_semantic, timeout=30)
        assert out.returncode == 0, out.stderr
        return [row.split("\t")[0] for row in out.stdout.splitlines()]

    assert "agents" in complete("semantic ")
    assert "ls" in complete("semantic agents ")
    assert sorted(complete("semantic agents show ")) == ["critic", "planner"]
    assert "--max-tokens" in complete("semantic chat --ma")


@pytest.mark.parametrize("args", [["--help"], ["cache", "ls"], ["chat", "--help"], ["agents", "ls"]])
def test_commands_without_a_model_do_not_import_mlx(home, args):
    """`semantic --help`, `semantic cache ls` (and friends) never import mlx or mlx_lm."""
    code = (
        "import sys\n"
        "from semantic_cli.cli.app import main\n"
        f"try:\n    main({args!r})\n"
        "except SystemExit as exc:\n    rc = exc.code\n"
        "else:\n    rc = 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm'))\n"
        "print('RC', rc, 'HEAVY', heavy, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("RC 0 "), out.stderr[-2000:]
    assert last.endswith("HEAVY []"), last
