"""Stack: runs retrieval, ranking and the gateway as child processes on loopback, and stops them cleanly.

Usage::

    with Stack(Path("var/bundles"), Path("var/state"), http_port=0) as stack:
        print(stack.http_url)      # REST, healthy once the with-block body runs
        stack.wait()               # until SIGINT/SIGTERM or a child exits
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO


class StackError(RuntimeError):
    pass


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Stack:
    def __init__(
        self,
        bundles_dir: Path,
        state: Path | str,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 50050,
        ready_timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
        shards: int = 1,
        log_dir: Path | None = None,
        metrics: bool = False,
    ) -> None:
        self.bundles_dir = Path(bundles_dir).resolve()
        self.state = str(state)
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.ready_timeout_s = ready_timeout_s
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        # With shards > 1, retrieval runs as n processes "retrieval-0".."retrieval-{n-1}" (`--shard i/n`).
        self.shards = shards
        self.env = {**os.environ, **(env or {})}
        # When set, each child's stderr (its JSON log) goes to log_dir/<name>.log instead of ours.
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._logs: list[IO[bytes]] = []
        # With metrics, retrieval and ranking serve /metrics on a free port each (the gateway always does, on REST).
        self.metrics_ports: dict[str, int] = {}
        self._metrics = metrics
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="recsys-stack-")
        self.ports: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        self.stop()

    def _spawn(self, name: str, module: str, *args: str) -> None:
        port_file = Path(self._tmp.name) / f"{name}.port"
        cmd = [sys.executable, "-m", module, "--port-file", str(port_file), *args]
        if self._metrics and module != "gateway":
            self.metrics_ports[name] = _free_port(self.host)
            cmd += ["--metrics-port", str(self.metrics_ports[name])]
        stderr = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = (self.log_dir / f"{name}.log").open("ab")
            self._logs.append(stderr)
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stderr=stderr)

    def _wait_port(self, name: str, deadline: float) -> int:
        port_file = Path(self._tmp.name) / f"{name}.port"
        proc = self.procs[name.removesuffix("-grpc")]
        while time.monotonic() < deadline:
            if port_file.exists():
                self.ports[name] = int(port_file.read_text())
                return self.ports[name]
            if proc.poll() is not None:
                raise StackError(f"{name} exited with code {proc.returncode} before it was serving (see its log above)")
            time.sleep(0.05)
        raise StackError(f"{name} did not start serving within {self.ready_timeout_s:.0f} s")

    def start(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        common = ["--bundles", str(self.bundles_dir), "--host", self.host]
        for name, shard in self._retrieval_names():
            self._spawn(name, "retrieval_svc", *common, "--port", "0", *(["--shard", shard] if shard else []))
        self._spawn("ranking", "ranking_svc", *common, "--port", "0")
        retrieval = ",".join(f"{self.host}:{self._wait_port(name, deadline)}" for name, _ in self._retrieval_names())
        ranking = self._wait_port("ranking", deadline)
        grpc_port_file = Path(self._tmp.name) / "gateway-grpc.port"
        self._spawn(
            "gateway",
            "gateway",
            *common,
            "--state",
            self.state,
            "--port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--retrieval",
            retrieval,
            "--ranking",
            f"{self.host}:{ranking}",
            "--grpc-port-file",
            str(grpc_port_file),
        )
        self._wait_port("gateway", deadline)
        self._wait_port("gateway-grpc", deadline)
        self._wait_healthy(deadline)

    def _ssl_context(self) -> ssl.SSLContext | None:
        """With REST over TLS (RECSYS_GATEWAY_TLS_CERT_FILE in env), trust the gateway's CA for the health check."""
        if self.scheme != "https":
            return None
        ca = self.env.get("RECSYS_GATEWAY_TLS_CA_FILE") or None
        return ssl.create_default_context(cafile=ca)

    def _wait_healthy(self, deadline: float) -> None:
        context = self._ssl_context()
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=2, context=context) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise StackError(f"{name} exited with code {proc.returncode} while starting (see its log above)")
            time.sleep(0.1)
        raise StackError(f"{self.http_url}/healthz did not answer 200 within {self.ready_timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the gateway first (it drains), then the services; SIGKILL whatever lingers."""
        for name in ("gateway", "ranking", *(name for name, _ in self._retrieval_names())):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()
        self._tmp.cleanup()

    def _retrieval_names(self) -> list[tuple[str, str]]:
        """(process name, --shard value) of each retrieval process."""
        if self.shards == 1:
            return [("retrieval", "")]
        return [(f"retrieval-{i}", f"{i}/{self.shards}") for i in range(self.shards)]

    def wait(self) -> int:
        """Block until SIGINT/SIGTERM (returns 0) or until a child exits on its own (returns 1)."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.2):
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    print(f"recsys serve: {name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    return 1
        return 0

    # -- addresses ----------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.env.get("RECSYS_GATEWAY_TLS_CERT_FILE") else "http"

    @property
    def http_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['gateway']}"

    @property
    def grpc_addr(self) -> str:
        return f"{self.host}:{self.ports['gateway-grpc']}"

    def banner(self) -> str:
        return (
            f"recsys is serving: REST {self.http_url} (OpenAPI at {self.http_url}/docs), "
            f"gRPC {self.grpc_addr}; retrieval {self._retrieval_ports()}, ranking :{self.ports['ranking']}. "
            "Ctrl-C stops it."
        )

    def _retrieval_ports(self) -> str:
        return " ".join(f":{self.ports[name]}" for name, _ in self._retrieval_names())
