"""User settings: a TOML file in the config dir.

Precedence, everywhere: command-line flag > environment > this file > built-in default.
Every value is validated with the flags' ranges wherever it comes from (`config set`,
the environment, the file when it is read); a bad one is a usage error (exit 2) that
names where it came from. Writers take `config.lock` (flock) in the config dir, then
replace the file with a unique temp file, fsync-ed and renamed; a config file that is a
symbolic link is read, but `config set` refuses to replace it (exit 10).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

from . import paths
from .errors import UsageError

MAX_BYTES = 2**63 - 1  # what SQLite and the file APIs can hold


def parse_bytes(text: str | int) -> int:
    """'2GB', '512MiB', '1e9' or an int -> bytes (0 to MAX_BYTES; anything else is a UsageError)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    hint = "use e.g. 500MB, 2GB, 1GiB"
    if not match:
        raise UsageError(f"not a size: {text!r} ({hint})")
    try:
        number = float(match.group(1))
    except ValueError:
        raise UsageError(f"not a size: {text!r} ({hint})") from None
    unit = (match.group(2) or "b").rstrip("b") or ""
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    value = number * base**power
    if not math.isfinite(value) or value > MAX_BYTES:
        raise UsageError(f"size too large: {text!r} (at most {MAX_BYTES} bytes, about 9.2 EB; {hint})")
    return int(value)


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s' -> seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([smhdw])\s*", text.lower())
    hint = "use e.g. 30m, 12h, 7d, 2w"
    if not match:
        raise UsageError(f"not a duration: {text!r} ({hint})")
    try:
        number = float(match.group(1))
    except ValueError:
        raise UsageError(f"not a duration: {text!r} ({hint})") from None
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return number * scale


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    parse: Callable[[str], Any]
    env: str | None
    help: str


# The same ranges as the command-line flags (--temp, --top-p, --max-tokens), for the
# file, the environment and `config set` alike.
def _number(kind: Callable[[str], Any], text: str, rule: str) -> Any:
    """`kind(text)`, a ValueError saying `rule` when it is no number at all ('²', 'abc')."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(rule) from None


def _positive_int(text: str) -> int:
    rule = "must be a whole number >= 1"
    value = _number(int, text, rule)
    if value <= 0:
        raise ValueError(rule)
    return value


def _temp(text: str) -> float:
    rule = "must be a finite number >= 0"
    value = _number(float, text, rule)
    if not math.isfinite(value) or value < 0:
        raise ValueError(rule)
    return value


def _top_p(text: str) -> float:
    rule = "must be a number in [0, 1]"
    value = _number(float, text, rule)
    if not 0 <= value <= 1:  # NaN fails too; 0 and 1 both mean no nucleus cut, as for --top-p
        raise ValueError(rule)
    return value


def _count(text: str) -> int:
    rule = "must be a whole number >= 0"
    value = _number(int, text, rule)
    if value < 0:
        raise ValueError(rule)
    return value


def _penalty(text: str) -> float:
    rule = "must be a finite number > 0 (1 = no penalty)"
    value = _number(float, text, rule)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(rule)
    return value


def _size(text: str) -> str:
    parse_bytes(text)
    return text


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("model", "", str, "SEMANTIC_MODEL", "default model: a directory, a .gguf file or a Hugging Face repo id"),
        Setting("block_tokens", 256, _positive_int, "SEMANTIC_BLOCK_TOKENS", "tokens per KV block"),
        Setting("cache_budget", "10GB", _size, "SEMANTIC_CACHE_BUDGET", "disk budget for KV blocks"),
        Setting("hot_budget", "2GB", _size, "SEMANTIC_HOT_BUDGET", "memory budget for in-process caches"),
        Setting(
            "buffer_cache",
            "1GB",
            _size,
            "SEMANTIC_BUFFER_CACHE",
            "freed memory MLX keeps for reuse on the CPU (a process's next restore then needs no new pages)",
        ),
        Setting("temp", 0.0, _temp, None, "default sampling temperature (0 = greedy)"),
        Setting("top_p", 1.0, _top_p, None, "default nucleus sampling threshold"),
        Setting("max_tokens", 512, _positive_int, None, "default maximum tokens per reply"),
        Setting("top_k", 0, _count, None, "default top-k sampling (0 = off)"),
        Setting("min_p", 0.0, _top_p, None, "default min-p sampling threshold (0 = off)"),
        Setting("repeat_penalty", 1.15, _penalty, None, "default repetition penalty (1 = off)"),
        Setting("repeat_last_n", 256, _count, None, "tokens the repetition penalty looks back over"),
        Setting("round_cap", 20, _positive_int, None, "most rounds a /round runs without asking (more: asked at a terminal)"),
    )
}


def _read_file() -> dict[str, Any]:
    """The file's TOML, not yet validated ({} when there is no file)."""
    path = paths.config_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # read through a link the user made (dotfiles); never written through
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"config file {path} is not a regular file; move it away")
        data = f.read()
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"config file {path} is not valid TOML ({exc}); fix it or run `semantic config path` and delete it") from exc


