"""The replica writes its answer straight to the client: the front door passes it the socket.

Relaying every streamed chunk through the ingress (replica → front door →
client) cost a read, a write and one more process woken per chunk. On a
small machine that hop took 15-20% of the throughput (measured against the
same replica driven directly, docs/data-path.md). So when the replica runs on
the front door's node, the front door hands it the client's socket (a file
descriptor, over a Unix socket with SCM_RIGHTS) together with the request it
already read and routed; the replica runs the request through its own HTTP
app and writes the response to the client itself, as ``vllm serve`` does.

The front door keeps the connection: it alone reads from it (the next
request, or the client leaving) and it alone writes between responses. For
the one response the replica is the writer, and it reports on the Unix
connection when the head went out (``S`` for a stream, ``H`` otherwise) and
how it ended (``K``: complete, the connection can carry the next request;
``C``: cut short, close it; ``R``: declined before writing anything, as a
replica whose engine died does, so the front door sends the request to
another replica; ``F``: a stream's continuation failed before writing, so
the front door ends the stream). The front door sends ``X`` when the client left,
which aborts the request in the engine. A Unix connection that just closes
means the front door itself died (its ingress replica was killed): the
replica then finishes the answer on its own copy of the socket, watches the
client itself, and closes the connection after it, so a stream outlives
the ingress that routed it.

Streams can also outlive the replica that writes them (``migration.py``):
with the socket comes the write end of a pipe, where the replica describes
each write before it makes it, and a request may continue a stream the
client already has the head of (``continues`` in the handed-over head).

Replicas listen on an abstract Unix socket named after their Ray node and HTTP
address, so only processes of that node (in its network namespace) can reach
it; a replica on another node is not found and the front door splices bytes
over TCP instead.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import struct
import termios
from typing import Any, Optional

from llmserve.errors import RETRY_ELSEWHERE_HEADER
from llmserve.migration import Delivered
from llmserve.responses import MARK_KEY

logger = logging.getLogger(__name__)

_PREFIX = struct.Struct("!II")  # head length, body length
HEAD_SENT = b"H"
STREAM_HEAD_SENT = b"S"
COMPLETE = b"K"
CUT_SHORT = b"C"
CLIENT_LEFT = b"X"
DECLINED = b"R"
CONTINUATION_FAILED = b"F"
# Room for the lines that describe a stream's writes (about 20 bytes a token);
# a stream whose lines do not fit is not continued if its replica dies.
PROGRESS_PIPE_BYTES = 1024 * 1024
# Where Linux's struct tcp_info holds tcpi_bytes_acked (a u64, since Linux 4.1).
_TCP_INFO_BYTES_ACKED = 120
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Payload Too Large", 500: "Internal Server Error"}


def address_for(host: str, port: int) -> str:
    """The abstract Unix socket of the replica on this Ray node whose HTTP server is at host:port.

    The name holds the node's id, so a front door finds only replicas of its own
    node, even where several Ray nodes share one machine (and its abstract
    socket names): one on another node gets its bytes spliced over TCP.
    """
    return f"\0llmserve-handoff-{_this_node()}-{host}:{port}"


_ray_node_id: Optional[str] = None  # a process stays on its node: asked once


def _this_node() -> str:
    global _ray_node_id
    if _ray_node_id is None:
        try:
            import ray

            if ray.is_initialized():
                _ray_node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # outside Ray: this process's machine is the node
            pass
    return _ray_node_id or "local"


class HandoffListener:
    """In the replica: takes client sockets from front doors and answers on them with ``app``."""

    def __init__(self, app: Any, address: str):
        self._app = app
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind(address)
        self._socket.listen(4096)
        self._socket.setblocking(False)
        self._tasks: set[asyncio.Task] = set()
        self.taken = 0  # requests received with their client's socket
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(self._socket)
            task = loop.create_task(self._serve(connection))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, connection: socket.socket) -> None:
        client: Optional[socket.socket] = None
        try:
            fds, head, body = await _receive_request(connection)
            if not 1 <= len(fds) <= 2:
                for fd in fds:
                    socket.close(fd)
                return
            client = socket.socket(fileno=fds[0])
            client.setblocking(False)
            self.taken += 1
            answer = _Answer(client, connection, fds[1] if len(fds) == 2 else None, continues=bool(head.get("continues")))
            try:
                await self._app(_scope(head), answer.receive(body), answer.send)
                answer.finish()
            finally:
                await answer.stop_watching()
                answer.close_progress()
        except Exception as exc:  # a broken handoff: the front door closes the client connection
            logger.debug("handoff ended early: %r", exc)
            with contextlib.suppress(OSError):
                connection.send(CUT_SHORT)
        finally:
            if client is not None:
                client.close()  # our duplicate only; the front door keeps the connection
            connection.close()

    def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._socket.close()


async def _receive_request(connection: socket.socket) -> tuple[list[int], dict[str, Any], bytes]:
    loop = asyncio.get_running_loop()
    while True:
        try:
            prefix, fds, _, _ = socket.recv_fds(connection, _PREFIX.size, 2)
            break
        except BlockingIOError:
            await _readable(connection)
    if len(prefix) != _PREFIX.size:
        raise ConnectionError("the front door hung up before its request")
    head_size, body_size = _PREFIX.unpack(prefix)
    rest = bytearray()
    while len(rest) < head_size + body_size:
        chunk = await loop.sock_recv(connection, head_size + body_size - len(rest))
        if not chunk:
            raise ConnectionError("the front door hung up mid-request")
        rest += chunk
    return fds, json.loads(rest[:head_size]), bytes(rest[head_size:])


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _scope(head: dict[str, Any]) -> dict[str, Any]:
    target = head["path"].encode("latin-1")
    path, _, query = target.partition(b"?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": head["method"],
        "scheme": "http",
        "path": path.decode("latin-1"),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": [(name.encode("latin-1"), value.encode("latin-1")) for name, value in head["headers"]],
        "client": None,
        "server": None,
    }


class _Answer:
    """One response written to the client's socket: HTTP/1.1 framing, then a report to the front door."""

    def __init__(self, client: socket.socket, front_door: socket.socket, progress: Optional[int] = None, continues: bool = False):
        self._client = client
        self._front_door = front_door
        self._progress = progress  # the pipe where each write is described before it is made
        self._continues = continues  # the client has this stream's head: write only its events
        self._failed = False  # a continuation answered with an error: the front door ends the stream
        self._head = b""
        self._chunked = False
        self._streaming = False
        self._reported_head = False
        self._done = False
        self._declined = False  # the answer is "send it elsewhere": nothing goes to the client
        loop = asyncio.get_running_loop()
        # The front door sends one byte more, CLIENT_LEFT, if the client leaves;
        # an end without it means the front door is gone, not the client.
        self._front_door_word = loop.create_task(loop.sock_recv(front_door, 1))
        self.orphaned = False  # the front door died while this answer was being written

    def receive(self, body: bytes):
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self._client_gone()
            return {"type": "http.disconnect"}

        return receive

    async def _client_gone(self) -> None:
        """Returns when the client has left: the front door says so, or, once it died, the socket does."""
        try:
            word = await asyncio.shield(self._front_door_word)
        except OSError:
            word = b""
        if word:
            return
        self.orphaned = True
        logger.info("the front door went away mid-answer; the replica finishes it and closes the connection")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while await loop.sock_recv(self._client, 4096):
                pass  # a request pipelined behind this one: nobody is left to route it

    async def stop_watching(self) -> None:
        # Awaited, so the socket's reader is unregistered before the socket closes.
        self._front_door_word.cancel()
        with contextlib.suppress(BaseException):
            await self._front_door_word

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers", []))
            names = {name.lower() for name, _ in headers}
            if RETRY_ELSEWHERE_HEADER.encode() in names and not self.orphaned:
                self._declined = True
                return
            if self._continues:
                self._failed = status != 200 or not any(
                    name.lower() == b"content-type" and value.startswith(b"text/event-stream") for name, value in headers
                )
                self._chunked = self._streaming = True
                return
            self._chunked = b"content-length" not in names
            self._streaming = any(
                name.lower() == b"content-type" and value.startswith(b"text/event-stream") for name, value in headers
            )
            lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Status").encode())]
            lines += [name + b": " + value for name, value in headers]
            if self._chunked:
                lines.append(b"transfer-encoding: chunked")
            self._head = b"\r\n".join(lines) + b"\r\n\r\n"
            return
        if message["type"] != "http.response.body" or self._declined or self._failed:
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        data = self._head
        self._head = b""
        if self._chunked:
            if body:
                data += b"%x\r\n%s\r\n" % (len(body), body)
            if not more:
                data += b"0\r\n\r\n"
        else:
            data += body
        if data:
            if self._progress is not None:
                self._describe(len(data), message.get(MARK_KEY) or b"{}", more)
            await asyncio.get_running_loop().sock_sendall(self._client, data)
        if not self._reported_head:
            self._reported_head = True
            with contextlib.suppress(OSError):  # a front door that died hears nothing
                self._front_door.send(STREAM_HEAD_SENT if self._streaming else HEAD_SENT)
        if not more:
            self._done = True

    def _describe(self, size: int, mark: bytes, more: bool) -> None:
        """One line on the pipe for the write about to be made: its size, its tokens (migration.py)."""
        if not more:  # the answer's last write: a client that has it has everything
            mark = mark[:-1] + (b',"e":1}' if mark != b"{}" else b'"e":1}')
        line = b"%d %s\n" % (size, mark)
        try:
            described = os.write(self._progress, line)
        except OSError:  # full, or the front door is gone
            described = -1
        if described != len(line):
            self.close_progress()  # the lines now fall short of the bytes: the stream is not continued

    def close_progress(self) -> None:
        if self._progress is not None:
            os.close(self._progress)
            self._progress = None

    def finish(self) -> None:
        if self._declined:
            report = DECLINED
        elif self._failed:
            report = CONTINUATION_FAILED
        else:
            report = COMPLETE if self._done else CUT_SHORT
        with contextlib.suppress(OSError):  # an orphaned answer has no one to report to
            self._front_door.send(report)


