"""Executors for the exporter's parallel steps: a plain in-process map, or Ray tasks on a local or remote cluster.

Three steps run on an executor: embedding inference (the item table and the user vectors, in row chunks), the
per-shard index builds of the shard recall check (exporter.ann_index.build_shard) and the evaluation's case
chunks (exporter.evaluate.evaluate_chunk). Whichever executor runs a step, it calls the same module-level chunk
function on the same chunks, and chunk sizes never depend on the executor, so a Ray run equals a local run by
construction (tests/test_exporter_ray.py checks that it does). Example::

    with open_executor("local") as executor:        # or "ray://head:10001", "auto", None (in-process)
        item_emb = item_embeddings(executor, retriever)

Large read-only inputs go to ``map`` as keyword arguments: the Ray executor puts each in the object store
once per call and every task reads it from there. Models travel as ModelWeights (constructor arguments and
the state_dict as numpy arrays), not as pickled modules.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import faiss
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from exporter.ann_index import IndexPolicy, IndexSpec, ShardBuild, build_shard
from exporter.models import ItemTower, Ranker, TwoTower, UserTower

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
R = TypeVar("R")

# Fixed chunk sizes (never derived from the number of workers: results must not depend on the executor).
ITEM_CHUNK_ROWS = 65_536
USER_CHUNK_ROWS = 8_192  # a multiple of user_vectors' batch of 1024


class ExecutorError(RuntimeError):
    """The requested executor cannot run: Ray is not installed, or the cluster address does not answer."""


class Executor(Protocol):
    """Runs ``fn(chunk, **shared)`` for every chunk and returns the results in chunk order."""

    name: str

    def map(self, fn: Callable[..., R], chunks: Sequence[Any], **shared: Any) -> list[R]: ...


class LocalExecutor:
    """The chunks one after the other in this process (torch and FAISS still use their own threads)."""

    name = "local"

    def map(self, fn: Callable[..., R], chunks: Sequence[Any], **shared: Any) -> list[R]:
        return [fn(chunk, **shared) for chunk in chunks]


class RayExecutor:
    """One Ray task (1 CPU) per chunk; the shared keyword arguments are put in the object store once per map.

    address "local" starts a private single-machine cluster with one worker per CPU; anything else ("auto",
    "10.0.0.5:6379", "ray://head:10001") connects to a running cluster, shipping the exporter's own code to
    its workers (they need the `export` dependencies installed). If Ray is already initialised in this
    process (a test fixture, a Ray job), that session is used and left running.
    """

    def __init__(self, address: str = "local", runtime_env: dict[str, Any] | None = None) -> None:
        if not address or address != address.strip():
            raise ExecutorError(f"--ray must be 'local' or a Ray cluster address, got {address!r}")
        try:
            import ray
        except ImportError:
            raise ExecutorError("--ray needs the `ray` extra: pip install -e '.[export,ray]'") from None
        self._ray = ray
        self.name = f"ray:{address}"
        self.owns_session = not ray.is_initialized()
        if self.owns_session:
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address == "local":
                options.update(address="local", num_cpus=os.cpu_count() or 1)
            else:
                options.update(address=address, runtime_env=runtime_env or _code_runtime_env())
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
                raise ExecutorError(f"--ray {address}: cannot start or reach the Ray cluster ({exc})") from None
        self._tasks: dict[Callable[..., Any], Any] = {}

    def map(self, fn: Callable[..., R], chunks: Sequence[Any], **shared: Any) -> list[R]:
        ray = self._ray
        if fn not in self._tasks:
            self._tasks[fn] = ray.remote(num_cpus=1)(fn)
        refs = {name: ray.put(value) for name, value in shared.items()}
        # Top-level ObjectRef arguments are resolved by Ray before the task runs: fn sees plain values.
        return list(ray.get([self._tasks[fn].remote(chunk, **refs) for chunk in chunks]))

    def close(self) -> None:
        if self.owns_session and self._ray.is_initialized():
            self._ray.shutdown()


def _code_runtime_env() -> dict[str, Any]:
    """Ship this checkout's exporter and recsys_common packages to a remote cluster's workers."""
    import exporter
    import recsys_common

    return {"py_modules": [exporter, recsys_common]}


@contextlib.contextmanager
def open_executor(ray_address: str | None) -> Iterator[Executor]:
    """The in-process executor for None, else a RayExecutor (shut down on exit if it started Ray)."""
    if ray_address is None:
        yield LocalExecutor()
        return
    executor = RayExecutor(ray_address)
    try:
        yield executor
    finally:
        executor.close()


_CURRENT: ContextVar[Executor | None] = ContextVar("recsys_executor", default=None)


def current_executor() -> Executor:
    """The executor activated by the enclosing ``activate`` block, or the in-process one."""
    return _CURRENT.get() or LocalExecutor()


@contextlib.contextmanager
def activate(executor: Executor) -> Iterator[Executor]:
    """Make executor the one current_executor() returns inside the block (for steps called without one)."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)


# -- models as plain data ---------------------------------------------------------------------------------------


def _tensor(array: npt.NDArray[Any]) -> torch.Tensor:
    # Arrays read from Ray's object store are read-only; inference never writes to them, so share, don't copy.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


