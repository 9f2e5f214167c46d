"""`--hosts`/`--hostfile`: run the same command on every rank through `mlx.launch`.

mlx.launch starts one process per rank (here and over ssh), gives each MLX_RANK and the
backend's settings, and forwards their output. This wrapper starts it with the command
minus the launch options, passes piped input to rank 0 as its message (mlx.launch never
closes its ranks' stdin), keeps mlx's transport chatter and per-rank warnings off the
terminal, and turns the run's end into one line and rank 0's exit code.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ..errors import RankGoneError, UsageError

BACKENDS = ("ring", "jaccl", "mpi", "nccl", "any")
_LAUNCH_OPTS = ("--hosts", "--hostfile", "--backend")
_NOISE = re.compile(r"^(\x1b\[\d+m)?\[(ring|jaccl|mpi|nccl|WARN|INFO)\]")
STOP_GRACE_S = 20.0  # a server's own stop takes up to ~10 s
# Rank 0's last stderr line under our launcher: its exit code, wherever it ran (a remote host
# shares no file with this one; ssh passes only what `--env` names).
RANK0_EXIT = "semantic-rank0-exit"
_RANK0_CODE = re.compile(rf"^{RANK0_EXIT} (-?\d+)\s*$")
_RANK_EXIT = re.compile(r"Node with rank (\d+) (exited with code (-?\d+)|was killed)")


def strip_launch_options(argv: list[str]) -> list[str]:
    """`argv` without --hosts/--hostfile/--backend and their values."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _LAUNCH_OPTS:
            skip = True
            continue
        if arg.startswith(tuple(o + "=" for o in _LAUNCH_OPTS)):
            continue
        out.append(arg)
    return out


