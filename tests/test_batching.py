"""gateway.batching.Coalescer: calls of one loop turn share a call, each caller keeps its own answer and deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.batching import Coalescer


class Backend:
    """Records every call; answers item -> item * 10 after delay_s (or raises `error`)."""

    def __init__(self, delay_s: float = 0.0, error: Exception | None = None) -> None:
        self.delay_s, self.error = delay_s, error
        self.calls: list[tuple[str, list[int], float]] = []
        self.cancelled = 0

    async def one(self, item: int, timeout_s: float) -> int:
        return (await self.many([item], timeout_s, kind="one"))[0]

    async def many(self, items: Sequence[int], timeout_s: float, kind: str = "many") -> list[int]:
        self.calls.append((kind, list(items), timeout_s))
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return [i * 10 for i in items]


def coalescer(backend: Backend, max_batch: int = 16, key=lambda i: None) -> Coalescer[int, int]:  # type: ignore[no-untyped-def]
    return Coalescer("test", backend.one, backend.many, max_batch, key)


def test_calls_of_one_turn_share_one_call_and_get_their_own_answers() -> None:
    backend = Backend()

    async def run() -> list[int]:
        c = coalescer(backend)
        return await asyncio.gather(*(c.call(i, 1.0) for i in range(5)))

    assert asyncio.run(run()) == [0, 10, 20, 30, 40]
    assert [(kind, items) for kind, items, _ in backend.calls] == [("many", [0, 1, 2, 3, 4])]


def test_a_lone_call_and_calls_of_different_turns_go_alone() -> None:
    backend = Backend()

    async def run() -> list[int]:
        c = coalescer(backend)
        return [await c.call(i, 1.0) for i in range(3)]  # each awaited before the next is made

    assert asyncio.run(run()) == [0, 10, 20]
    assert [(kind, items) for kind, items, _ in backend.calls] == [("one", [0]), ("one", [1]), ("one", [2])]


def test_batches_respect_max_batch_and_never_mix_keys() -> None:
    backend = Backend()

    async def run() -> list[int]:
        c = coalescer(backend, max_batch=2, key=lambda i: i % 2)  # e.g. two pinned bundle versions
        return await asyncio.gather(*(c.call(i, 1.0) for i in range(7)))

    assert asyncio.run(run()) == [i * 10 for i in range(7)]
    batches = sorted(items for _, items, _ in backend.calls)
    assert batches == [[0, 2], [1, 3], [4, 6], [5]]


def test_a_batch_is_sent_with_its_longest_timeout_and_each_member_keeps_its_own() -> None:
    backend = Backend(delay_s=0.2)

    async def run() -> tuple[object, object]:
        c = coalescer(backend)
        short, long = c.call(1, 0.05), c.call(2, 1.0)
        return tuple(await asyncio.gather(short, long, return_exceptions=True))  # type: ignore[return-value]

    short, long = asyncio.run(run())
    assert isinstance(short, TimeoutError)  # gave up at its own 50 ms ...
    assert long == 20  # ... while the batch went on for the other member
    ((_, items, timeout_s),) = backend.calls
    assert items == [1, 2] and 0.9 < timeout_s <= 1.0
    assert backend.cancelled == 0


def test_a_batch_nobody_waits_for_any_more_is_cancelled() -> None:
    backend = Backend(delay_s=5.0)

    async def run() -> list[object]:
        c = coalescer(backend)
        results = await asyncio.gather(c.call(1, 0.05), c.call(2, 0.05), return_exceptions=True)
        await asyncio.sleep(0.01)  # the cancellation runs on the next turns
        return results

    assert all(isinstance(r, TimeoutError) for r in asyncio.run(run()))
    assert backend.cancelled == 1


def test_an_error_reaches_every_member_of_the_batch() -> None:
    backend = Backend(error=RuntimeError("ranking down"))

    async def run() -> list[object]:
        c = coalescer(backend)
        return await asyncio.gather(*(c.call(i, 1.0) for i in range(3)), return_exceptions=True)

    results = asyncio.run(run())
    assert len(backend.calls) == 1
    assert all(isinstance(r, RuntimeError) and str(r) == "ranking down" for r in results)


def test_a_wrong_number_of_answers_is_an_error_not_a_misrouted_answer() -> None:
    async def short(items: Sequence[int], timeout_s: float) -> list[int]:
        return [0] * (len(items) - 1)

    async def one(item: int, timeout_s: float) -> int:
        return item

    async def run() -> list[object]:
        c: Coalescer[int, int] = Coalescer("test", one, short, 16)
        return await asyncio.gather(c.call(1, 1.0), c.call(2, 1.0), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, RuntimeError) and "1 answers for a batch of 2" in str(r) for r in results)


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        coalescer(Backend(), max_batch=0)


def test_with_max_in_flight_calls_made_meanwhile_wait_and_leave_as_one_batch() -> None:
    backend = Backend(delay_s=0.05)

    async def run() -> list[int]:
        c = Coalescer("test", backend.one, backend.many, 16, max_in_flight=1)
        first = asyncio.ensure_future(c.call(0, 1.0))
        await asyncio.sleep(0.01)  # the first call is out
        rest = [asyncio.ensure_future(c.call(i, 1.0)) for i in range(1, 4)]
        await asyncio.sleep(0.01)
        more = [asyncio.ensure_future(c.call(i, 1.0)) for i in range(4, 6)]  # made in another turn, still waiting
        return list(await asyncio.gather(first, *rest, *more))

    assert asyncio.run(run()) == [0, 10, 20, 30, 40, 50]
    assert [items for _, items, _ in backend.calls] == [[0], [1, 2, 3, 4, 5]]
