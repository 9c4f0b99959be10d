"""The project's error tree, each class carrying its gRPC code and HTTP status.

    RecsysError
    ├── InvalidRequest      INVALID_ARGUMENT     422  a field is wrong; the message names it
    ├── NotFound            NOT_FOUND            404  unknown id where one is required
    ├── BundleUnavailable   UNAVAILABLE          503  nothing loaded yet
    ├── BundleMismatch      FAILED_PRECONDITION  409  version or checksum does not match
    ├── DeadlineExceeded    DEADLINE_EXCEEDED    504  only when nothing useful can be sent
    ├── Overloaded          RESOURCE_EXHAUSTED   503  at the in-flight limit: refused at once, retry
    └── StoreError          UNAVAILABLE          503  the user-state store failed

Cores raise these; exactly two edges translate them (grpc_server.map_errors for gRPC, the
gateway's exception handler for HTTP).
"""

from __future__ import annotations

import grpc


class RecsysError(Exception):
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500


class InvalidRequest(RecsysError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(RecsysError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class BundleUnavailable(RecsysError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class BundleMismatch(RecsysError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class DeadlineExceeded(RecsysError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Overloaded(RecsysError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 503


class StoreError(RecsysError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
