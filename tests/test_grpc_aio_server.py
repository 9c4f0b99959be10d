"""The grpc.aio server the gateway's front door runs on (recsys_common.grpc_server.create_aio_server): each call is
counted under the status its caller saw, also when grpc cancels the handler at the deadline; errors map to their
codes; a message over the size limit is refused before any handler runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
from prometheus_client import REGISTRY

from recsys_common.errors import InvalidRequest
from recsys_common.grpc_server import create_aio_server, map_errors

SERVICE = "test.Probe"


class Probe:
    def __init__(self) -> None:
        self.calls = 0

    @map_errors
    async def slow(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.calls += 1
        await asyncio.sleep(2)
        return request

    @map_errors
    async def invalid(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.calls += 1
        raise InvalidRequest("payload", "is not welcome")

    @map_errors
    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.calls += 1
        return request


def count(method: str, code: str) -> float:
    labels = {"method": f"/{SERVICE}/{method}", "code": code}
    return REGISTRY.get_sample_value("recsys_grpc_requests_total", labels) or 0.0


async def call(channel: grpc.aio.Channel, method: str, payload: bytes, timeout: float) -> grpc.StatusCode:
    send: Callable[..., Awaitable[bytes]] = channel.unary_unary(f"/{SERVICE}/{method}")
    try:
        assert await send(payload, timeout=timeout) == payload
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        return err.code()


def test_statuses_are_counted_as_the_caller_saw_them_and_big_messages_never_reach_a_handler() -> None:
    probe = Probe()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {name: grpc.unary_unary_rpc_method_handler(getattr(probe, name)) for name in ("slow", "invalid", "echo")},
    )

    async def scenario() -> dict[str, grpc.StatusCode]:
        server, port, _ = create_aio_server([lambda s: s.add_generic_rpc_handlers((handler,))], "127.0.0.1:0", 1024)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return {
                    "ok": await call(channel, "echo", b"x" * 100, 5),
                    "deadline": await call(channel, "slow", b"x", 0.2),
                    "invalid": await call(channel, "invalid", b"x", 5),
                    "too_big": await call(channel, "echo", b"x" * 2048, 5),
                }
        finally:
            await server.stop(0)

    watched = [("echo", "OK"), ("slow", "DEADLINE_EXCEEDED"), ("slow", "UNKNOWN"), ("invalid", "INVALID_ARGUMENT")]
    before = {(m, c): count(m, c) for m, c in watched}
    seen = asyncio.run(scenario())
    assert seen == {
        "ok": grpc.StatusCode.OK,
        "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
        "invalid": grpc.StatusCode.INVALID_ARGUMENT,
        "too_big": grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    assert probe.calls == 3  # the oversized message was refused before the handler
    assert count("echo", "OK") == before["echo", "OK"] + 1
    assert count("slow", "DEADLINE_EXCEEDED") == before["slow", "DEADLINE_EXCEEDED"] + 1
    assert count("slow", "UNKNOWN") == before["slow", "UNKNOWN"]
    assert count("invalid", "INVALID_ARGUMENT") == before["invalid", "INVALID_ARGUMENT"] + 1
