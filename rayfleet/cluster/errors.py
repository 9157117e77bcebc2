"""One error type for every way a request can fail, mapped once to gRPC and HTTP statuses.

``RequestError`` crosses Ray process boundaries (replica -> ingress) by pickling, so it keeps its
constructor arguments in ``__reduce__``. Pure Python; grpc is imported only to map codes.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorKind(str, Enum):
    INVALID_ARGUMENT = "invalid_argument"  # the client's fault; never retried
    RESOURCE_EXHAUSTED = "resource_exhausted"  # queues full; retry later
    UNAVAILABLE = "unavailable"  # no replica can serve now
    ABORTED = "aborted"  # ended by an Abort call
    CANCELLED = "cancelled"  # the client went away
    INTERNAL = "internal"  # a bug or an engine fault

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def openai_type(self) -> str:
        return _OPENAI_TYPE[self]

    def grpc_code(self) -> Any:
        import grpc

        return getattr(grpc.StatusCode, self.name)


_HTTP_STATUS = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.ABORTED: 409,
    ErrorKind.CANCELLED: 499,
    ErrorKind.INTERNAL: 500,
}
_OPENAI_TYPE = {
    ErrorKind.INVALID_ARGUMENT: "invalid_request_error",
    ErrorKind.RESOURCE_EXHAUSTED: "rate_limit_exceeded",
    ErrorKind.UNAVAILABLE: "service_unavailable",
    ErrorKind.ABORTED: "aborted",
    ErrorKind.CANCELLED: "cancelled",
    ErrorKind.INTERNAL: "internal_error",
}


class RequestError(Exception):
    """A request failed with ``kind``; ``field`` names the offending input field (dotted, e.g.
    ``sampling.temperature``) for INVALID_ARGUMENT."""

    def __init__(self, kind: ErrorKind | str, message: str, field: str | None = None) -> None:
        self.kind = ErrorKind(kind)
        self.message = message
        self.field = field
        super().__init__(self.details)

    @property
    def details(self) -> str:
        """The gRPC status details / HTTP error message: ``field: message``."""
        return f"{self.field}: {self.message}" if self.field else self.message

    def __reduce__(self) -> tuple:
        return (RequestError, (self.kind.value, self.message, self.field))

    @classmethod
    def invalid(cls, field: str, message: str) -> RequestError:
        return cls(ErrorKind.INVALID_ARGUMENT, message, field)
