"""The ingress's own listener: read a request, pick its replica, splice the answer's bytes.

On a small machine every byte a Python HTTP stack handles is CPU taken from
the engine. Behind ``llmserve run`` the ingress replica therefore owns the
public port itself: it parses each request once (head with httptools, body
with ``json.loads`` for the `model` field, both in the route callback),
and asks where it goes. A model replica on this node gets the client's socket
with the request and writes the answer itself (``handoff.py``); the front
door keeps reading the connection and takes the writing back when the
replica reports the answer complete. Anywhere else, it sends the request on
a fresh connection and copies the response bytes to the client unparsed,
only watching its framing to know where it ends: per streamed chunk one read
and one write. Serve's proxy, HAProxy and the ASGI layers are not on the
byte path (measured in docs/data-path.md).

What the route callback returns decides everything else: a model replica
for API calls, the ingress's own ASGI app (on an internal port) for the
rest — model lists, health, and every error the ingress answers itself.

Example::

    door = FrontDoor(route)           # route(HttpRequest) -> Upstream
    await door.start("0.0.0.0", 8000)  # SO_REUSEPORT: many ingress replicas per node
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import httptools

from llmserve import access_log, metrics
from llmserve.errors import (
    MAX_DECLINES,
    RETRY_ELSEWHERE_HEADER,
    BadRequestError,
    HeaderFieldsTooLargeError,
    LLMServeError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from llmserve.handoff import COMPLETE, CONTINUATION_FAILED, CUT_SHORT, DECLINED, HandoffCall, address_for
from llmserve.migration import PROGRESS_HEADER, Delivered, Resume

logger = logging.getLogger(__name__)

# Bodies past this are refused before they reach a replica (images as base64 fit):
# at once when the head declares it, else as soon as that much has arrived.
MAX_BODY_BYTES = 64 * 1024 * 1024
# A request head (request line and headers) larger than this, or with more
# headers, is refused with 431; clients send a few kilobytes and a dozen or two.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
# A client must send a request's head within HEAD_TIMEOUT_S of its first byte and
# not pause longer than BODY_STALL_S within its body (408 otherwise); a connection
# with no request for IDLE_TIMEOUT_S is closed. Stalled clients then hold a
# socket for seconds, not forever. Nothing times out while a request is answered.
HEAD_TIMEOUT_S = 15.0
BODY_STALL_S = 30.0
IDLE_TIMEOUT_S = 75.0
# A connection accepted just before a drain began, its first request still on its way, is
# given this long to send it: it is answered, then closed.
FIRST_REQUEST_GRACE_S = 2.0
# Connections the kernel holds for the front door while it is busy (Serve's proxy uses as many).
BACKLOG = 4096
# Hop-by-hop headers: they describe one connection, not the request.
_HOP_HEADERS = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"expect", b"host"}
# Headers between the front door and replicas (migration.py): never taken from a client.
_INTERNAL_HEADER_PREFIX = b"x-llmserve-"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_RETRY_ELSEWHERE = RETRY_ELSEWHERE_HEADER.encode()
_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@dataclass
class HttpRequest:
    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    http_version: str = "1.1"
    arrived: float = 0.0  # Unix time the whole request was in
    # What metrics name its answer by (model, adapter, endpoint), once the route knows.
    labels: dict[str, str] = field(default_factory=lambda: dict(metrics.UNKNOWN_REQUEST))

    def header(self, name: bytes) -> Optional[bytes]:
        return next((value for key, value in self.headers if key == name), None)


@dataclass
class Upstream:
    """Where one request goes, and what to do when it is done or cannot get there."""

    host: str
    port: int
    request_id: Optional[str] = None
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    done: Callable[[], None] = lambda: None  # may be called more than once
    # Called when the address refused the connection; returns another place or raises.
    elsewhere: Optional[Callable[[], Awaitable["Upstream"]]] = None
    # What to send the client if the upstream dies after the answer's head (SSE only).
    last_words: Callable[[], bytes] = lambda: b""
    # A model replica: on this node it writes its answer to the client itself (handoff.py).
    hand_off: bool = False
    # Times a stream may go on at another replica if its replica dies (migration.py); with
    # any, the replica reports its writes.
    migrations: int = 0


Route = Callable[[HttpRequest], Awaitable[Upstream]]


@dataclass
class _Ending:
    """How one replica's answer ended, whichever way its bytes went (handoff or splice)."""

    declined: bool = False  # nothing reached the client: another replica may serve the request
    complete: bool = False  # the whole answer reached the client
    streaming: bool = False  # an SSE stream had begun
    at_chunk_boundary: bool = True  # ... and stopped between two chunks: an error event can end it
    delivered: Optional[Delivered] = None  # what the client has, where the replica described its writes


