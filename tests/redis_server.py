"""A real redis-server for tests: own temp dir, free port, AOF with appendfsync always.

Under CI=true a missing binary fails the test (scripts/test installs it); elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        message = "redis-server not found on PATH (apt-get install redis-server; scripts/test does it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}: required under CI")
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """redis-server as a child process; start() again after kill() restarts it on the same dir and port."""

    def __init__(self, data_dir: Path, appendfsync: str = "always") -> None:
        self.binary = redis_binary()
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendfsync = appendfsync
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        for _ in range(5):  # a free port can be taken between bind-probe and start: retry on another
            port = self.port or _free_port()
            cmd = [
                self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
                "--logfile", str(self.dir / "redis.log"), "--daemonize", "no",
            ]  # fmt: skip
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with redis.Redis(port=port, socket_timeout=1) as client:
                        if client.ping():
                            self.port = port
                            return self
                except redis.ConnectionError:
                    time.sleep(0.02)
                except redis.BusyLoadingError:
                    time.sleep(0.05)
            self.stop()
        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:] if (self.dir / "redis.log").exists() else ""
        raise RuntimeError(f"redis-server did not start in {self.dir}:\n{log}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
