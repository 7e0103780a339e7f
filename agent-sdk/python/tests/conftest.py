"""The real tesserad for the SDK's tests: `tesserad --dev` (a SoftHSM token under a fresh state
dir), agents enrolled by writing `agents.d/<name>.toml` and revoked by removing it (SIGHUP)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from tessera_agent import Client, Problem

ROOT = Path(__file__).resolve().parents[3]


def tesserad_path() -> str:
    path = os.environ.get("TESSERA_TEST_TESSERAD") or str(ROOT / "target/debug/tesserad")
    if not os.access(path, os.X_OK):
        pytest.exit(f"no tesserad at {path}: build it (cargo build) or set TESSERA_TEST_TESSERAD", returncode=2)
    return path


class Daemon:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tessera-pysdk-"))
        self.state = self.dir / "state"
        self.socket = str(self.state / "agent.sock")
        self.log = open(self.dir / "tesserad.log", "wb")
        self.proc = subprocess.Popen(
            [tesserad_path(), "--dev", "--state-dir", str(self.state), "--bus", "none"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        )
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tesserad exited: {self.log_text()}")
            try:
                Client(self.socket).health()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    raise RuntimeError(f"tesserad not ready: {self.log_text()}") from None
                time.sleep(0.05)

    def log_text(self) -> str:
        return (self.dir / "tesserad.log").read_text(errors="replace")[-4000:]

    def _wait(self, name: str, done: Callable[[dict | None, Exception | None], bool]) -> None:
        deadline = time.time() + 20
        while True:
            try:
                who: dict | None = Client(self.socket).whoami(name)
                err: Exception | None = None
            except Problem as e:
                who, err = None, e
            if done(who, err):
                return
            if time.time() > deadline:
                raise RuntimeError(f"agent {name}: not reconciled ({who!r}, {err!r})\n{self.log_text()}")
            time.sleep(0.05)

    def enrol(self, name: str, policy: str, selectors: str = "uid = 0") -> None:
        """Write the agent file and reload; returns when the daemon serves the agent."""
        (self.state / "agents.d" / f"{name}.toml").write_text(f"[selectors]\n{selectors}\n[policy]\n{policy}\n")
        self.proc.send_signal(signal.SIGHUP)
        self._wait(name, lambda who, err: who is not None and who.get("status") == "active")

    def revoke(self, name: str) -> None:
        """Remove the agent file and reload; returns once the daemon refuses the agent."""
        (self.state / "agents.d" / f"{name}.toml").unlink()
        self.proc.send_signal(signal.SIGHUP)
        self._wait(name, lambda who, err: who is None or who.get("status") == "revoked")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    os.environ["TESSERA_SOCKET"] = d.socket
    yield d
    d.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An ASGI app under uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(app, port: int | None = None) -> Server:
        s = Server(app, port or free_port())
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def unique(prefix: str) -> str:
    """Agent names unique per test (they share one daemon)."""
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


__all__ = ["Daemon", "Server", "free_port", "unique", "httpx"]
