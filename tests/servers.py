"""A real `semantic serve` for tests: started as its own process on a free loopback port
(port 0: the server writes the one it got to server.json) and the home's Unix socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import SEMANTIC


class Server:
    def __init__(self, home: Path, model: Path | str, *args: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.model = str(model)
        self.args = list(args)
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 120) -> Server:
        self.proc = subprocess.Popen(
            [SEMANTIC, "serve", "--model", self.model, "--port", "0", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        info_file = self.home / "runtime" / "server.json"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"semantic serve exited {self.proc.returncode}: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                info = json.loads(info_file.read_text())
                if info["pid"] == self.proc.pid:
                    self.info = info
                    return self
            except (OSError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, "semantic serve never became ready"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return self.info["url"] + "/v1"

    @property
    def socket(self) -> str:
        return self.info["socket"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        """Signal it and wait: (exit code, its stderr)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"semantic serve did not exit within {timeout} s of signal {sig}") from None
        return self.proc.returncode, err.decode()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def openai_client(server: Server, **kwargs: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=120, **kwargs)


def socket_client(server: Server) -> Any:
    """The openai client over the server's Unix socket (no key needed there)."""
    import httpx
    import openai

    transport = httpx.HTTPTransport(uds=server.socket)
    return openai.OpenAI(
        base_url="http://semantic/v1", api_key="unused", max_retries=0, http_client=httpx.Client(transport=transport, timeout=120)
    )
