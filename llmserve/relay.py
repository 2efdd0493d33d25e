"""The byte path from the ingress to a model replica: no Ray object per token.

Serve still decides *which* replica serves a request: the ingress opens a
lease, a streaming Serve call (``LLMServer.reserve``) that Serve routes,
counts against ``max_ongoing_requests`` and reports to the autoscaler like
any other call. The lease's only item is the URL of the chosen replica's own
HTTP server; the ingress then sends the request body there and relays the
response bytes to its client as they arrive. The lease ends when that HTTP
request does. Per request this is one small Ray call, made ahead of time (a
spare lease waits for the next request) so it adds nothing to time to first
token; per token it is a socket read and a socket write, where a Ray object
per chunk cost the engine a large share of a small machine's CPU (see
docs/data-path.md).

Both ends live here: ``ReplicaRelay`` is the ingress's backend for one
model, ``ReplicaDataPlane`` the replica's HTTP server and its leases.

Example::

    router = ModelRouter({"qwen": ReplicaRelay(handle)})      # in the ingress
    data_plane = ReplicaDataPlane(build_http_app(local_router)) # in the replica
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from typing import Any, AsyncIterator, Optional

from starlette.responses import Response, StreamingResponse

from llmserve.responses import REQUEST_ID_HEADER, SSE_DONE, ApiRequest, backend_failure, error_response

logger = logging.getLogger(__name__)

LEASE_HEADER = "x-llmserve-lease"
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}
# A spare lease is given back by the ingress after SPARE_LEASE_IDLE_S; one
# whose HTTP request never arrives (the ingress died) is given up by the
# replica after LEASE_CLAIM_TIMEOUT_S, so it neither counts as load forever
# nor holds up the replica's graceful shutdown.
SPARE_LEASE_IDLE_S = 2.0
LEASE_CLAIM_TIMEOUT_S = 5.0
# The replica keeps idle connections open longer than the ingress reuses
# them, so the ingress never sends on a connection the replica is closing.
REPLICA_KEEP_ALIVE_S = 75
INGRESS_KEEP_ALIVE_S = 15


class ReplicaRelay:
    """The ingress's backend for one model: lease a replica through Serve, relay its bytes."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._lease_handle = handle.options(stream=True)
        self._session: Any = None  # made on first use, inside the serving event loop
        self._spare: Optional[asyncio.Task] = None

    async def respond(self, request: ApiRequest) -> Response:
        try:
            lease, replica_url, lease_id = await self._take_lease()
        except Exception as exc:
            return error_response(backend_failure(exc, request.request_id), request.request_id)
        try:
            upstream = await self._client().post(
                replica_url + ENDPOINT_PATHS[request.endpoint],
                data=request.raw_body,
                headers={"content-type": "application/json", REQUEST_ID_HEADER: request.request_id, LEASE_HEADER: lease_id},
            )
        except Exception as exc:
            lease.cancel()
            return error_response(backend_failure(exc, request.request_id), request.request_id)
        # The next request's lease is opened now that this one's first token
        # is on its way: a Ray call made earlier competes with it for the CPU.
        if self._spare is None:
            self._open_spare()
        headers = {REQUEST_ID_HEADER: request.request_id}
        if upstream.content_type != "text/event-stream":
            try:
                body = await upstream.read()
            except Exception as exc:
                return error_response(backend_failure(exc, request.request_id), request.request_id)
            finally:
                upstream.release()
                _finish_in_background(lease)
            return Response(body, status_code=upstream.status, media_type=upstream.content_type, headers=headers)
        return StreamingResponse(
            self._relayed(upstream, lease, request.request_id),
            status_code=upstream.status,
            media_type="text/event-stream",
            headers=headers,
        )

    async def _take_lease(self) -> tuple[Any, str, str]:
        """A lease for this request; the one opened ahead is usually ready, so no Ray call waits here."""
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                return await spare
            except Exception:  # e.g. that replica went away since: ask Serve again
                pass
        return await self._open_lease()

    def _open_spare(self) -> None:
        # The spare counts as one ongoing request on its replica until used,
        # so it is dropped when no request comes for a while: an idle model
        # shows no load to the autoscaler.
        spare = self._spare = asyncio.ensure_future(self._open_lease())
        asyncio.get_running_loop().call_later(SPARE_LEASE_IDLE_S, self._drop_spare, spare)

    def _drop_spare(self, spare: asyncio.Task) -> None:
        if self._spare is not spare:
            return  # already taken by a request
        self._spare = None
        if not spare.done():
            spare.cancel()
        elif spare.exception() is None:
            spare.result()[0].cancel()

    async def _open_lease(self) -> tuple[Any, str, str]:
        lease = self._lease_handle.reserve.remote(uuid.uuid4().hex)
        try:
            replica_url, lease_id = await anext(lease)
        except BaseException:
            lease.cancel()
            raise
        return lease, replica_url, lease_id

    async def _relayed(self, upstream: Any, lease: Any, request_id: str) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
            finished = True
        except Exception as exc:  # the replica went away mid-stream; the client gets a clean end
            finished = True
            error = backend_failure(exc, request_id)
            yield (error.to_sse_event() + SSE_DONE).encode()
        finally:
            # An unfinished relay means our client left: closing the connection
            # is what tells the replica (and so the engine) to stop.
            if finished:
                upstream.release()
            else:
                upstream.close()
            _finish_in_background(lease)

    def _client(self) -> Any:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=INGRESS_KEEP_ALIVE_S),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
            )
        return self._session

    async def model_cards(self) -> list[dict[str, Any]]:
        return await self._handle.model_cards.remote()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


