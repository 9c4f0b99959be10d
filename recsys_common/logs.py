"""Structured JSON logs, one object per line, with the request id of the request being served.

The gateway makes a request id (or takes the caller's `X-Request-ID` / `x-request-id`), passes it to
retrieval and ranking in gRPC metadata, and every log line written while serving that request carries
it. Nothing here logs user ids: the callers never pass them (the gateway only holds keyed digests).

RECSYS_LOG_FORMAT=text gives the classic one-line format for a terminal; RECSYS_LOG_LEVEL sets the level.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
METADATA_KEY = "x-request-id"
HEADER = "X-Request-ID"
# A caller's id is kept only when it is short and plain: it ends up in logs and response headers.
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            out["request_id"] = request_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(service: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Configure the root logger once per process: JSON lines on stderr unless RECSYS_LOG_FORMAT=text."""
    level = environ.get("RECSYS_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler()
    if environ.get("RECSYS_LOG_FORMAT", "json").lower() == "text":
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    else:
        handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")


def new_request_id(given: str | None = None) -> str:
    """The caller's id when it is plain and short, else a fresh random one."""
    if given and _VALID_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == METADATA_KEY and isinstance(value, str):
            return new_request_id(value)
    return ""


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries the current request id to a downstream service."""
    request_id = REQUEST_ID.get()
    return ((METADATA_KEY, request_id),) if request_id else ()
