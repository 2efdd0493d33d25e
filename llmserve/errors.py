"""The one error hierarchy of llmserve, and its OpenAI wire form.

Every failure a client can see is an ``LLMServeError``. Each class fixes the
HTTP status and the OpenAI ``type``; the boundary (the ingress) turns it into
``{"error": {"message", "type", "param", "code"}}``. Errors are plain values
that pickle, so a server replica can hand one back through Ray instead of
raising across the actor boundary.

Example::

    raise ModelNotFoundError("The model `gpt-9` does not exist.", param="model")
"""

from __future__ import annotations

import json
import math
from typing import Any


class LLMServeError(Exception):
    """Base class: a failure with an HTTP status and an OpenAI error envelope."""

    status_code = 500
    error_type = "internal_server_error"
    default_code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: float | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s  # when the client may try again (429, 503), if we know

    def __reduce__(self):
        # Keyword-only arguments do not survive Exception's default pickling,
        # and these errors travel between Ray replicas.
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after_s))

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides the envelope: ``Retry-After`` in whole seconds."""
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(0, math.ceil(self.retry_after_s)))}

    def to_envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_envelope()).encode()

    def to_sse_event(self) -> str:
        """The error as one server-sent event, for failures after a stream began."""
        return f"data: {json.dumps(self.to_envelope())}\n\n"


def _rebuild(cls, message, param, code, retry_after_s=None):
    return cls(message, param=param, code=code, retry_after_s=retry_after_s)


class ConfigError(LLMServeError, ValueError):
    """A configuration that cannot be served; raised before anything starts."""

    error_type = "configuration_error"


class StorageError(ConfigError):
    """A folder in object storage cannot be read: no credentials for it, or access denied."""


class FolderMissingError(StorageError):
    """A folder in object storage is not there: no such bucket, or no files under the prefix."""


class BadRequestError(LLMServeError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(BadRequestError):
    default_code = "context_length_exceeded"


class UnauthorizedError(LLMServeError):
    """No API key, or not one of the app's (401, as OpenAI answers it)."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class ModelNotFoundError(LLMServeError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class NotFoundError(LLMServeError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowedError(LLMServeError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeoutError(LLMServeError):
    """The client did not send its request in time (a stalled head or body)."""

    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLargeError(LLMServeError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class HeaderFieldsTooLargeError(LLMServeError):
    status_code = 431
    error_type = "invalid_request_error"
    default_code = "request_header_fields_too_large"


class TooManyRequestsError(LLMServeError):
    """The model's queue is full (``max_queued_requests``); as OpenAI answers a rate limit,
    so clients that back off on 429 (the openai SDK does) wait ``Retry-After``."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class EngineError(LLMServeError):
    """The engine failed while serving a request; the message names the request id."""

    status_code = 500
    error_type = "internal_server_error"
    default_code = "engine_error"


class ServiceUnavailableError(LLMServeError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"


# Marks a replica's answer that the ingress should not pass on but send elsewhere.
RETRY_ELSEWHERE_HEADER = "x-llmserve-retry-elsewhere"
# A request that replicas decline before answering anything (their engines died, or they
# are gone) is offered to this many others, on every path: so a request that kills the
# engines it meets does not kill them all.
MAX_DECLINES = 1


class ReplicaUnavailableError(ServiceUnavailableError):
    """This replica cannot serve (its engine died) but another can: every transport
    sends a request that got this before its first byte to another replica."""

    default_code = "replica_unavailable"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), RETRY_ELSEWHERE_HEADER: "1"}


class NotImplementedByModelError(LLMServeError):
    status_code = 501
    error_type = "invalid_request_error"
    default_code = "not_implemented"


# vLLM's 404s on the request path are all "no such model or adapter".
_BY_STATUS = {
    400: BadRequestError,
    404: ModelNotFoundError,
    405: MethodNotAllowedError,
    501: NotImplementedByModelError,
    503: ServiceUnavailableError,
}


def error_for_status(status: int, message: str, *, param: str | None = None) -> LLMServeError:
    """Map an HTTP status reported by an engine to our hierarchy."""
    if status == 400 and "context length" in message.lower():
        return ContextLengthExceededError(message, param=param or "messages")
    if status in _BY_STATUS:
        return _BY_STATUS[status](message, param=param)
    if 400 <= status < 500:
        return BadRequestError(message, param=param)
    return EngineError(message, param=param)
