"""End to end: export a bundle from synthetic data with the real exporter (CLI), serve it as three
processes on free loopback ports, and check what a user of the stack relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from exporter.synth import SynthInfo, generate
from protos.recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from recsys_cli.stack import Stack
from recsys_common.bundle import open_bundle

# Small and quick, but the same code paths as a real export.
FAST_EXPORT = {
    "tt_dim": 32,
    "tt_epochs": 15,
    "ranker_epochs": 2,
    "eval_protocols": ["loo"],
    "parity_rows": 200,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthInfo]:
    work = tmp_path_factory.mktemp("e2e")
    info = generate(work / "data", n_users=300, n_items=120, n_clusters=6, events_per_user=(15, 40), seed=7)
    config = work / "export.json"
    config.write_text(json.dumps(FAST_EXPORT))
    subprocess.run(
        [sys.executable, "-m", "recsys_cli.main", "export", "--data", str(work / "data"), "--out",
         str(work / "bundles"), "--config", str(config), "--quiet"],
        check=True, timeout=600,
    )  # fmt: skip
    return work / "bundles", info


@pytest.fixture(scope="module")
def stack(exported: tuple[Path, SynthInfo], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(exported[0], tmp_path_factory.mktemp("state"), http_port=0, grpc_port=0) as s:
        yield s


def recommend(url: str, user: str, k: int = 10) -> list[str]:
    reply = httpx.post(f"{url}/v1/recommendations", json={"user_id": user, "k": k}, timeout=10)
    assert reply.status_code == 200, reply.text
    return [i["item_id"] for i in reply.json()["items"]]


def post_events(url: str, user: str, items: list[str], start: int = 1_800_000_000) -> int:
    body = {
        "events": [
            {"user_id": user, "item_id": i, "timestamp": start + n, "event_id": f"{user}/{i}"}
            for n, i in enumerate(items)
        ]
    }
    reply = httpx.post(f"{url}/v1/events", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    return int(reply.json()["accepted"])


def test_export_publishes_a_complete_verified_bundle(exported: tuple[Path, SynthInfo]) -> None:
    bundle = open_bundle(exported[0])
    m = bundle.manifest
    assert {"items.json", "item_emb.npy", "items.faiss", "user_tower.onnx", "ranker.onnx"} <= set(m["files"])
    assert m["embedding"] == {"dim": 32, "metric": "inner_product"}
    assert m["data"]["n_items"] == 120 and len(m["data"]["fingerprint"]) == 64
    loo = m["evaluation"]["loo"]
    assert set(loo) >= {"most_pop", "two_tower", "two_tower+ranker"}, loo
    # Planted structure is learnable: the project beats popularity on held-out items.
    assert loo["two_tower+ranker"]["hr"] > loo["most_pop"]["hr"], loo


def test_new_user_is_pulled_toward_related_items(stack: Stack, exported: tuple[Path, SynthInfo]) -> None:
    info = exported[1]
    url = stack.http_url
    for cluster in range(3):
        members = [i for i, c in info.item_cluster.items() if c == cluster]
        user = f"newcomer-{cluster}"
        cold = recommend(url, user)
        assert len(cold) == 10
        assert post_events(url, user, members[:5]) == 5
        warm = recommend(url, user)
        in_cluster = sum(info.item_cluster[i] == cluster for i in warm)
        assert in_cluster >= 6, f"cluster {cluster}: only {in_cluster}/10 related items after 5 clicks: {warm}"
        assert in_cluster > sum(info.item_cluster[i] == cluster for i in cold)
        assert not set(warm) & set(members[:5])


def test_rest_and_grpc_give_the_same_answer(stack: Stack, exported: tuple[Path, SynthInfo]) -> None:
    user = exported[1].user_ids[0]
    items = [i for i, c in exported[1].item_cluster.items() if c == 4][:3]
    with grpc.insecure_channel(stack.grpc_addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        events = [common_pb2.Event(user_id=user, item_id=i, timestamp=10 + n) for n, i in enumerate(items)]
        assert stub.Track(gateway_pb2.TrackRequest(events=events), timeout=5).accepted == 3
        reply = stub.Recommend(gateway_pb2.RecommendRequest(user_id=user, k=10), timeout=5)
    assert [i.item_id for i in reply.items] == recommend(stack.http_url, user)
    assert reply.bundle_version == open_bundle(exported[0]).version


def test_event_ids_are_idempotent(stack: Stack, exported: tuple[Path, SynthInfo]) -> None:
    items = list(exported[1].item_ids[:4])
    assert post_events(stack.http_url, "repeat-user", items) == 4
    assert post_events(stack.http_url, "repeat-user", items) == 0
    assert post_events(stack.http_url, "repeat-user", items[:2] + list(exported[1].item_ids[4:5])) == 1


def test_events_persist_across_a_gateway_restart(exported: tuple[Path, SynthInfo], tmp_path: Path) -> None:
    info = exported[1]
    members = [i for i, c in info.item_cluster.items() if c == 2][:5]
    with Stack(exported[0], tmp_path, http_port=0, grpc_port=0) as s:
        assert post_events(s.http_url, "persistent", members) == 5
        before = recommend(s.http_url, "persistent")
    with Stack(exported[0], tmp_path, http_port=0, grpc_port=0) as s:
        after = recommend(s.http_url, "persistent")
        assert post_events(s.http_url, "persistent", members) == 0
    assert after == before and not set(after) & set(members)


def test_the_main_job_command_runs_on_a_machine_with_no_data(tmp_path: Path) -> None:
    """`recsys demo` makes its own data, exports, serves, shows an answer and how to query it."""
    config = tmp_path / "export.json"
    config.write_text(json.dumps({**FAST_EXPORT, "eval_protocols": []}))
    data = tmp_path / "data"
    generate(data, n_users=200, n_items=100, n_clusters=5, events_per_user=(10, 30), seed=3)
    run = subprocess.run(
        [sys.executable, "-m", "recsys_cli.main", "demo", "--workdir", str(tmp_path / "work"), "--data", str(data),
         "--port", "0", "--exit", "--config", str(config)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "their next recommendations:" in run.stdout and '"items": [' in run.stdout
    assert "curl -s http://127.0.0.1:" in run.stdout and "/v1/recommendations" in run.stdout
    page = run.stdout.split("Or open ")[1].split()[0]  # the command's last line: the try-it page
    assert page.startswith("http://127.0.0.1:") and page.endswith("/")