class HandoffCall:
    """In the front door: one request handed to a replica, and how it ended."""

    def __init__(self, connection: socket.socket, client: socket.socket, progress: Optional[int], sent_before: Optional[int]):
        self._connection = connection
        self._client = client
        self._progress = progress  # the pipe's read end, read only if the answer is cut short
        self._sent_before = sent_before  # bytes in the client's socket before the replica wrote any
        self.head_sent = False
        self.streaming = False

    @classmethod
    async def start(
        cls, address: str, client: socket.socket, head: dict[str, Any], body: bytes, reports_progress: bool = False
    ) -> "HandoffCall":
        """Connect to the replica at ``address`` and give it the client's socket and the request
        (and, with ``reports_progress``, a pipe to describe its writes on).

        Raises OSError when no replica listens there (another node, or gone).
        """
        loop = asyncio.get_running_loop()
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.setblocking(False)
        read_end = write_end = sent_before = None
        try:
            await loop.sock_connect(connection, address)
            if reports_progress:
                read_end, write_end = _progress_pipe()
                sent_before = bytes_sent(client)
            head_bytes = json.dumps(head).encode()
            fds = [client.fileno()] + ([write_end] if write_end is not None else [])
            # A fresh Unix connection has room for these 8 bytes, so this send does not block.
            socket.send_fds(connection, [_PREFIX.pack(len(head_bytes), len(body))], fds)
            await loop.sock_sendall(connection, head_bytes + body)
        except BaseException:
            connection.close()
            if read_end is not None:
                os.close(read_end)
            raise
        finally:
            if write_end is not None:
                os.close(write_end)  # the replica has its own copy now
        return cls(connection, client, read_end, sent_before)

    async def finished(self) -> bytes:
        """Wait for the replica's answer to end: COMPLETE, CUT_SHORT, DECLINED (nothing written)
        or CONTINUATION_FAILED (nothing written of a continuation)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                reports = await loop.sock_recv(self._connection, 16)
                if not reports:
                    return CUT_SHORT  # the replica went away
                for report in reports:
                    report = bytes([report])
                    if report in (HEAD_SENT, STREAM_HEAD_SENT):
                        self.head_sent, self.streaming = True, report == STREAM_HEAD_SENT
                    elif report in (COMPLETE, CUT_SHORT, DECLINED, CONTINUATION_FAILED):
                        return report
        except OSError:
            return CUT_SHORT
        finally:
            # After the cancelled read's clean-up (which runs first): that unregisters the socket.
            loop.call_soon(self._connection.close)

    def delivered(self) -> Optional[Delivered]:
        """What the client got of the replica's writes, as far as its pipe and the socket tell;
        None without a pipe. Call it once the answer ended."""
        if self._progress is None:
            return None
        lines = bytearray()
        with contextlib.suppress(OSError):  # BlockingIOError: all there is
            while chunk := os.read(self._progress, 65536):
                lines += chunk
        sent_now = bytes_sent(self._client)
        if sent_now is None or self._sent_before is None:
            return Delivered(exact=False)
        return Delivered.of(bytes(lines), sent_now - self._sent_before)

    def close(self) -> None:
        if self._progress is not None:
            os.close(self._progress)
            self._progress = None

    def abandon(self) -> None:
        """The client left: telling the replica stops the request."""
        with contextlib.suppress(OSError):
            self._connection.send(CLIENT_LEFT)
            self._connection.shutdown(socket.SHUT_RDWR)


def _progress_pipe() -> tuple[int, int]:
    # Non-blocking at both ends: a replica never waits for room to describe a write.
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # past the user's pipe quota: the default 64 KiB
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PROGRESS_PIPE_BYTES)
    return read_end, write_end


def bytes_sent(sock: socket.socket) -> Optional[int]:
    """Every byte written into this TCP socket so far, by any process: those the peer
    acknowledged plus those still queued (both the kernel's); None where it cannot tell."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        queued = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, queued)
    except OSError:
        return None
    if len(info) < _TCP_INFO_BYTES_ACKED + 8:
        return None
    return struct.unpack_from("Q", info, _TCP_INFO_BYTES_ACKED)[0] + queued[0]