# A replica's answer to "serve this": not mine, ask the next place (nothing was written).
_DECLINED = object()


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold host:port for front doors that will open later, in other processes.

    While the models load (minutes), the port would otherwise be free for the
    kernel to hand out as the local port of some outgoing connection, and the
    ingress would then fail to bind it. A socket bound with SO_REUSEPORT but
    never listening keeps the port ours without taking any connections; the
    front doors (same user, also SO_REUSEPORT) can still bind it. Raises
    OSError at once if the port is taken, before any model loads.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # First a bind without SO_REUSEPORT: it fails on any socket already there,
    # including another llmserve's front door, which would otherwise share the
    # port with ours and take part of its traffic.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # No SO_REUSEADDR here: with it Linux lets any other SO_REUSEADDR socket
        # share a port no one listens on, which is all a reservation is.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class FrontDoor:
    def __init__(self, route: Route):
        self._route = route
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[_ClientConnection] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        server = await asyncio.get_running_loop().create_server(self._new_connection, host, port, reuse_port=True, backlog=BACKLOG)
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]  # the one chosen, for port 0
        logger.info("front door listening on %s:%s", host, self.port)

    async def start_on(self, listeners: list[socket.socket]) -> None:
        """Serve connections of sockets already listening (serve_port.listen_before)."""
        loop = asyncio.get_running_loop()
        for listener in listeners:
            self._servers.append(await loop.create_server(self._new_connection, sock=listener, backlog=BACKLOG))
        self.port = listeners[0].getsockname()[1]
        logger.info("front door listening on %s", ", ".join("%s:%s" % listener.getsockname()[:2] for listener in listeners))

    def _new_connection(self) -> "_ClientConnection":
        return _ClientConnection(self._route, self._connections)

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def drain(self, timeout_s: float) -> int:
        """Take no more connections or requests, and wait (up to ``timeout_s``) for the
        answers being written to finish, closing each connection after its answer;
        how many connections were still open at the deadline."""
        self.close()
        for connection in list(self._connections):
            connection.drain()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return len(self._connections)


