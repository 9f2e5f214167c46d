"""Where a running server is, and starting one: its lock (one server per home), its
discovery file (`server.json` in the runtime dir: pid, socket, URL, model), its sockets.

A client trusts the discovery file only while the server lock is held: a server killed
with SIGKILL leaves its file behind, and the kernel drops its lock.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import paths
from ..errors import BusyError, UnsafePathError, UsageError
from ..locks import AgentLock, holder

DEFAULT_PORT = 8377
INFO_VERSION = 1


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    socket: str | None
    url: str | None  # http://host:port, when it listens on TCP
    model: str  # the spec it was started with
    model_path: str
    version: int = INFO_VERSION


def _lock_path() -> Path:
    return paths.data_dir() / "server.lock"


def _info_path(create: bool = True) -> Path:
    return paths.runtime_dir(create) / "server.json"


def find() -> ServerInfo | None:
    """The server running for this home, or None. Creates nothing."""
    info_file = _info_path(create=False)
    if not info_file.exists():
        return None
    if holder("server", _lock_path()) is None:
        return None  # a server that was killed left its file: nobody listens
    try:
        data = json.loads(info_file.read_text())
        if data.get("version") != INFO_VERSION:
            return None
        return ServerInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


class ServerLock(AgentLock):
    def __init__(self) -> None:
        super().__init__("server", _lock_path())

    @property
    def what(self) -> str:
        running = find()
        where = f" at {running.socket or running.url}" if running else ""
        return f"a semantic server for this home{where}"


def check_host(host: str, api_key: str | None) -> None:
    """Loopback only, unless an API key guards the server."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        raise UsageError(f"refusing to listen on {host} without an API key: pass --api-key (or set SEMANTIC_API_KEY), or use 127.0.0.1")


def unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, 0600. Called with the server lock held, so a socket
    already there is a dead server's and is replaced; anything else there is refused."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise UnsafePathError(f"{path} exists and is not a socket of yours: move it away, or pass --socket PATH")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no moment when others could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def check_address(host: str, port: int) -> None:
    """--host must resolve and be an address of this machine (UsageError, not "busy"): a
    throwaway socket is bound to it on any port, before the model loads."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {host!r} is not an address or a name this machine can resolve ({exc}); use e.g. 127.0.0.1") from None
    tcp_socket(host, 0).close()


def tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BusyError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}): ports below 1024 need privileges") from None
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass an address of this machine as --host") from None
    sock.listen(128)
    return sock


def publish(info: ServerInfo) -> Callable[[], None]:
    """Write the discovery file; returns what removes it."""
    path = _info_path()
    paths.atomic_write(path, json.dumps(asdict(info)).encode())

    def remove() -> None:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == info.pid:
                path.unlink()

    return remove
