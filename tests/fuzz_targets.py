"""Fuzz targets shared by tests/test_fuzz_parsers.py (a short hypothesis run) and bench/fuzz.py (the long run).

Three parsers see input from outside the process, and each has one rule:

- manifest: open_bundle on damaged bundles (random or mutated manifest bytes, random JSON spliced into a
  real manifest, random signature files, an artifact replaced by random bytes with its checksum re-pinned)
  raises only RecsysError subclasses, and never accepts a bundle whose signature does not verify.
- rest: POST /v1/events and /v1/recommendations with random JSON (or random bytes) never answer 5xx.
- grpc: the Retrieval, Ranking and Gateway servicer methods, given random messages built field by field
  from their descriptors or random bytes parsed with FromString, never end in INTERNAL or UNKNOWN.

FuzzEnv builds the real things once: a tiny bundle, retrieval and ranking gRPC servers in this process on
loopback, the gateway's Recommender over them with an embedded store, its FastAPI app and its servicers.
make_targets(env) returns hypothesis tests; each can run as a test (`target()`) or take a fuzzer's bytes
(`target.hypothesis.fuzz_one_input(buffer)`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, example, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from gateway.config import GatewayConfig
from gateway.rest import create_app
from gateway.server import build_recommender
from gateway.servicer import GatewayServicer
from protos.recsys.v1 import common_pb2, gateway_pb2, ranking_pb2, retrieval_pb2
from ranking_svc.config import RankingConfig
from ranking_svc.server import build as build_ranking
from ranking_svc.servicer import RankingServicer
from recsys_common.bundle import MANIFEST, open_bundle
from recsys_common.errors import RecsysError
from recsys_common.signing import SIGNATURE, BundleTrust, generate_key, public_key_pem, sign_manifest
from recsys_common.snapshot import SnapshotHolder
from retrieval_svc.config import RetrievalConfig
from retrieval_svc.server import build as build_retrieval
from retrieval_svc.servicer import RetrievalServicer, RuntimeUnavailable
from tests.bundle_factory import make_bundle

N_ITEMS = 40
ITEM_IDS = [f"i{i:03d}" for i in range(1, N_ITEMS + 1)]
# derandomize: a CI run draws the same inputs every time (a failure reproduces; the reached outcomes are stable).
FUZZ_SETTINGS = settings(
    deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True, derandomize=True
)


class FuzzFailure(AssertionError):
    """A target broke its rule; the message says which input and what happened."""


# -- the environment ---------------------------------------------------------------------------------------
class FuzzEnv:
    """The real services of one process, over a tiny bundle. close() stops them and removes the files."""

    def __init__(self) -> None:
        # On tmpfs when there is one: every manifest input rewrites files, and every event is a store write.
        shm = Path("/dev/shm")
        self._tmp = tempfile.TemporaryDirectory(prefix="recsys-fuzz-", dir=shm if shm.is_dir() else None)
        root = Path(self._tmp.name)
        self.bundles = root / "bundles"
        self.version = make_bundle(self.bundles, n_items=N_ITEMS)
        self.key = generate_key()
        (root / "public.pem").write_bytes(public_key_pem(self.key))
        self.trusts = {
            "none": None,
            "dev": BundleTrust(root / "public.pem", required=False),
            "production": BundleTrust(root / "public.pem", required=True),
        }
        # A scratch bundles dir whose one version the manifest target rewrites for every input.
        self.scratch = root / "scratch"
        self.scratch_version = self.version
        shutil.copytree(self.bundles / self.version, self.scratch / self.version)
        self.pristine = {p.name: p.read_bytes() for p in (self.scratch / self.version).iterdir()}
        self.dirty: set[str] = set()  # scratch files the last manifest input replaced
        self.manifest = json.loads(self.pristine[MANIFEST])

        rconf = RetrievalConfig(bundles_dir=self.bundles, port=0, poll_interval_s=0, max_workers=4)
        self.retrieval_server, rport, _, holder = build_retrieval(rconf)
        holder.load_current()
        self.retrieval_server.start()
        runtime = RuntimeUnavailable()
        self.retrieval = RetrievalServicer(holder, rconf.max_batch, rconf.max_batch_items, runtime)
        kconf = RankingConfig(bundles_dir=self.bundles, port=0, poll_interval_s=0)
        self.ranking_server, kport, _ = build_ranking(kconf)
        self.ranking_server.start()
        ranking_holder = SnapshotHolder(self.bundles, _ranker(kconf), poll_interval_s=0)
        ranking_holder.load_current()
        self.ranking = RankingServicer(ranking_holder)
        gconf = GatewayConfig(
            bundles_dir=self.bundles,
            state=str(root / "state"),
            retrieval_addr=f"127.0.0.1:{rport}",
            ranking_addr=f"127.0.0.1:{kport}",
            poll_interval_s=0,
            default_timeout_ms=1000,
        )
        self.recommender = build_recommender(gconf)
        self.gateway = GatewayServicer(self.recommender)
        self.app = create_app(self.recommender)
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(
            # A crash is then a 500 answer (what a client would see), not an exception in the caller.
            transport=httpx.ASGITransport(app=self.app, client=("127.0.0.1", 5555), raise_app_exceptions=False),
            base_url="http://gateway",
        )

    def on_core(self, method: Callable[[Any, Any], Coroutine[Any, Any, Any]]) -> Callable[[Any, Any], Any]:
        """A grpc.aio servicer method as a plain call, run on the gateway's core loop as the server runs it."""
        return lambda request, context: self.recommender.core.run(method(request, context))

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.http.request(method, path, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()
        self.recommender.close()
        self.retrieval_server.stop(0).wait()
        self.ranking_server.stop(0).wait()
        self._tmp.cleanup()


def _ranker(config: RankingConfig) -> Callable[[Any], Any]:
    from ranking_svc.core import Ranker

    return lambda bundle: Ranker(bundle, threads=1, max_candidates=config.max_candidates)


# -- strategies ------------------------------------------------------------------------------------------
def json_values(max_leaves: int = 20) -> SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.sampled_from(ITEM_IDS + ["", "u1", "../x", "\x00", "manifest.json"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
        max_leaves=max_leaves,
    )


def ids() -> SearchStrategy[str]:
    return st.one_of(st.sampled_from(ITEM_IDS), st.text(max_size=40), st.just(""), st.text(min_size=200, max_size=300))


# Built once: a strategy made inside a composite is rebuilt (and re-validated) on every draw.
JSON = json_values()
JSON_SMALL = json_values(3)


def _scalar(field: FieldDescriptor) -> SearchStrategy[Any]:
    t = field.type
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-5, 60))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-5, 2_000_000_000))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return ids()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise TypeError(f"no strategy for field {field.full_name} of type {t}")