@dataclass(frozen=True)
class ModelWeights:
    """A torch module as plain data: its class, constructor arguments and state_dict as numpy arrays."""

    kind: str  # "ItemTower" | "UserTower" | "Ranker"
    init: dict[str, Any]
    state: dict[str, npt.NDArray[Any]]

    @classmethod
    def of(cls, module: nn.Module) -> ModelWeights:
        state = {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}
        if isinstance(module, ItemTower):
            n_plus_1, dim = state["emb.weight"].shape
            init: dict[str, Any] = {"n_items": n_plus_1 - 1, "dim": dim}
        elif isinstance(module, UserTower):
            blocks = list(module.blocks)
            init = {
                "dim": module.dim,
                "history_len": int(module.pos.shape[0]),
                "layers": len(blocks),
                "heads": blocks[0].heads if blocks else 1,
                "dropout": 0.0,
            }
        elif isinstance(module, Ranker):
            linears = [m for m in module.mlp if isinstance(m, nn.Linear)]
            init = {
                "n_items": int(module.emb.weight.shape[0] - 1),
                "dim": int(module.emb.weight.shape[1]),
                "history_len": int(module.recency.shape[0]),
                "n_dense": int(module.dense_mean.shape[0]),
                "cross_layers": len(module.cross),
                "hidden": tuple(m.out_features for m in linears[:-1]),
            }
        else:
            raise TypeError(f"ModelWeights.of: expected an ItemTower, UserTower or Ranker, got {type(module).__name__}")
        return cls(type(module).__name__, init, state)

    def module(self, rows: slice | None = None) -> nn.Module:
        """The module in eval mode; for an ItemTower, optionally only the table rows ``rows`` (as its own table)."""
        state, init = self.state, dict(self.init)
        if self.kind == "ItemTower":
            if rows is not None:
                state = {k: v[rows] if k in ("emb.weight", "genres", "row_mask") else v for k, v in state.items()}
                init["n_items"] = state["emb.weight"].shape[0] - 1
            genres = state.get("genres")
            init["genres"] = None if genres is None else torch.empty(genres.shape, device="meta")
        # Built on the meta device and then handed the real tensors: no random initialisation (which would also
        # advance torch's global generator) for weights that are about to be replaced.
        with torch.device("meta"):
            module: nn.Module = {"ItemTower": ItemTower, "UserTower": UserTower, "Ranker": Ranker}[self.kind](**init)
        module.load_state_dict({k: _tensor(v) for k, v in state.items()}, strict=True, assign=True)
        return module.eval()


# -- embedding inference ------------------------------------------------------------------------------------------


@torch.no_grad()
def user_vectors_of(user: UserTower, item_emb: F32, histories: I64, batch: int = 1024) -> F32:
    """(B, D) user vectors for right-aligned histories (B, L): exporter.train.user_vectors with the table given."""
    table = _tensor(item_emb)
    out = [user(table, _tensor(histories[s : s + batch]))[:, -1, :] for s in range(0, len(histories), batch)]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, item_emb.shape[1]), np.float32)


@torch.no_grad()
def _item_rows(rows: tuple[int, int], items: ModelWeights) -> F32:
    return items.module(slice(*rows))().numpy().astype(np.float32)


def _user_rows(histories: I64, user: ModelWeights, item_emb: F32) -> F32:
    module = user.module()
    assert isinstance(module, UserTower)
    return user_vectors_of(module, item_emb, histories)


def item_embeddings(executor: Executor, model: TwoTower, chunk_rows: int = ITEM_CHUNK_ROWS) -> F32:
    """(n + 1, D) float32 item table of the retriever (row 0 zeros), computed in row chunks on executor."""
    weights = ModelWeights.of(model.items)
    n_rows = weights.state["emb.weight"].shape[0]
    bounds = [(lo, min(lo + chunk_rows, n_rows)) for lo in range(0, n_rows, chunk_rows)]
    return np.concatenate(executor.map(_item_rows, bounds, items=weights))


def user_embeddings(
    executor: Executor, model: TwoTower, item_emb: F32, histories: I64, chunk_rows: int = USER_CHUNK_ROWS
) -> F32:
    """(B, D) float32 user vectors (the user tower's last state) for histories (B, L), in row chunks on executor."""
    if len(histories) == 0:
        return np.zeros((0, item_emb.shape[1]), np.float32)
    chunks = [histories[s : s + chunk_rows] for s in range(0, len(histories), chunk_rows)]
    return np.concatenate(executor.map(_user_rows, chunks, user=ModelWeights.of(model.user), item_emb=item_emb))


# -- per-shard index builds ---------------------------------------------------------------------------------------


def shard_builds(
    executor: Executor,
    index: faiss.Index,
    entry: dict[str, Any],
    item_emb: F32,
    user_vecs: F32,
    count: int,
    policy: IndexPolicy,
) -> list[ShardBuild]:
    """Each of ``count`` retrieval shards of the bundle index (manifest entry ``entry``) built and checked as a task.

    The bundle keeps one items.faiss (retrieval_svc cuts its shard at load time); these builds show that every
    shard served that way clears the recall floor on the same held-out user vectors as the whole index.
    """
    n_items = item_emb.shape[0] - 1
    if not 1 <= count <= n_items:
        raise ValueError(f"index_shards must be between 1 and the number of items ({n_items}), got {count}")
    spec = IndexSpec(str(entry["type"]), str(entry["factory"]), dict(entry.get("params", {})))
    full = faiss.serialize_index(index) if spec.type == "IVF" else None
    queries = np.ascontiguousarray(user_vecs[: policy.max_queries], dtype=np.float32)
    return executor.map(
        build_shard, range(count), count=count, item_emb=item_emb, spec=spec, queries=queries, k=policy.k, full=full
    )
