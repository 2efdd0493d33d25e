"""From what a server produced to the HTTP response a client gets.

A request that reached a backend is an ``ApiRequest``: its parsed body, the
bytes it came as, its id and whether it streams. A server answers with bytes,
SSE text or an ``LLMServeError``; the helpers here turn those into Starlette
responses, with the OpenAI error envelope for every failure and one error
event plus ``[DONE]`` for a failure after a stream started.

Example::

    return streamed_response(guarded(events, request.request_id), request.request_id)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from starlette.responses import Response, StreamingResponse

from llmserve.engine import Endpoint
from llmserve.errors import EngineError, LLMServeError
from llmserve.migration import Continued, Marked, StreamCut

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Names the model replica that made an answer: a name (deployment#id), never an address.
REPLICA_HEADER = "x-llmserve-replica"
# The key of an ASGI body message's progress mark (migration.Marked), for the handoff transport.
MARK_KEY = "llmserve.mark"
SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ApiRequest:
    """One OpenAI API call, parsed once at the front door."""

    endpoint: Endpoint
    body: dict[str, Any]
    raw_body: bytes
    request_id: str
    stream: bool
    content_type: str = "application/json"  # what ``raw_body`` is: JSON, or a multipart form
    # A front door on the replica's node asks for each write's tokens (migration.py) ...
    reports_progress: bool = False
    # ... and names the stream this request continues, if it does.
    continues: Optional[Continued] = None


def stream_ending(error: LLMServeError) -> str:
    """How every stream that fails after it began ends, on every path: one error event, then [DONE].
    The answer is counted with the error's status (its HTTP status was 200)."""
    from llmserve import metrics  # (metrics reads this module's header names)

    metrics.failed_mid_stream(error.status_code)
    return error.to_sse_event() + SSE_DONE


def error_response(error: LLMServeError, request_id: Optional[str] = None) -> Response:
    headers = error.headers()
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return Response(error.to_json_bytes(), status_code=error.status_code, media_type="application/json", headers=headers)


def backend_failure(exc: Exception, request_id: str) -> LLMServeError:
    """What the client hears when the replica or the transport to it failed (not the engine)."""
    if isinstance(exc, LLMServeError):  # already what the client hears (a full queue, say)
        return exc
    logger.error("request %s failed between the ingress and the model replica: %r", request_id, exc)
    return EngineError(f"The server failed to serve request {request_id}; see the server log for details.")


async def guarded(events: AsyncIterator[Any], request_id: str) -> AsyncIterator[Any]:
    """The backend's events; a failure of the transport itself becomes one last error item."""
    started = False
    try:
        async for event in events:
            started = True
            yield event
    except StreamCut:
        raise  # the stream goes on elsewhere: nothing more is written here
    except Exception as exc:
        error = backend_failure(exc, request_id)
        yield stream_ending(error) if started else error
    finally:
        await events.aclose()


async def streamed_response(events: AsyncIterator[Any], request_id: str) -> Response:
    """A 200 SSE stream, or a plain HTTP error when the first item already is one.

    The first event decides the status: an error before any token is a plain
    HTTP error, not a 200 stream that carries one.
    """
    headers = {REQUEST_ID_HEADER: request_id}
    first = await anext(events, None)
    if isinstance(first, LLMServeError):
        await events.aclose()
        return error_response(first, request_id)

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return _EventStream(body(), media_type="text/event-stream", headers=headers)


class _EventStream(StreamingResponse):
    """Starlette's streaming response, whose writes may carry a progress mark for the transport
    (``MARK_KEY`` in the ASGI message; servers ignore keys they do not know)."""

    async def stream_response(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            if isinstance(chunk, Marked):
                await send({"type": "http.response.body", "body": chunk.text.encode(), "more_body": True, MARK_KEY: chunk.mark})
            else:
                await send({"type": "http.response.body", "body": chunk.encode() if isinstance(chunk, str) else chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