def check_hostfile(hostfile: Path) -> None:
    """The hostfile as mlx.launch reads it: a JSON list of hosts (or {"hosts": [...]}), each with
    an "ssh" name. Checked here so a bad one is one line, not mlx.launch's usage text."""
    import json

    if not hostfile.is_file():
        raise UsageError(f"--hostfile {hostfile}: no such file")
    try:
        data = json.loads(hostfile.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--hostfile {hostfile}: not readable JSON ({exc})") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    named = isinstance(hosts, list) and all(isinstance(h, dict) and isinstance(h.get("ssh"), str) and h["ssh"] for h in hosts)
    if not named or not hosts:
        raise UsageError(f'--hostfile {hostfile}: want a JSON list of hosts, each like {{"ssh": "host", "ips": ["10.0.0.1"]}}')


def command(hosts: str | None, hostfile: Path | None, backend: str, argv: list[str]) -> list[str]:
    """The mlx.launch command line that runs `semantic ARGV` on every rank."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}")
    if hosts and hostfile:
        raise UsageError("give --hosts or --hostfile, not both")
    if hostfile is not None:
        check_hostfile(hostfile)
    launcher = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launcher) if launcher.exists() else "mlx.launch", "--python", sys.executable]
    # Remote ranks get only the environment `--env` names: the home, the split, and the exit-code line.
    forwarded = {k: v for k, v in os.environ.items() if k.startswith("SEMANTIC_")} | {"SEMANTIC_RANK_MARKER": "1"}
    for key, value in sorted(forwarded.items()):
        cmd += ["--env", f"{key}={value}"]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    else:
        names = [h.strip() for h in (hosts or "").split(",") if h.strip()]
        if not names:
            raise UsageError("--hosts needs at least one host (e.g. 127.0.0.1,127.0.0.1 for two ranks here)")
        cmd += ["--hosts", ",".join(names)]
        if all(n in ("127.0.0.1", "localhost") for n in names) and backend in ("ring", "any"):
            cmd += ["--starting-port", str(_free_ports(len(names)))]  # not mlx.launch's fixed 32323: runs side by side
    if backend != "any":
        cmd += ["--backend", backend]
    return [*cmd, "--", "-m", "semantic_cli.distributed.rank", *argv]


def _free_ports(n: int) -> int:
    """The first of `n` consecutive loopback ports free now (ring listens on start, start+1, ...)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        if start + n > 65535:
            continue
        try:
            for port in range(start, start + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return start
    return 32323


def shared_host_env(hosts: str | None) -> dict[str, str]:
    """Ranks that share this machine share its cores: each gets its part for BLAS threads
    (OpenBLAS threads of two processes on the same cores wait for each other, spinning)."""
    names = [h.strip() for h in (hosts or "").split(",") if h.strip()]
    if not names or "OPENBLAS_NUM_THREADS" in os.environ or not all(n in ("127.0.0.1", "localhost") for n in names):
        return {}
    return {"OPENBLAS_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(names)))}


def run(cmd: list[str], env_extra: dict[str, str] | None = None) -> int:
    """Run mlx.launch; returns rank 0's exit code, or raises RankGoneError when a rank stopped."""
    env = dict(os.environ, **(env_extra or {}))
    # An empty pipe kept open, not /dev/null: mlx.launch polls its stdin, and at EOF it spins.
    quiet, keep_open = os.pipe()
    proc = subprocess.Popen(cmd, stdin=quiet, stderr=subprocess.PIPE, env=env, preexec_fn=_launcher_child)
    os.close(quiet)
    gone: list[tuple[int, str]] = []
    # mlx.launch stops the others with one SIGTERM when a rank ends badly; a rank stuck in a
    # collective with the one that went (a server finishing its turns) is killed after a while.
    reaper = threading.Timer(STOP_GRACE_S, _kill_all, args=(proc.pid,))
    reaper.daemon = True
    codes: list[int] = []
    reader = threading.Thread(target=_filter, args=(proc, gone, reaper, codes), daemon=True)
    reader.start()
    previous = signal.signal(signal.SIGTERM, lambda *_: _stop_rank0(proc.pid))
    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a closed terminal ends this wrapper, and so the ranks
    try:
        while proc.poll() is None:
            try:
                proc.wait()
            except KeyboardInterrupt:  # every rank got it too: rank 0 ends its turn or its server
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, hangup)
        os.close(keep_open)
        reaper.cancel()
    reader.join(timeout=5)
    code = codes[-1] if codes else None
    if code is not None:  # rank 0 ended on its own: it has said why, if it failed
        return code
    rank, how = gone[0] if gone else (0, "stopped")  # the first rank seen to end: mlx.launch then stops the others
    raise RankGoneError(
        f"rank {rank} {how}, so the run stopped: every completed turn is in the transcript; "
        "run the command again (each rank re-prefills what its cache lacks)"
    )


def _launcher_child() -> None:
    """mlx.launch ignores Ctrl-C (which reaches every process here): rank 0 alone acts on it
    (rank.py restores it there), and mlx.launch goes when its ranks have gone. Its loop that
    forwards the ranks' stdio never blocks (it selects on pipes that are always writable), so
    it runs at idle priority; the ranks take normal priority back (rank.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    with contextlib.suppress(AttributeError, OSError):  # its I/O loop spins: only idle cores for it
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (mlx.launch when this wrapper is
    killed, a rank when mlx.launch is), so no rank is left waiting in a collective."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent went before the call
        os.kill(os.getpid(), signal.SIGKILL)


def _stop_rank0(launcher: int) -> None:
    """SIGTERM for this wrapper: passed to rank 0 when it runs here (a server then stops as it
    does alone, and the others follow it out), else to mlx.launch."""
    for pid in _children(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"MLX_RANK=0" in environ:
            os.kill(pid, signal.SIGTERM)
            return
    os.kill(launcher, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    """Linux: the children of every thread of `pid` (mlx.launch starts each rank from a thread)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def _kill_all(launcher: int) -> None:
    for pid in [*_children(launcher), launcher]:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _filter(proc: subprocess.Popen[bytes], gone: list[tuple[int, str]], reaper: threading.Timer, codes: list[int]) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        code = _RANK0_CODE.match(line.strip("\r\n"))
        if code:
            codes.append(int(code.group(1)))
            continue
        m = _RANK_EXIT.search(line)
        if m:
            how = "was killed" if m.group(3) is None else f"exited with code {m.group(3)}"
            gone.append((int(m.group(1)), how))
            with contextlib.suppress(RuntimeError):  # started already
                reaper.start()
            continue
        if _NOISE.match(line):
            continue
        sys.stderr.write(line)
        sys.stderr.flush()
