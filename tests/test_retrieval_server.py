"""The retrieval service as a real process: health, reflection, validation, limits, damaged bundles, SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos.recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from recsys_common.bundle import CURRENT, current_version
from tests.bundle_factory import DIM, make_bundle
from tests.test_bundle import DAMAGES

ROOT = Path(__file__).resolve().parent.parent
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 16 << 20)]


class RetrievalProcess:
    """`python -m retrieval_svc` on a free loopback port; its log goes to a file the test can read."""

    def __init__(self, bundles: Path, *args: str, poll_interval_s: float = 0.1) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="retrieval-")
        self.port_file = Path(self._tmp.name) / "port"
        self.log_file = Path(self._tmp.name) / "log"
        cmd = [sys.executable, "-m", "retrieval_svc", "--bundles", str(bundles), "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--port-file", str(self.port_file), "--poll-interval-s", str(poll_interval_s), *args]
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"retrieval did not start: {self.log()}")
            time.sleep(0.02)
        self.address = f"127.0.0.1:{int(self.port_file.read_text())}"
        self.channel = grpc.insecure_channel(self.address, options=CLIENT_OPTIONS)
        self.stub = retrieval_pb2_grpc.RetrievalStub(self.channel)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_log(self, text: str, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} never appeared in the log:\n{self.log()}"
            time.sleep(0.02)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()
        return self.proc.returncode


def point_current(bundles: Path, version: str) -> None:
    """Publish without verifying (what a broken exporter or a bad copy would do)."""
    tmp = bundles / f".{CURRENT}.test"
    tmp.write_text(version + "\n")
    os.replace(tmp, bundles / CURRENT)


def by_vector(values: list[float], k: int = 3, **kw: object) -> retrieval_pb2.SearchRequest:
    return retrieval_pb2.SearchRequest(vector=retrieval_pb2.Vector(values=values), k=k, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("retrieval-bundles")
    make_bundle(path)
    return path


@pytest.fixture(scope="module")
def server(bundles: Path) -> Iterator[RetrievalProcess]:
    proc = RetrievalProcess(bundles)
    yield proc
    assert proc.stop() == 0


def test_health_serving_and_reflection(server: RetrievalProcess) -> None:
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.health("recsys.v1.Retrieval") == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(server.channel).get_services()
    assert "recsys.v1.Retrieval" in services and "grpc.health.v1.Health" in services


def test_answers_name_version_shard_and_method(server: RetrievalProcess, bundles: Path) -> None:
    reply = server.stub.Search(by_vector(np.eye(DIM)[0].tolist()), timeout=5)
    assert reply.bundle_version == current_version(bundles)
    assert reply.shard == "0/1" and reply.method == "ann" and len(reply.items) == 3


def test_columns_answer_the_same_items_as_columns(server: RetrievalProcess) -> None:
    query = np.linspace(1.0, -1.0, DIM).tolist()
    plain = server.stub.Search(by_vector(query, k=20), timeout=5)
    columns = server.stub.Search(by_vector(query, k=20, columns=True), timeout=5)
    assert len(plain.items) == 20 and not plain.item_ids and not plain.scores
    assert not columns.items and list(columns.item_ids) == [i.item_id for i in plain.items]
    assert list(columns.scores) == [i.score for i in plain.items]
    assert list(columns.query_vector) == list(plain.query_vector)
    batch = server.stub.BatchSearch(
        retrieval_pb2.BatchSearchRequest(requests=[by_vector(query, k=20), by_vector(query, k=20, columns=True)]),
        timeout=5,
    )
    assert list(batch.responses) == [plain, columns]


@pytest.mark.parametrize(
    ("call", "request_", "field"),
    [
        ("Search", by_vector([1.0] * DIM, k=0), "k"),
        ("Search", by_vector([1.0] * DIM, k=10_001), "k"),
        ("Search", by_vector([1.0] * 3), "vector"),
        ("Search", by_vector([float("nan")] * DIM), "vector"),
        ("Search", retrieval_pb2.SearchRequest(vector=retrieval_pb2.Vector(), k=3), "vector"),
        ("Search", by_vector([1.0] * DIM, exclude_item_ids=["x"] * 100_001), "exclude_item_ids"),
        ("BatchSearch", retrieval_pb2.BatchSearchRequest(), "requests"),
        ("BatchSearch", retrieval_pb2.BatchSearchRequest(requests=[by_vector([1.0] * DIM)] * 257), "requests"),
        (
            "BatchSearch",
            retrieval_pb2.BatchSearchRequest(requests=[by_vector([1.0] * DIM), by_vector([1.0] * DIM, k=-1)]),
            "requests[1].k",
        ),
        ("SetUnavailable", retrieval_pb2.SetUnavailableRequest(add_item_ids=["i001", ""]), "add_item_ids[1]"),
    ],
)
def test_invalid_requests_are_invalid_argument_naming_the_field(
    server: RetrievalProcess, call: str, request_: object, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(server.stub, call)(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:"), err.value.details()


def test_oversized_request_is_refused(server: RetrievalProcess) -> None:
    huge = by_vector([1.0] * DIM, exclude_item_ids=["x" * 100_000] * 50)  # 5 MB > the 4 MB limit
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Search(huge, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_set_unavailable_at_runtime(server: RetrievalProcess) -> None:
    query = by_vector(np.eye(DIM)[0].tolist(), k=40)
    first = server.stub.Search(query, timeout=5).items[0].item_id
    reply = server.stub.SetUnavailable(retrieval_pb2.SetUnavailableRequest(add_item_ids=[first, "unknown"]), timeout=5)
    assert (reply.runtime_unavailable, reply.unavailable_in_shard) == (2, 1)
    items = [i.item_id for i in server.stub.Search(query, timeout=5).items]
    assert first not in items and len(items) == 39
    server.stub.SetUnavailable(retrieval_pb2.SetUnavailableRequest(clear=True), timeout=5)
    assert server.stub.Search(query, timeout=5).items[0].item_id == first


def test_damaged_bundles_are_refused_while_the_old_one_serves(server: RetrievalProcess, bundles: Path) -> None:
    good = current_version(bundles)
    query = retrieval_pb2.SearchRequest(context=common_pb2.UserContext(recent_item_ids=["i001"]), k=5)
    try:
        for case, (damage, message) in DAMAGES.items():
            version = make_bundle(bundles, seed=7, make_current=False)
            damage(bundles / version)
            point_current(bundles, version)
            server.wait_log(f"refused bundle {version}")
            line = next(x for x in server.log().splitlines() if f"refused bundle {version}" in x)
            assert message in line, (case, line)
            assert server.health() == health_pb2.HealthCheckResponse.SERVING
            assert server.stub.Search(query, timeout=5).bundle_version == good
            shutil.rmtree(bundles / version, ignore_errors=True)
    finally:
        point_current(bundles, good)
    assert server.stub.Search(query, timeout=5).bundle_version == good


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    make_bundle(tmp_path, n_items=20_000, dim=32)
    proc = RetrievalProcess(tmp_path)
    vec = np.ones(32, np.float32).tolist()
    # A deliberately slow request: 256 searches with their own exclusions, 700 items each.
    slow = retrieval_pb2.BatchSearchRequest(
        requests=[by_vector(vec, k=700, exclude_item_ids=[f"i{i:03d}" for i in range(1, 50 + n)]) for n in range(256)]
    )
    start = time.perf_counter()
    proc.stub.BatchSearch(slow, timeout=30)
    duration = time.perf_counter() - start
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["reply"] = proc.stub.BatchSearch(slow, timeout=30)
        except grpc.RpcError as err:
            outcome["error"] = err

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(duration / 3)
    proc.proc.send_signal(signal.SIGTERM)
    thread.join()
    assert "error" not in outcome, outcome
    assert len(outcome["reply"].responses) == 256  # type: ignore[attr-defined]
    assert proc.proc.wait(timeout=20) == 0
    assert proc.stop() == 0
    assert duration > 0.02, f"the slow request took only {duration * 1000:.1f} ms: the test proves little"