# Plausible values by field name (any message): the generic strategies alone rarely make a valid request.
HINTS: dict[str, SearchStrategy[Any]] = {
    "bundle_version": st.just(""),
    "k": st.integers(1, 50),
    "timestamp": st.integers(1, 2**31),
    "user_id": st.sampled_from(["u1", "u2", "u3"]),
    "item_id": st.sampled_from(ITEM_IDS),
    "item_ids": st.sampled_from(ITEM_IDS),
    "recent_item_ids": st.sampled_from(ITEM_IDS),
    "exclude_item_ids": st.sampled_from(ITEM_IDS),
    "timeout_ms": st.integers(50, 1000),
}


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def messages(descriptor: Descriptor, cls: type[pb_message.Message], depth: int = 0) -> SearchStrategy[Any]:
    """Messages of cls with a random subset of fields set to random values (nested up to 3 deep)."""
    fields: dict[str, SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value = st.dictionaries(st.text(max_size=10), st.floats(width=32), max_size=5)
            elif depth >= 3:
                continue
            else:
                sub = _message_class(field)
                value = messages(field.message_type, sub, depth + 1)
                if _is_repeated(field):
                    value = st.one_of(st.lists(value, min_size=1, max_size=3), st.lists(value, max_size=4))
        else:
            value = _scalar(field)
            if field.name in HINTS:  # mostly (3 to 1) a plausible value, so inputs also get past validation
                value = st.one_of(HINTS[field.name], HINTS[field.name], HINTS[field.name], value)
            value = st.lists(value, max_size=30) if _is_repeated(field) else value
        fields[field.name] = value

    # Mostly every field set, in a random order (the last of a oneof wins), else a random subset.
    names = sorted(fields)
    every = st.permutations(names)
    subsets = st.one_of(every, every, every, st.lists(st.sampled_from(names), unique=True)) if names else st.just([])

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        msg = cls()
        for name in draw(subsets):
            value = draw(fields[name])
            field = descriptor.fields_by_name[name]
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                getattr(msg, name).update(value)
            elif _is_repeated(field):
                getattr(msg, name).extend(value)
            elif field.message_type is not None:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return build()


def _message_class(field: FieldDescriptor) -> type[pb_message.Message]:
    return message_factory.GetMessageClass(field.message_type)


# -- outcomes ------------------------------------------------------------------------------------------
class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class FakeContext:
    """The parts of grpc.ServicerContext the servicers use; abort raises, as grpc's does."""

    def __init__(self, time_remaining_s: float) -> None:
        self._remaining = time_remaining_s
        self.trailing: tuple[tuple[str, str], ...] = ()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def time_remaining(self) -> float:
        return self._remaining

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    def is_active(self) -> bool:
        return True


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request: type[pb_message.Message]
    call: Callable[[Any, Any], Any]


def grpc_methods(env: FuzzEnv) -> list[Method]:
    return [
        Method("Retrieval", "Search", retrieval_pb2.SearchRequest, env.retrieval.Search),
        Method("Retrieval", "BatchSearch", retrieval_pb2.BatchSearchRequest, env.retrieval.BatchSearch),
        Method("Retrieval", "SetUnavailable", retrieval_pb2.SetUnavailableRequest, env.retrieval.SetUnavailable),
        Method("Ranking", "Rank", ranking_pb2.RankRequest, env.ranking.Rank),
        Method("Gateway", "Recommend", gateway_pb2.RecommendRequest, env.on_core(env.gateway.Recommend)),
        Method("Gateway", "Track", gateway_pb2.TrackRequest, env.on_core(env.gateway.Track)),
        Method("Gateway", "ForgetUser", gateway_pb2.ForgetUserRequest, env.on_core(env.gateway.ForgetUser)),
    ]


def check_grpc(method: Method, request: Any, time_remaining_s: float) -> str:
    """Call the servicer method; the outcome ("OK" or the status name), or FuzzFailure."""
    context = FakeContext(time_remaining_s)
    try:
        method.call(request, context)
    except Aborted as err:
        if err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            raise FuzzFailure(f"{method.service}.{method.name}({request!r:.300}) -> {err}") from None
        return err.code.name
    except Exception as exc:  # escaping the servicer: grpc would answer UNKNOWN
        raise FuzzFailure(f"{method.service}.{method.name}({request!r:.300}) raised {exc!r}") from exc
    return "OK"


def check_rest(env: FuzzEnv, path: str, body: Any, raw: bytes | None = None) -> int:
    if raw is None:
        # Encoded here, not by httpx: allow_nan lets NaN and Infinity through, which Python's json.loads reads.
        raw = json.dumps(body, allow_nan=True).encode()
    reply = env.request("POST", path, content=raw, headers={"content-type": "application/json"})
    if reply.status_code >= 500:
        sent = raw if body is None else body
        raise FuzzFailure(f"POST {path} {sent!r:.500} -> {reply.status_code} {reply.text:.300}")
    return reply.status_code


def check_manifest(env: FuzzEnv, manifest: bytes, signature: bytes | None, swap: tuple[str, bytes] | None,
                   trust: str) -> str:  # fmt: skip
    """Write the inputs over the scratch version, open it; the outcome, or FuzzFailure."""
    folder = env.scratch / env.scratch_version
    for name in env.dirty - ({swap[0]} if swap else set()):
        (folder / name).write_bytes(env.pristine[name])
    env.dirty = set()
    if swap is not None:
        (folder / swap[0]).write_bytes(swap[1])
        env.dirty = {swap[0]}
    (folder / MANIFEST).write_bytes(manifest)
    if signature is None:
        (folder / SIGNATURE).unlink(missing_ok=True)
    else:
        (folder / SIGNATURE).write_bytes(signature)
    policy = env.trusts[trust]
    try:
        bundle = open_bundle(env.scratch, env.scratch_version, trust=policy)
    except RecsysError as err:
        return type(err).__name__
    except Exception as exc:
        raise FuzzFailure(f"open_bundle raised {exc!r} on manifest {manifest[:300]!r}") from exc
    if policy is not None and signature is not None and bundle.signed_by is None:
        raise FuzzFailure("a signed bundle was accepted without its signature being checked")
    if policy is not None and policy.required and _signature_bytes(signature) != env.key.sign(manifest):
        # Ed25519 signatures are deterministic: any other signature bytes that verified would be a forgery.
        raise FuzzFailure(f"production accepted a signature the key did not make: {signature!r:.200}")
    return "accepted"


def _signature_bytes(signature: bytes | None) -> bytes:
    try:
        return base64.b64decode(json.loads(signature or b"")["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        return repr(exc).encode()


# -- manifest inputs ---------------------------------------------------------------------------------------
def _set_path(doc: Any, path: list[str], value: Any) -> Any:
    if not path or not isinstance(doc, dict):
        return value
    head, *rest = path
    return {**doc, head: _set_path(doc.get(head, {}), rest, value)}


KNOWN_PATHS = [
    ["format_version"], ["version"], ["files"], ["embedding"], ["embedding", "dim"], ["index"], ["index", "ntotal"],
    ["models"], ["models", "user_tower"], ["models", "user_tower", "outputs"], ["models", "ranker"], ["history_len"],
    ["files", "items.json"], ["files", "items.faiss", "bytes"], ["files", "user_tower.onnx", "sha256"],
]  # fmt: skip


def manifest_inputs(env: FuzzEnv) -> SearchStrategy[tuple[bytes, bytes | None, tuple[str, bytes] | None, str]]:
    """(manifest bytes, manifest.sig bytes or None, an artifact replaced (name, bytes) or None, trust policy)."""
    doc = env.manifest
    listed = sorted(doc["files"])
    byte = st.integers(0, 255)
    known = st.sampled_from(KNOWN_PATHS)
    paths = st.one_of(known, known, known, st.lists(st.text(max_size=8), min_size=1, max_size=3))
    odd_names = [*listed, MANIFEST, SIGNATURE, "..", "a/b", "x" * 300]
    names = st.one_of(st.sampled_from(odd_names), st.text(min_size=1, max_size=30))
    metas = st.one_of(JSON_SMALL, st.fixed_dictionaries({"sha256": st.text(max_size=64), "bytes": st.integers()}))
    tables = st.dictionaries(names, metas, max_size=4)
    mutations = st.lists(st.tuples(st.integers(0, 1 << 16), st.sampled_from(["flip", "delete", "insert"]), byte,
                                   st.binary(min_size=1, max_size=8)), min_size=1, max_size=8)  # fmt: skip
    artifacts = st.tuples(st.sampled_from(listed), st.binary(max_size=300), st.integers(0, 1 << 20), st.booleans(),
                          st.binary(min_size=1, max_size=16))  # fmt: skip
    kinds = st.sampled_from(["random bytes", "byte mutation", "splice", "splice", "splice", "files table", "artifact"])
    signatures = st.tuples(st.sampled_from(["good", "none", "random", "mutated"]), st.binary(max_size=200),
                           st.integers(0, 1 << 10), byte)  # fmt: skip

    @st.composite
    def build(draw: st.DrawFn) -> tuple[bytes, bytes | None, tuple[str, bytes] | None, str]:
        swap = None
        kind = draw(kinds)
        if kind == "random bytes":
            raw = draw(st.binary(max_size=400))
        elif kind == "byte mutation":
            buf = bytearray(env.pristine[MANIFEST])
            for pos, op, value, chunk in draw(mutations):
                pos %= len(buf)
                if op == "flip":
                    buf[pos] = value
                elif op == "delete":
                    del buf[pos]
                else:
                    buf[pos:pos] = chunk
            raw = bytes(buf)
        elif kind == "splice":
            raw = json.dumps(_set_path(doc, draw(paths), draw(JSON))).encode()
        elif kind == "files table":
            files = dict(doc["files"]) if draw(st.booleans()) else {}
            files.update(draw(tables))
            raw = json.dumps({**doc, "files": files}).encode()
        else:  # an artifact replaced by random or truncated bytes, its checksum re-pinned: the header parsers see it
            name, noise, cut, insert, chunk = draw(artifacts)
            original = env.pristine[name]
            data = noise if draw(st.booleans()) else original[: cut % (len(original) + 1)]
            if insert and len(data) > 4:
                data = data[:4] + chunk + data[4:]
            swap = (name, data)
            files = {**doc["files"], name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
            raw = json.dumps({**doc, "files": files}).encode()
        trust = draw(st.sampled_from(TRUSTS))
        sig_kind, noise, pos, value = draw(signatures)
        signature: bytes | None = None
        if sig_kind == "good":
            signature = sign_manifest(raw, env.key)
        elif sig_kind == "random":
            signature = noise
        elif sig_kind == "mutated":
            good = bytearray(sign_manifest(raw, env.key))
            good[pos % len(good)] = value
            signature = bytes(good)
        return raw, signature, swap, trust

    return build()


TRUSTS = ["none", "dev", "production"]


# -- REST inputs -------------------------------------------------------------------------------------------
def event_objects() -> SearchStrategy[Any]:
    event = st.fixed_dictionaries(
        {},
        optional={
            "user_id": st.one_of(ids(), JSON_SMALL),
            "item_id": st.one_of(ids(), JSON_SMALL),
            "timestamp": st.one_of(st.integers(-5, 2**40), st.floats(), st.text(max_size=12), JSON_SMALL),
            "event_id": st.one_of(st.none(), ids(), JSON_SMALL),
            "type": st.one_of(st.none(), st.text(max_size=80), JSON_SMALL),
        },
    )
    valid = st.fixed_dictionaries(
        {
            "user_id": st.one_of(st.sampled_from(["u1", "u2", "u3"]), st.text(min_size=1, max_size=20)),
            "item_id": st.one_of(st.sampled_from(ITEM_IDS), st.text(min_size=1, max_size=20)),
            "timestamp": st.integers(0, 2**31),
        },
        optional={"event_id": st.text(min_size=1, max_size=20), "type": st.sampled_from(["click", "view"])},
    )
    return st.one_of(
        st.fixed_dictionaries({"events": st.lists(valid, min_size=1, max_size=4)}),
        st.fixed_dictionaries({"events": st.lists(st.one_of(valid, event, JSON_SMALL), max_size=6)}),
        JSON,
    )


def recommendation_objects() -> SearchStrategy[Any]:
    body = st.fixed_dictionaries(
        {},
        optional={
            "user_id": st.one_of(ids(), JSON_SMALL),
            "k": st.one_of(st.integers(-5, 20_000), st.floats(), st.text(max_size=5), JSON_SMALL),
            "exclude_seen": st.one_of(st.booleans(), JSON_SMALL),
            "timeout_ms": st.one_of(st.none(), st.integers(-5, 5000), st.floats(), JSON_SMALL),
            "exclude_item_ids": st.one_of(st.lists(ids(), max_size=10), JSON_SMALL),
            "max_per_genre": st.one_of(st.none(), st.integers(-5, 500), JSON_SMALL),
            "debug": st.one_of(st.booleans(), JSON_SMALL),
        },
    )
    valid = st.fixed_dictionaries(
        {"user_id": st.sampled_from(["u1", "u2", "u3", "new-user"])},
        optional={
            "k": st.integers(1, 50),
            "exclude_seen": st.booleans(),
            "timeout_ms": st.integers(1, 2000),
            "exclude_item_ids": st.lists(st.sampled_from(ITEM_IDS), max_size=10),
            "max_per_genre": st.integers(1, 10),
            "debug": st.booleans(),
        },
    )
    return st.one_of(valid, body, JSON)


# -- the targets -------------------------------------------------------------------------------------------
def make_targets(
    env: FuzzEnv, max_examples: dict[str, int] | None = None, outcomes: Counter[tuple[str, str]] | None = None
) -> dict[str, Any]:
    """name -> a hypothesis test (no arguments) that raises FuzzFailure when its rule is broken.

    max_examples: per target, for a run as a test (fuzz_one_input ignores it). outcomes, when given, counts
    (target, outcome) for every input run: how deep the inputs went (accepted, refused, status codes).
    """
    from hypothesis import given

    seen: Counter[tuple[str, str]] = outcomes if outcomes is not None else Counter()

    def fuzz_settings(name: str) -> settings:
        return settings(FUZZ_SETTINGS, max_examples=(max_examples or {}).get(name, 100))

    @fuzz_settings("manifest")
    @given(manifest_inputs(env))
    def manifest(case: tuple[bytes, bytes | None, tuple[str, bytes] | None, str]) -> None:
        seen["manifest", check_manifest(env, *case)] += 1

    @fuzz_settings("rest_events")
    @given(st.one_of(event_objects(), st.binary(max_size=300)))
    def rest_events(body: Any) -> None:
        raw = body if isinstance(body, bytes) else None
        seen["rest_events", str(check_rest(env, "/v1/events", None if raw is not None else body, raw))] += 1

    @fuzz_settings("rest_recommendations")
    @given(st.one_of(recommendation_objects(), st.binary(max_size=300)))
    def rest_recommendations(body: Any) -> None:
        raw = body if isinstance(body, bytes) else None
        status = check_rest(env, "/v1/recommendations", None if raw is not None else body, raw)
        seen["rest_recommendations", str(status)] += 1

    methods = grpc_methods(env)
    requests = st.one_of(
        [
            st.tuples(
                st.just(m),
                st.one_of(
                    messages(m.request.DESCRIPTOR, m.request),
                    st.binary(max_size=200).map(lambda b, m=m: _from_bytes(m, b)),
                ),
                st.one_of(st.just(1.0), st.floats(0.0, 1.0)),
            )
            for m in methods
        ]
    )

    by_name = {m.name: m for m in methods}
    context = common_pb2.UserContext(recent_item_ids=list(ITEM_IDS[:3]))
    event = common_pb2.Event(user_id="u1", item_id=ITEM_IDS[0], timestamp=1000)

    # One well-formed request per main method always runs first, whatever the random draws of this checkout
    # reach: the normal path is part of what must never fail.
    @example((by_name["Search"], retrieval_pb2.SearchRequest(context=context, k=5), 1.0))
    @example((by_name["Recommend"], gateway_pb2.RecommendRequest(user_id="u1", k=5), 1.0))
    @example((by_name["Track"], gateway_pb2.TrackRequest(events=[event]), 1.0))
    @fuzz_settings("grpc_handlers")
    @given(requests)
    def grpc_handlers(case: tuple[Method, Any, float]) -> None:
        method, request, remaining = case
        outcome = check_grpc(method, request, remaining) if request is not None else "undecodable"
        seen["grpc_handlers", f"{method.name} {outcome}"] += 1

    return {
        "manifest": manifest,
        "rest_events": rest_events,
        "rest_recommendations": rest_recommendations,
        "grpc_handlers": grpc_handlers,
    }


def _from_bytes(method: Method, data: bytes) -> Any:
    """The request grpc would hand the servicer for these bytes; None when they do not parse (grpc then fails
    the call while deserializing, before any servicer runs)."""
    try:
        return method.request.FromString(data)
    except pb_message.DecodeError:
        return None
