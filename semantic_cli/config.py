"""User settings: a TOML file in the config dir.

Precedence, everywhere: command-line flag > environment > this file > built-in default.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

from . import paths
from .errors import UsageError


def parse_bytes(text: str | int) -> int:
    """'2GB', '512MiB', '1e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not match:
        raise UsageError(f"not a size: {text!r} (use e.g. 500MB, 2GB, 1GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "b").rstrip("b") or ""
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    return int(number * base**power)


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s' -> seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([smhdw])\s*", text.lower())
    if not match:
        raise UsageError(f"not a duration: {text!r} (use e.g. 30m, 12h, 7d, 2w)")
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * scale


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    parse: Callable[[str], Any]
    env: str | None
    help: str


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("model", "", str, "SEMANTIC_MODEL", "default model: a directory, a .gguf file or a Hugging Face repo id"),
        Setting("block_tokens", 256, _positive_int, "SEMANTIC_BLOCK_TOKENS", "tokens per KV block"),
        Setting("cache_budget", "10GB", lambda t: (parse_bytes(t), t)[1], "SEMANTIC_CACHE_BUDGET", "disk budget for KV blocks"),
        Setting("hot_budget", "2GB", lambda t: (parse_bytes(t), t)[1], "SEMANTIC_HOT_BUDGET", "memory budget for in-process caches"),
        Setting("temp", 0.0, float, None, "default sampling temperature (0 = greedy)"),
        Setting("top_p", 1.0, float, None, "default nucleus sampling threshold"),
        Setting("max_tokens", 512, _positive_int, None, "default maximum tokens per reply"),
    )
}


def load_file() -> dict[str, Any]:
    path = paths.config_file()
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML ({exc}); fix it or run `semantic config path` and delete it") from exc


def get(key: str) -> Any:
    """The effective value of a setting: environment > file > default."""
    setting = SETTINGS.get(key)
    if setting is None:
        raise UsageError(f"unknown setting {key!r}; known: {', '.join(SETTINGS)}")
    if setting.env and os.environ.get(setting.env):
        return _coerce(setting, os.environ[setting.env])
    file_values = load_file()
    if key in file_values:
        return _coerce(setting, str(file_values[key]))
    return setting.default


def source(key: str) -> str:
    setting = SETTINGS[key]
    if setting.env and os.environ.get(setting.env):
        return f"env {setting.env}"
    return "file" if key in load_file() else "default"


def _coerce(setting: Setting, text: str) -> Any:
    try:
        return setting.parse(text)
    except (ValueError, UsageError) as exc:
        raise UsageError(f"bad value for {setting.key}: {text!r} ({exc})") from exc


def set_value(key: str, text: str) -> Any:
    import tomli_w

    if key not in SETTINGS:
        raise UsageError(f"unknown setting {key!r}; known: {', '.join(SETTINGS)}")
    value = _coerce(SETTINGS[key], text)
    values = load_file()
    values[key] = value
    path = paths.config_file()
    paths.config_dir()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(values))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return value


def effective() -> dict[str, tuple[Any, str]]:
    return {key: (get(key), source(key)) for key in SETTINGS}