class _ClientConnection(asyncio.Protocol):
    """One client connection: requests in order, each spliced from its upstream."""

    def __init__(self, route: Route, open_connections: set["_ClientConnection"]):
        self._route = route
        self._open_connections = open_connections  # the front door's, for its drain
        self._draining = False
        self._transport: Any = None
        self._parser = httptools.HttpRequestParser(self)
        self._pending: deque[HttpRequest] = deque()
        self._reading: Optional[HttpRequest] = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._worker: Optional[asyncio.Task] = None
        self._upstream: Optional[_UpstreamConnection] = None
        self._handoff: Optional[HandoffCall] = None
        self._closed = False
        self._head_size = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._refusal: Optional[LLMServeError] = None  # the answer that ends this connection
        self._taken = 0  # requests this connection has taken in

    # asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._open_connections.add(self)
        self._wait(IDLE_TIMEOUT_S, self._close_idle)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(BadRequestError("Protocol upgrades are not supported."))
        except httptools.HttpParserError as exc:
            self._refuse(BadRequestError(f"Malformed HTTP request: {exc}"))

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._closed = True
        self._open_connections.discard(self)
        self._wait(None)
        if self._upstream is not None:
            self._upstream.abandon()  # closing it is how the replica (and its engine) hears the client left
        if self._handoff is not None:
            self._handoff.abandon()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()

    def drain(self) -> None:
        """The server is shutting down: close now if idle, else after the answer being written.

        A connection that has taken no request yet was accepted a moment ago, and its client
        has sent (or is sending) its first request: closed now, that request would be lost
        with no answer, and a client cannot know whether to send it again. It is answered,
        then the connection closes; a kept-alive connection between requests closes at once
        (its client knows it may be closed when idle).
        """
        self._draining = True
        if self._answering() or self._closed:
            return
        if not self._taken:  # (nor any pending: each one taken is counted)
            if self._reading is None:
                self._wait(FIRST_REQUEST_GRACE_S, self._close_idle)
            return
        self._close_idle_now()

    def pause_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.pause()

    def resume_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.resume()

    # httptools callbacks; once the connection is refused, what else it sent is ignored
    def on_message_begin(self) -> None:
        self._reading = HttpRequest(b"", b"", [], b"", True)
        self._body, self._body_size, self._head_size = [], 0, 0
        self._wait(HEAD_TIMEOUT_S, self._too_slow)

    def on_url(self, url: bytes) -> None:
        self._reading.path += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if not name.startswith(_INTERNAL_HEADER_PREFIX):
            self._reading.headers.append((name, value))
        self._count_head(len(name) + len(value))
        if len(self._reading.headers) > MAX_HEADERS and not self._stopped():
            self._refuse(HeaderFieldsTooLargeError(f"The request has more than {MAX_HEADERS} headers."))

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES and not self._stopped():
            self._refuse(HeaderFieldsTooLargeError(f"The request head is larger than {MAX_HEAD_BYTES} bytes."))

    def on_headers_complete(self) -> None:
        if self._stopped():
            return
        self._reading.method = self._parser.get_method()
        self._reading.http_version = self._parser.get_http_version()
        self._reading.keep_alive = self._parser.should_keep_alive()
        declared = self._reading.header(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > MAX_BODY_BYTES:
            self._refuse_body()  # before reading any of it
            return
        self._wait(BODY_STALL_S, self._too_slow)
        if (self._reading.header(b"expect") or b"").lower() == b"100-continue":
            self._transport.write(_CONTINUE)

    def on_body(self, chunk: bytes) -> None:
        if self._stopped():
            return
        self._body_size += len(chunk)
        if self._body_size > MAX_BODY_BYTES:
            self._refuse_body()
            return
        self._body.append(chunk)
        self._wait(BODY_STALL_S, self._too_slow)

    def _refuse_body(self) -> None:
        self._refuse(PayloadTooLargeError(f"The request body is larger than {MAX_BODY_BYTES} bytes."))

    def on_message_complete(self) -> None:
        if self._stopped():
            return
        self._wait(None)  # the client waits for the answer now, as long as it takes
        request, self._reading = self._reading, None
        if self._draining and self._taken:
            self._refuse(ServiceUnavailableError("The server is shutting down; retry on a new connection."))
            return
        self._taken += 1
        request.body = b"".join(self._body)
        request.arrived = time.time()
        self._pending.append(request)
        if not self._answering():
            self._worker = asyncio.get_running_loop().create_task(self._serve_pending())

    async def _serve_pending(self) -> None:
        while self._pending and not self._closed:
            request = self._pending.popleft()
            kept_alive = await self._serve(request)
            if not kept_alive or self._draining:
                self._transport.close()
                return
        if self._refusal is not None and not self._closed:
            self._answer_and_close(self._refusal)
        elif not self._closed and self._reading is None:
            self._wait(IDLE_TIMEOUT_S, self._close_idle)

    def _stopped(self) -> bool:
        return self._closed or self._refusal is not None

    def _answering(self) -> bool:
        """Whether a request of this connection is being answered (perhaps by a replica, on its socket)."""
        return self._worker is not None and not self._worker.done()

    def _refuse(self, error: LLMServeError) -> None:
        """End the connection with ``error`` after the answers to the requests before it:
        a replica may be writing to this socket right now, and two writers would
        interleave. Nothing the client sent after the refused request is read."""
        self._refusal = error
        self._wait(None)
        self._transport.pause_reading()
        if not self._answering():
            self._answer_and_close(error)

    # Timeouts: one timer per connection, for what the client must do next.
    def _wait(self, seconds: Optional[float], on_timeout: Optional[Callable[[], None]] = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if seconds is not None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(seconds, on_timeout)

    def _too_slow(self) -> None:
        self._timer = None
        if not self._stopped():
            self._refuse(RequestTimeoutError("The request was not sent in time."))

    def _close_idle(self) -> None:
        self._timer = None
        if not self._closed and self._reading is None and not self._pending and not self._answering():
            self._close_idle_now()

    def _close_idle_now(self) -> None:
        self._closed = True
        self._wait(None)
        self._transport.close()

    async def _serve(self, request: HttpRequest) -> bool:
        """One request's answer to the client; whether the connection stays open.

        A replica that declines the request before writing anything (its
        engine died, or it is gone) leaves it for the next place the route
        offers; a stream whose replica died goes on at another (``_continue_stream``).
        """
        upstream: Optional[Upstream] = None
        declined = 0
        try:
            upstream = await self._route(request)
            while (outcome := await self._answer(request, upstream)) is _DECLINED:
                declined += 1
                if upstream.elsewhere is None or declined > MAX_DECLINES:  # (a plain 503: the mark is not for clients)
                    raise ServiceUnavailableError(f"No replica could serve request {upstream.request_id}; retry later.")
                metrics.record(metrics.RETRIES, 1, model=request.labels["model"])
                upstream = await upstream.elsewhere()
        except Exception as exc:  # before anything was written to the client
            if upstream is not None:
                upstream.done()
            request_id = upstream.request_id if upstream else None
            self._answer_and_close(_failure(exc, request_id), request, request_id)
            return False
        if isinstance(outcome, Resume):
            return await self._continue_stream(request, upstream, outcome)
        return outcome

    async def _continue_stream(self, request: HttpRequest, upstream: Upstream, resume: Resume) -> bool:
        """The rest of a stream whose replica died, from other replicas (migration.py): whether
        the connection stays open. The client has the head: failures end it with an error event."""
        declined = 0
        while not self._closed:
            try:
                if upstream.elsewhere is None or declined > MAX_DECLINES:
                    raise ServiceUnavailableError("no replica is left to continue the stream")
                upstream = await upstream.elsewhere()
            except Exception as exc:
                logger.warning("request %s: its stream could not be continued: %r", upstream.request_id, exc)
                self._transport.write(upstream.last_words())
                return False
            metrics.record(metrics.MIGRATIONS, 1, model=request.labels["model"])
            logger.info(
                "request %s: stream continued on another replica (migration %d, %d tokens already sent)",
                upstream.request_id, resume.migrations, len(resume.generated),
            )  # fmt: skip
            outcome = await self._answer(_continuation(request, resume), upstream, resume)
            if isinstance(outcome, Resume):
                resume = outcome
            elif outcome is _DECLINED:
                declined += 1
            else:
                return outcome
        return False

    async def _answer(self, request: HttpRequest, upstream: Upstream, resume: Optional[Resume] = None) -> Any:
        """One replica's answer, handed off or spliced, and what it means: whether the
        connection stays open, _DECLINED, or the ``Resume`` of a stream it left unfinished.
        With ``resume``, ``request`` continues that stream: only a handoff can write it."""
        handoff = await self._hand_off(request, upstream, continues=resume is not None)
        if handoff is not None:
            ending = await self._handed_off(upstream, handoff, continues=resume is not None)
        elif resume is not None:  # (a replica on another node cannot write to this socket)
            upstream.done()
            ending = _Ending(streaming=True)
        else:
            connection = await self._connect(upstream)
            ending = _Ending(declined=True) if connection is None else await self._spliced(request, upstream, connection)
        return self._concluded(ending, request, upstream, resume)

    def _concluded(self, ending: "_Ending", request: HttpRequest, upstream: Upstream, resume: Optional[Resume]) -> Any:
        """What an answer's ending means, the same for every way its bytes went."""
        if self._closed:
            return False
        if ending.declined:
            return _DECLINED
        if ending.complete:
            return request.keep_alive
        if ending.delivered is not None:
            resumed = Resume.after_cut(ending.delivered, resume, upstream.migrations)
            if resumed is not None:
                return resumed
        # A stream cut between two chunks ends with an error event; anything else just closes.
        tail = upstream.last_words() if ending.streaming and ending.at_chunk_boundary else b""
        self._transport.write(tail)
        return bool(tail) and request.keep_alive

    async def _hand_off(self, request: HttpRequest, upstream: Upstream, continues: bool = False) -> Optional[HandoffCall]:
        """The request given to a replica on this node with the client's socket, or None to splice."""
        sock = self._transport.get_extra_info("socket")
        if not upstream.hand_off or request.http_version != "1.1" or sock is None:
            return None
        if self._transport.get_write_buffer_size():  # our bytes must reach the client before the replica's
            return None
        headers = _handoff_headers(request, upstream)
        if upstream.migrations:
            headers.append((PROGRESS_HEADER, "1"))
        head = {"method": request.method.decode("latin-1"), "path": request.path.decode("latin-1"), "headers": headers}
        if continues:
            head["continues"] = True  # the client has this stream's head: the replica writes only events
        try:
            return await HandoffCall.start(
                address_for(upstream.host, upstream.port), sock, head, request.body, reports_progress=bool(upstream.migrations)
            )
        except OSError:
            return None  # on another node (or gone, which the TCP connect finds out)

    async def _handed_off(self, upstream: Upstream, handoff: HandoffCall, continues: bool) -> "_Ending":
        """Wait while the replica answers on the client's socket; how that ended."""
        self._handoff = handoff
        try:
            outcome = await handoff.finished()
            cut = outcome == CUT_SHORT and handoff.head_sent and handoff.streaming and not self._closed
            delivered = handoff.delivered() if cut else None
        finally:
            self._handoff = None
            handoff.close()
            upstream.done()
        return _Ending(
            # Declined, or the replica died before writing anything: another one can serve it.
            declined=outcome == DECLINED or (not handoff.head_sent and outcome != CONTINUATION_FAILED),
            complete=outcome == COMPLETE or (delivered is not None and delivered.exact and delivered.ended),
            streaming=handoff.streaming or continues,
            delivered=delivered,  # (the replica writes whole chunks: a stream it left is at a boundary)
        )

    async def _spliced(self, request: HttpRequest, upstream: Upstream, connection: "_UpstreamConnection") -> "_Ending":
        """Copy the replica's answer to the client; how that ended."""
        self._upstream = connection
        try:
            connection.send(_upstream_request(request, upstream))
            complete = await connection.finished
        finally:
            self._upstream = None
            upstream.done()
        return _Ending(
            declined=connection.declined or not connection.answered,
            complete=complete,
            streaming=connection.streaming,
            at_chunk_boundary=connection.at_chunk_boundary,
        )

    async def _connect(self, upstream: Upstream) -> Optional["_UpstreamConnection"]:
        """A connection to ``upstream``; None if it refused (nothing was sent: another replica may
        take the request), after running ``done``."""
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                lambda: _UpstreamConnection(self._transport, loop), upstream.host, upstream.port
            )
            return connection
        except OSError:
            upstream.done()
            return None

    def _answer_and_close(self, error: LLMServeError, request: Optional[HttpRequest] = None, request_id: Optional[str] = None) -> None:
        """Answer ``error`` and close: the front door's own answers (the rest are counted where made)."""
        labels = request.labels if request is not None else metrics.UNKNOWN_REQUEST
        metrics.record(metrics.REQUESTS, 1, **labels, status=str(error.status_code))
        arrived = request.arrived if request is not None and request.arrived else time.time()
        access_log.write(
            request_id=request_id, **labels, status=error.status_code, prompt_tokens=0, completion_tokens=0,
            duration_s=time.time() - arrived, migrated=False,
        )  # fmt: skip
        body = error.to_json_bytes()
        extra = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in error.headers().items())
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n"
        self._transport.write(head % (error.status_code, _REASONS.get(error.status_code, b"Error"), len(body), extra) + body)
        self._transport.close()
        self._closed = True


