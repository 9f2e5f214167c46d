"""The ranks' one channel: rank 0 broadcasts operations, every rank agrees on numbers.

Everything goes through `mx.distributed` collectives on the model's stream, so it works on
every backend mlx.launch starts (ring, JACCL, MPI, NCCL). A message is a header (op,
payload length) summed over ranks (the others add zeros), then its JSON payload the same
way. Every rank must make the same calls in the same order: rank 0 leads, the others
follow in `lockstep.follow`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..backend import runtime
from ..errors import ModelError, RankGoneError

# Operations rank 0 sends.
LOAD, BATCH, ADD, STEP, CANCEL, CLOSE, SEED, QUIT = range(1, 9)


@dataclass(frozen=True)
class Message:
    op: int
    payload: dict[str, Any]


class Link:
    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank: int = group.rank()
        self.world: int = group.size()

    def _sum(self, values: Any, dtype: Any = None) -> Any:
        mx = runtime.mx()
        import numpy as np

        arr = mx.array(values, dtype=dtype or mx.int32)
        out = mx.distributed.all_sum(arr, group=self.group, stream=_stream())
        with rank_gone():
            mx.eval(out)
        return np.array(out)

    def send(self, op: int, payload: dict[str, Any] | None = None) -> None:
        """Rank 0: broadcast one operation."""
        import numpy as np

        data = json.dumps(payload or {}, separators=(",", ":")).encode() if payload else b""
        self._sum(np.array([op, len(data)], np.int32))
        if data:
            padded = data + b"\0" * (-len(data) % 4)
            self._sum(np.frombuffer(padded, np.int32))

    def recv(self) -> Message:
        """The other ranks: the next operation from rank 0."""
        import numpy as np

        op, size = (int(v) for v in self._sum(np.zeros(2, np.int32)))
        if not size:
            return Message(op, {})
        words = self._sum(np.zeros((size + 3) // 4, np.int32))
        return Message(op, json.loads(words.astype(np.int32).tobytes()[:size]))

    def agree_min(self, values: list[int]) -> list[int]:
        """The minimum of each value over the ranks (how many cached tokens every rank has)."""
        mx = runtime.mx()
        import numpy as np

        out = mx.distributed.all_min(mx.array(np.array(values, np.int64).astype(np.int32)), group=self.group, stream=_stream())
        with rank_gone():
            mx.eval(out)
        return [int(v) for v in np.array(out)]

    def check_same(self, what: str, text: str, advice: str) -> None:
        """Refuse to go on unless every rank has the same `text` (a version, a model)."""
        import numpy as np

        digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.int32)
        mx = runtime.mx()
        gathered = mx.distributed.all_gather(mx.array(digest), group=self.group, stream=_stream())
        with rank_gone():
            mx.eval(gathered)
        rows = np.array(gathered).reshape(self.world, -1)
        other = [r for r in range(self.world) if not np.array_equal(rows[r], rows[0])]
        if other:
            raise ModelError(f"rank {other[0]} has another {what} than rank 0: {advice}")


_TRANSPORT = re.compile(r"^\[(ring|jaccl|mpi|nccl)\]")


@contextlib.contextmanager
def rank_gone() -> Iterator[None]:
    """A collective that fails because a peer went (MLX raises "[ring] connection to a peer was
    lost") becomes the one error that says so."""
    try:
        yield
    except RuntimeError as exc:
        if not _TRANSPORT.match(str(exc)):
            raise
        raise RankGoneError(
            f"a rank of this run stopped mid-turn ({exc}), so the run stopped: every completed turn is in the transcript; "
            "run the command again (each rank re-prefills what its cache lacks)"
        ) from exc


def _stream() -> Any:
    """The model's own stream: every collective of a rank must queue in one order (backend/compat.py)."""
    from ..backend import compat

    return compat.generation_stream()


def versions() -> str:
    """What must match on every rank for them to compute the same thing, in the same passes
    (on the CPU the engine runs no pass over a reply's last token, on a GPU it does)."""
    from importlib.metadata import version

    from .. import __version__

    device = runtime.mx().default_device().type
    return f"semantic {__version__}, mlx {version('mlx')}, mlx-lm {version('mlx-lm')}, device {device}"
