"""Hot swap under load, as a real process: 10 new bundles, zero failed requests, one version per answer, flat RSS."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np

from protos.recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from recsys_common.bundle import open_bundle
from recsys_common.snapshot import SnapshotHolder
from tests.bundle_factory import item_embeddings, make_bundle
from tests.test_bundle import DAMAGES
from tests.test_retrieval_server import CLIENT_OPTIONS, RetrievalProcess, point_current

N_ITEMS, DIM, SWAPS = 20_000, 32, 10


def test_ten_swaps_under_load(tmp_path: Path) -> None:
    embs = {make_bundle(tmp_path, n_items=N_ITEMS, dim=DIM, seed=0): item_embeddings(N_ITEMS, 0, DIM)}
    proc = RetrievalProcess(tmp_path, poll_interval_s=0.05)
    stop = threading.Event()
    answers: list[tuple[str, str, float, np.ndarray | None]] = []  # (version, first item, its score, query)
    failures: list[str] = []
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(64, DIM)).astype(np.float32)

    def load(worker: int) -> None:
        with grpc.insecure_channel(proc.address, options=CLIENT_OPTIONS) as channel:
            stub = retrieval_pb2_grpc.RetrievalStub(channel)
            n = 0
            while not stop.is_set():
                n += 1
                vec = vectors[n % len(vectors)] if worker % 2 else None
                if vec is not None:
                    request = retrieval_pb2.SearchRequest(vector=retrieval_pb2.Vector(values=vec.tolist()), k=20)
                else:
                    history = [f"i{(n * 7 + j) % N_ITEMS + 1:03d}" for j in range(5)]
                    ctx = common_pb2.UserContext(recent_item_ids=history)
                    request = retrieval_pb2.SearchRequest(context=ctx, k=20, exclude_context=True)
                try:
                    reply = stub.Search(request, timeout=5)
                except grpc.RpcError as err:
                    failures.append(f"{err.code()}: {err.details()}")
                    continue
                if len(reply.items) != 20 or not reply.bundle_version:
                    failures.append(f"short or unversioned answer: {reply}")
                answers.append((reply.bundle_version, reply.items[0].item_id, reply.items[0].score, vec))

    workers = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    for w in workers:
        w.start()
    rss_kib = []
    try:
        for seed in range(1, SWAPS + 1):
            version = make_bundle(tmp_path, n_items=N_ITEMS, dim=DIM, seed=seed)
            embs[version] = item_embeddings(N_ITEMS, seed, DIM)
            proc.wait_log(f"now serving bundle {version}", timeout_s=30)
            time.sleep(0.3)  # let requests on the previous snapshot finish, and run against the new one
            rss_kib.append(proc.rss_kib())
    finally:
        stop.set()
        for w in workers:
            w.join()
        code = proc.stop()
    assert code == 0
    assert failures == [], failures[:5]
    seen = {v for v, *_ in answers}
    assert len(answers) > 200 and len(seen) >= SWAPS, (len(answers), len(seen))
    assert seen <= set(embs)
    # One snapshot per request: every score is exactly the one its named version gives.
    for version, item, score, vec in answers:
        if vec is not None:
            assert abs(float(embs[version][int(item[1:])] @ vec) - score) < 1e-4
    growth = rss_kib[-1] / rss_kib[0]
    print(f"RSS after swap 1: {rss_kib[0] / 1024:.1f} MiB, after swap {SWAPS}: {rss_kib[-1] / 1024:.1f} MiB "
          f"({(growth - 1) * 100:+.1f} %), {len(answers)} answers, 0 failures")  # fmt: skip
    assert growth <= 1.10, rss_kib


def test_holder_refuses_each_damage_before_loading(tmp_path: Path) -> None:
    """The generic holder never calls the loader on a damaged bundle and keeps the old snapshot."""
    good = make_bundle(tmp_path)
    loaded: list[str] = []

    def loader(bundle: object) -> str:
        loaded.append(bundle.version)  # type: ignore[attr-defined]
        return bundle.version  # type: ignore[attr-defined]

    holder: SnapshotHolder[str] = SnapshotHolder(tmp_path, loader, poll_interval_s=0)
    assert holder.load_current() and holder.get() == good
    for case, (damage, message) in DAMAGES.items():
        version = make_bundle(tmp_path, seed=3, make_current=False)
        damage(tmp_path / version)
        point_current(tmp_path, version)
        assert not holder.load_current(raise_errors=False), case
        assert message in holder.refused[version]
        assert holder.get() == good and loaded == [good]
        assert not holder.load_current(raise_errors=False)  # refused once, not re-verified every poll
    point_current(tmp_path, good)
    fresh = make_bundle(tmp_path, seed=4)
    assert holder.load_current(raise_errors=False) and holder.get() == fresh == open_bundle(tmp_path).version