def _failure(exc: Exception, request_id: Optional[str]) -> LLMServeError:
    if isinstance(exc, LLMServeError):
        return exc
    logger.error("request %s: the front door could not reach a replica: %r", request_id, exc)
    return ServiceUnavailableError(f"No replica of the model could be reached for request {request_id}; retry later.")


def _continuation(request: HttpRequest, resume: Resume) -> HttpRequest:
    """The request that generates the rest of ``request``'s stream on another replica."""
    return HttpRequest(
        b"POST", b"/v1/completions", request.headers + resume.headers(), resume.body(), request.keep_alive,
        arrived=request.arrived, labels=request.labels,
    )  # fmt: skip


def _handoff_headers(request: HttpRequest, upstream: Upstream) -> list[tuple[str, str]]:
    # (The continuation of a stream carries its own x-llmserve- headers; a client's never get here.)
    headers = [(k, v) for k, v in request.headers if k not in _HOP_HEADERS] + upstream.extra_headers
    headers.append((b"content-length", b"%d" % len(request.body)))
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def _upstream_request(request: HttpRequest, upstream: Upstream) -> bytes:
    headers = [(k, v) for k, v in request.headers if k not in _HOP_HEADERS] + upstream.extra_headers
    lines = [b"%s %s HTTP/1.1" % (request.method, request.path), b"host: %s:%d" % (upstream.host.encode(), upstream.port)]
    lines += [b"%s: %s" % pair for pair in headers]
    # One connection per request: the end of the answer is the end of the connection,
    # and a replica that went away is found out at connect, before anything was sent.
    lines += [b"content-length: %d" % len(request.body), b"connection: close", b"", b""]
    return b"\r\n".join(lines) + request.body


