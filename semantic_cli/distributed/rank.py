"""One rank of `semantic ... --hosts`: `python -m semantic_cli.distributed.rank ARGS` runs
`semantic ARGS` and, on the rank whose host started the launch, leaves its exit code where the
launching process reads it (mlx.launch does not pass exit codes on)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from ..cli.app import main
from .launch import die_with_parent


def run(argv: list[str]) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored by mlx.launch under --hosts; ours again
    with contextlib.suppress(AttributeError, OSError):  # mlx.launch runs at idle priority under --hosts; not the ranks
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))

    code: object = 1
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if exc.code is not None else 0
        raise
    finally:
        if os.environ.get("SEMANTIC_RANK_MARKER") and os.environ.get("MLX_RANK", "0") == "0":
            from .launch import RANK0_EXIT

            with contextlib.suppress(OSError, ValueError):  # the launcher reads it; under plain mlx.launch it is never set
                sys.stderr.write(f"{RANK0_EXIT} {code if isinstance(code, int) else 1}\n")
                sys.stderr.flush()


if __name__ == "__main__":
    run(sys.argv[1:])
