"""Micro-batching of the calls to retrieval and ranking: the calls the core loop makes in one turn go out as one.

Nothing waits for a batch to fill. The first call of a loop turn schedules the flush with ``loop.call_soon``,
so with no load a request's call leaves at the end of the turn that made it, as a plain call (Search, Rank).
Under load the loop finds several requests ready in one turn; their calls then share one batched call
(BatchSearch, BatchRank), and its fixed cost (~0.5 ms of server CPU per call here, ~0.3 ms of the gateway's)
is paid once. Batches grow with the load by themselves and stay at one when there is none.

With max_in_flight, no new call leaves while that many are out: new calls wait and leave together when one
comes back (self-clocking, as TCP's Nagle does with segments). Under load that makes the batches several times
larger for the price of a wait shorter than one call; below the limit nothing waits.

Each caller keeps its own deadline: a batch is sent with the longest timeout among its members and each member
stops waiting at its own (TimeoutError). A batch whose members have all stopped waiting is cancelled.

    coalescer = Coalescer("rank", send_one, send_many, max_batch=16, key=lambda r: r.bundle_version)
    reply = await coalescer.call(request, timeout_s=0.05)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.metrics import BATCH_SIZE

Q = TypeVar("Q")
R = TypeVar("R")


@dataclass
class _Member(Generic[Q, R]):
    item: Q
    deadline: float  # loop.time()
    future: asyncio.Future[R]


class Coalescer(Generic[Q, R]):
    """Sends the items called in one loop turn together: send_one for a lone item, send_many for several.

    send_one(item, timeout_s) -> R and send_many(items, timeout_s) -> [R, one per item, in order] are coroutines.
    Items with different keys (e.g. pinned bundle versions) never share a batch. Use from one event loop.
    """

    def __init__(
        self,
        name: str,
        send_one: Callable[[Q, float], Awaitable[R]],
        send_many: Callable[[Sequence[Q], float], Awaitable[Sequence[R]]],
        max_batch: int,
        key: Callable[[Q], Hashable] = lambda _: None,
        max_in_flight: int = 0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0 (0: no limit), got {max_in_flight}")
        self.name = name
        self.send_one, self.send_many = send_one, send_many
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.key = key
        self._pending: list[_Member[Q, R]] = []
        self._scheduled = False
        self._in_flight = 0

    async def call(self, item: Q, timeout_s: float) -> R:
        loop = asyncio.get_running_loop()
        member = _Member(item, loop.time() + timeout_s, loop.create_future())
        self._pending.append(member)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        # A member that stops waiting (its timeout, or its request cancelled) cancels only its own future.
        return await asyncio.wait_for(member.future, timeout_s)

    def _flush(self) -> None:
        self._scheduled = False
        if self.max_in_flight and self._in_flight >= self.max_in_flight:
            return  # the next call to come back flushes
        pending, self._pending = self._pending, []
        groups: dict[Hashable, list[_Member[Q, R]]] = {}
        for member in pending:
            if not member.future.done():
                groups.setdefault(self.key(member.item), []).append(member)
        loop = asyncio.get_running_loop()
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start : start + self.max_batch]
                self._in_flight += 1
                task = loop.create_task(self._send(chunk))
                task.add_done_callback(self._call_done)
                for member in chunk:
                    member.future.add_done_callback(lambda _, chunk=chunk, task=task: _cancel_if_abandoned(chunk, task))

    def _call_done(self, _: asyncio.Task[None]) -> None:
        self._in_flight -= 1
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, members: list[_Member[Q, R]]) -> None:
        timeout_s = max(0.0, max(m.deadline for m in members) - asyncio.get_running_loop().time())
        BATCH_SIZE.labels(self.name).observe(len(members))
        try:
            if len(members) == 1:
                results: Sequence[R] = [await self.send_one(members[0].item, timeout_s)]
            else:
                results = await self.send_many([m.item for m in members], timeout_s)
            if len(results) != len(members):
                raise RuntimeError(f"{self.name}: {len(results)} answers for a batch of {len(members)}")
        except asyncio.CancelledError:
            for m in members:
                m.future.cancel()
            raise
        except Exception as exc:
            for m in members:
                if not m.future.done():
                    m.future.set_exception(exc)
            return
        for m, result in zip(members, results, strict=True):
            if not m.future.done():
                m.future.set_result(result)


def _cancel_if_abandoned(members: list[_Member[Q, R]], task: asyncio.Task[None]) -> None:
    """Once no member waits any more, the call has no reader: cancel it (a no-op when it has finished)."""
    if all(m.future.done() for m in members):
        task.cancel()