def load_file() -> dict[str, Any]:
    """The config file's settings, each validated as `config set` validates it:
    a bad value is a UsageError naming the file and the key."""
    values = _read_file()
    for key, value in values.items():
        setting = SETTINGS.get(key)
        if setting is None:
            continue  # a setting of another release: kept, not used
        try:
            values[key] = setting.parse(_text(value))
        except (ValueError, UsageError) as exc:
            raise UsageError(
                f"config file {paths.config_file()}: {_why(key, value, exc)}; "
                f"fix it with `semantic config set {key} VALUE` or edit the file"
            ) from exc
    return values


def _why(key: str, value: Any, exc: Exception) -> str:
    if isinstance(exc, UsageError):  # says the value itself
        return f"bad value for {key}: {exc.message}"
    return f"bad value for {key}: {value!r} ({exc})"


def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("must be a string or a number")
    return str(value)


def get(key: str) -> Any:
    """The effective value of a setting: environment > file > default."""
    return _resolve(_setting(key), load_file())[0]


def source(key: str) -> str:
    return _resolve(_setting(key), load_file())[1]


def _setting(key: str) -> Setting:
    setting = SETTINGS.get(key)
    if setting is None:
        raise UsageError(f"unknown setting {key!r}; known: {', '.join(SETTINGS)}")
    return setting


def _resolve(setting: Setting, file_values: dict[str, Any]) -> tuple[Any, str]:
    """A setting's value and where it comes from, given the file's (validated) values."""
    if setting.env and os.environ.get(setting.env):
        return _coerce(setting, os.environ[setting.env], f" (from {setting.env})"), f"env {setting.env}"
    if setting.key in file_values:
        return file_values[setting.key], "file"
    return setting.default, "default"


def _coerce(setting: Setting, text: str, where: str = "") -> Any:
    try:
        return setting.parse(text)
    except (ValueError, UsageError) as exc:
        raise UsageError(_why(setting.key + where, text, exc)) from exc


@contextlib.contextmanager
def _write_lock() -> Iterator[None]:
    """Serialise writers of the config file: an flock on `config.lock` in the config dir."""
    fd = paths.open_nofollow(paths.config_dir() / "config.lock", os.O_RDWR | os.O_CREAT, "lock file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def set_value(key: str, text: str) -> Any:
    """Validate and write one setting: read, change and replace the file under the
    write lock; the new file is a unique temp file, fsync-ed and renamed into place."""
    import tomli_w

    if key not in SETTINGS:
        raise UsageError(f"unknown setting {key!r}; known: {', '.join(SETTINGS)}")
    value = _coerce(SETTINGS[key], text)
    with _write_lock():
        path = paths.config_file()
        paths.refuse_link(path, "config file")
        values = _read_file()  # other keys as they are: a bad one is reported when read, and fixable here
        values[key] = value
        paths.atomic_write(path, tomli_w.dumps(values).encode("utf-8"))
    return value


def effective() -> dict[str, tuple[Any, str]]:
    """Every setting's value and source, reading the file once."""
    file_values = load_file()
    return {key: _resolve(setting, file_values) for key, setting in SETTINGS.items()}
