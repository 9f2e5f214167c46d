"""Opening an agent for a command: what `--model` and `--system` do to it, and the one
stderr line each that says so (`describe`).

Nothing is written here. A flag's change travels with the agent the command uses and is
saved with the first turn that succeeds (`Chat._record`, in the turn's transaction), and a
new agent is created by its first recorded turn: a command that fails (a model that does
not load, a message too long, Ctrl-C before anything was read) leaves the store as it was.

The rule: `--model` applies to an existing agent (it switches the model; the next turn
re-reads the conversation under it). `--system` sets a new agent's persona, or the persona
of an agent with no conversation yet; an agent with a conversation keeps its persona (the
flag is ignored, saying so: `semantic agents edit NAME --system ...` changes it).
"""

from __future__ import annotations

import time
from dataclasses import replace

from .store import Agent


def with_flags(name: str, stored: Agent | None, model_flag: str | None, system: str | None, has_messages: bool) -> Agent:
    """The agent as this command uses it: as stored (or as it would be created), with
    the flags that apply to it (see the module's rule)."""
    if stored is None:
        from .model.loader import requested_spec  # a new agent's model: the config and the loader, only then

        now = time.time()
        return Agent(name, requested_spec(model_flag), system or "", {}, now, now)
    agent = stored
    if model_flag is not None and not model_flag.strip():
        from .model.loader import named

        named(model_flag)  # refused: an empty --model read as no flag
    if model_flag and model_flag != stored.model:
        agent = replace(agent, model=model_flag)
    if system is not None and system != stored.system and not has_messages:
        agent = replace(agent, system=system)
    return agent


def describe(opened: Agent, stored: Agent | None, system: str | None, near: list[str]) -> list[str]:
    """One line for each thing the command does to the agent: a new agent (with the
    existing names it may have meant), a model switched, a persona set or not set."""
    name = opened.name
    if stored is None:
        maybe = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        return [f"new agent {name!r} (model {opened.model}): saved with its first turn{maybe}"]
    lines = []
    if opened.model != stored.model:
        lines.append(f"{name}: model {stored.model} -> {opened.model} (--model; saved once this turn succeeds, the conversation re-read)")
    if system is not None and system != stored.system:
        if opened.system == system:
            lines.append(f"{name}: persona set by --system (it has no conversation yet)")
        else:
            lines.append(
                f"{name}: --system ignored: {name} has a conversation and keeps its persona; "
                f"change it with `semantic agents edit {name} --system ...`"
            )
    return lines