class _UpstreamConnection(asyncio.Protocol):
    """The connection to a replica: its answer goes to the client as it arrives."""

    def __init__(self, client: Any, loop: asyncio.AbstractEventLoop):
        self._client = client
        self._transport: Any = None
        self._parser = httptools.HttpResponseParser(self)
        self._head = bytearray()
        self._head_sent = False
        self.finished: asyncio.Future = loop.create_future()
        self.streaming = False
        self.at_chunk_boundary = True
        self.declined = False  # the replica said "send it elsewhere": nothing goes to the client
        self.answered = False  # the replica sent some of its answer
        self._complete = False

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def send(self, data: bytes) -> None:
        self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._transport.abort()
            return
        if self.declined:
            self._transport.abort()
            return
        if self._head_sent:
            self._client.write(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end >= 0:
            self._head_sent = True
            self._client.write(_client_head(bytes(self._head[: end + 4])) + bytes(self._head[end + 4 :]))
            self._head = bytearray()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.finished.done():
            self.finished.set_result(self._complete)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type" and value.startswith(b"text/event-stream"):
            self.streaming = True
        elif name == _RETRY_ELSEWHERE:
            self.declined = True

    def on_chunk_header(self) -> None:
        self.at_chunk_boundary = False

    def on_chunk_complete(self) -> None:
        self.at_chunk_boundary = True

    def on_message_complete(self) -> None:
        self._complete = True
        self._transport.close()  # the replica closes it too; no need to wait
        if not self.finished.done():
            self.finished.set_result(True)

    def pause(self) -> None:
        with contextlib.suppress(Exception):
            self._transport.pause_reading()

    def resume(self) -> None:
        with contextlib.suppress(Exception):
            self._transport.resume_reading()

    def abandon(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        if not self.finished.done():
            self.finished.set_result(False)


def _client_head(head: bytes) -> bytes:
    """The replica's response head without its `connection: close` (the client's connection stays)."""
    # Serve's request-id middleware repeats a header the app already set: keep one.
    lines = head[: -len(b"\r\n\r\n")].split(b"\r\n")
    kept = dict.fromkeys(line for line in lines if not line.lower().startswith(b"connection:"))
    return b"\r\n".join(kept) + b"\r\n\r\n"