_lease_endings: set[asyncio.Task] = set()


def _finish_in_background(lease: Any) -> None:
    """Read the lease to its end (the replica closes it when the HTTP request ends)."""

    async def finish() -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async for _ in lease:
                pass

    task = asyncio.create_task(finish())
    _lease_endings.add(task)  # asyncio keeps only weak references to tasks
    task.add_done_callback(_lease_endings.discard)


class _Lease:
    def __init__(self) -> None:
        self.claimed = asyncio.Event()
        self.done = asyncio.Event()


class ReplicaDataPlane:
    """A replica's own HTTP server (uvicorn, on a free port of its node) and the leases on it."""

    def __init__(self, app: Any):
        self._app = app
        self._leases: dict[str, _Lease] = {}
        self._url: Optional[str] = None
        self._server: Any = None
        self._starting = asyncio.Lock()

    async def url(self) -> str:
        """The server's base URL, starting it on first use."""
        async with self._starting:
            if self._url is None:
                self._url = await self._start()
        return self._url

    async def hold(self, lease_id: str) -> AsyncIterator[tuple[str, str]]:
        """Yield (URL, lease id) once, then wait for that lease's HTTP request to end."""
        url = await self.url()
        lease = self._leases[lease_id] = _Lease()
        try:
            yield url, lease_id
            try:
                await asyncio.wait_for(lease.claimed.wait(), LEASE_CLAIM_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("lease %s was never used; releasing it", lease_id)
                return
            await lease.done.wait()
        finally:
            self._leases.pop(lease_id, None)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        lease = None
        if scope["type"] == "http":
            lease_id = dict(scope["headers"]).get(LEASE_HEADER.encode(), b"").decode()
            lease = self._leases.get(lease_id)
        if lease is not None:
            lease.claimed.set()
        try:
            await self._app(scope, receive, send)
        finally:
            if lease is not None:
                lease.done.set()

    async def _start(self) -> str:
        import uvicorn

        host = _node_ip()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        config = uvicorn.Config(
            self,
            lifespan="off",
            access_log=False,
            log_config=None,
            log_level="warning",
            timeout_keep_alive=REPLICA_KEEP_ALIVE_S,
            backlog=4096,
        )
        server = uvicorn.Server(config)
        # Signals belong to Ray's worker process, not to this server.
        server.capture_signals = contextlib.nullcontext
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start
                raise RuntimeError("the replica's HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self._server = server
        url = f"http://{host}:{sock.getsockname()[1]}"
        logger.info("replica data plane serving at %s", url)
        return url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: this machine only
        pass
    return "127.0.0.1"
