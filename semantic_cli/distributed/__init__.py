"""Beyond one machine: one model split over the ranks of MLX's distributed backend.

`semantic chat|serve --hosts LIST | --hostfile FILE` re-runs the same command under
`mlx.launch` (launch.py); a command that finds itself under mlx.launch (MLX_RANK set)
joins the group here. Rank 0 owns the terminal or HTTP, the transcripts and the agent
index, and runs the ordinary core on a `LockstepEngine`; the other ranks `follow` it and
never print. The model is split by backend/sharding.py (tensor, mlx-lm's pipeline, or a
pipeline over the layer list); each rank persists its own shard's KV blocks under a key
that names the layout (lockstep.py).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ModelError, SemanticError

if TYPE_CHECKING:  # a plain process asks only `launched_rank`: the rest is imported when a group is joined
    from ..backend.sharding import Layout
    from ..model.loader import LoadedModel, ModelRef
    from .link import Link


@dataclass(frozen=True)
class Session:
    link: Link

    @property
    def rank(self) -> int:
        return self.link.rank


def launched_rank() -> int | None:
    """This process's rank when mlx.launch (or mpirun) started it, from the environment alone
    (nothing imported); None in a plain process."""
    for var in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def join() -> Session | None:
    """The distributed group this process was started in, checked (every rank runs the same
    versions); None in a plain process or a group of one."""
    if launched_rank() is None:
        return None
    from ..backend import runtime
    from .link import Link, versions

    mx = runtime.mx()
    group = mx.distributed.init(strict=True)  # the backend mlx.launch configured
    if group.size() == 1:
        return None
    link = Link(group)
    link.check_same(
        "version of semantic, mlx or mlx-lm, or kind of device",
        versions(),
        "install the same versions on every host, and run every rank on the same kind of device (all CPU or all GPU)",
    )
    return Session(link)


def split_scheme() -> str:
    from ..backend import sharding

    scheme = os.environ.get("SEMANTIC_SPLIT", "auto")
    if scheme not in sharding.SCHEMES:
        from ..errors import UsageError

        raise UsageError(f"SEMANTIC_SPLIT={scheme!r}: use one of {', '.join(sharding.SCHEMES)}")
    return scheme


def load_shard(link: Link, ref: ModelRef | None, spec: str) -> tuple[LoadedModel, Layout]:
    """Every rank at once: this rank's shard of the model, checked to be the same model
    everywhere. `ref` is rank 0's resolved model; the others resolve `spec` themselves."""
    from ..backend import sharding
    from ..model import loader

    chosen: list[Layout] = []
    # Before any rank splits: a rank that split otherwise would pair the wrong collectives and hang.
    link.check_same("SEMANTIC_SPLIT", split_scheme(), "set the same SEMANTIC_SPLIT (or none) on every host")

    def split(model: object) -> str:
        chosen.append(sharding.shard(model, link.group, split_scheme()))
        return chosen[-1].key

    error: SemanticError | None = None
    try:
        lm = loader.load(ref or loader.resolve(spec), split)
    except SemanticError as exc:
        error = exc
    [ok] = link.agree_min([0 if error else 1])
    if error is not None:
        raise error
    if not ok:
        raise ModelError(f"another rank could not load model {spec!r}: make its files available on every host")
    link.check_same("model", lm.weights_fingerprint, "give every host the same model files")
    return lm, chosen[0]


def lead(session: Session, announce: Callable[[str], None]) -> None:
    """Rank 0: engines from now on keep the other ranks in step; `announce` gets the one line
    that says how the model was split. The other ranks are told to quit at exit."""
    from .. import engine
    from .link import LOAD
    from .lockstep import LockstepEngine

    link = session.link
    loaded: list[str] = []

    def factory(ref: ModelRef) -> engine.Engine:
        if loaded and loaded[0] != ref.path:
            raise ModelError(f"a run over several ranks serves one model ({loaded[0]}): use an agent of that model, or start another run")
        link.send(LOAD, {"spec": ref.spec})
        lm, layout = load_shard(link, ref, ref.spec)
        loaded.append(ref.path)
        announce(f"{lm.name}: {layout.detail}")
        return LockstepEngine(lm, link)

    engine.factory = factory
    atexit.register(_quit, link)


def _quit(link: Link) -> None:
    from .link import QUIT

    with contextlib.suppress(Exception):  # a rank already gone: nothing to tell it
        link.send(QUIT)


def follow(session: Session) -> int:
    """A rank other than 0: follow rank 0 until it quits; nothing is printed (rank 0 speaks).
    Returns the exit code."""
    from .. import paths
    from .lockstep import follow as run

    if os.environ.get("SEMANTIC_DEBUG") != "1":  # mlx's own transport messages too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.dup2(devnull, 1)

    def load(spec: str) -> LoadedModel:
        lm, layout = load_shard(session.link, None, spec)
        paths.rank_cache = layout.key
        return lm

    try:
        run(session.link, load)
    except SemanticError as exc:
        return exc.exit_code
    except Exception:
        if os.environ.get("SEMANTIC_DEBUG") == "1":
            raise
        return 1
    return 0


def start(announce: Callable[[str], None]) -> bool:
    """For a command that may run under mlx.launch: joins the group; on rank 0 sets up
    `lead` and returns False (run the command); on the others follows rank 0 and exits."""
    session = join()
    if session is None:
        return False
    if session.rank != 0:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank: rank 0 decides
        sys.stdout.flush()
        raise SystemExit(follow(session))
    lead(session, announce)
    return True
