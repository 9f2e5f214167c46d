"""A model's own sampling defaults: the values in its `generation_config.json`.

They rank below everything the user says (flag, agent, config) and above the built-in
defaults, so a model whose authors publish sampling settings is run with them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# generation_config.json's names -> semantic's settings
_KEYS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repeat_penalty"}


def sampling_defaults(model_dir: Path) -> dict[str, Any]:
    """The sampling settings the model's directory names, validated; {} when it has none
    (no file, unreadable, or `do_sample` false: its authors asked for greedy decoding)."""
    try:
        data = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("do_sample") is False:
        return {}
    out: dict[str, Any] = {}
    for theirs, ours in _KEYS.items():
        value = data.get(theirs)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if ours == "top_k" and value >= 0:
            out[ours] = int(value)
        elif ours in ("top_p", "min_p") and 0 <= value <= 1 or ours == "temp" and value >= 0 or ours == "repeat_penalty" and value > 0:
            out[ours] = float(value)
    return out
