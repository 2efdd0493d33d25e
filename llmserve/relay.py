"""The byte path from the ingress to a model replica: no Ray object per token.

Every replica of an ``LLMServer`` runs its own HTTP server with the OpenAI API
for its model (``ReplicaDataPlane``). The ingress sends each request's bytes
to one of them and relays the answer's bytes to its client as they arrive:
per token that is a socket write in the replica and a read and a write in the
ingress, where a Ray object per chunk cost the engine a large share of a
small machine's CPU (see docs/data-path.md).

Serve stays the control plane, and its admission rules hold. Every request
runs under a *lease*: a streaming Serve call (``LLMServer.reserve``) whose one
item names the replica it landed on, and the request goes to that replica.
Serve counts the lease against ``max_ongoing_requests``, queues it at this
caller when every replica is full (FIFO, up to ``max_queued_requests``, then
a 429 with ``Retry-After``) and reports running and queued ones to the
autoscaler. A finished request's lease goes to the oldest request waiting for
one, or stays open for a second for the next request to take over, so steady
traffic holds as many leases as it has requests in flight without a Ray call
per request.

Each request goes to the replica ``affinity.py`` chooses: the one most likely
to hold its prompt's prefix or its LoRA adapter (``base:adapter``) in cache,
unless it is much busier than the others, else the least busy one. It takes
an open lease there, or asks Serve for one that names that replica
(``LeaseRouter`` offers it there first); each response names its replica
(Serve's name for it, not its address) in the ``x-llmserve-replica`` header.

Example::

    router = ModelRouter({"qwen": ReplicaRelay(handle)})      # in the ingress
    data_plane = ReplicaDataPlane(build_http_app(local_router)) # in the replica
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
import weakref
from collections import Counter, deque
from typing import Any, AsyncIterator, Callable, Optional

from starlette.responses import Response, StreamingResponse

from llmserve import metrics
from llmserve.affinity import PREFER_KWARG, ROOMIEST, ReplicaCaches, Wanted, replicas_serve_runs
from llmserve.engine import ENDPOINT_PATHS
from llmserve.errors import MAX_DECLINES, RETRY_ELSEWHERE_HEADER, ReplicaUnavailableError, ServiceUnavailableError, TooManyRequestsError
from llmserve.handoff import HandoffListener, address_for
from llmserve.migration import DEFAULT_MAX_MIGRATIONS
from llmserve.placement import Admission, replica_name
from llmserve.responses import REPLICA_HEADER, REQUEST_ID_HEADER, ApiRequest, backend_failure, error_response, stream_ending

logger = logging.getLogger(__name__)

# A lease ends when the ingress cancels it at the end of its request; this
# bounds one whose ingress died without doing so.
MAX_LEASE_S = 3600.0
# A lease older than this is not taken over by another request but replaced by
# a fresh one, so Serve keeps placing them: within this time a draining replica
# gets no new requests and a new replica its share.
LEASE_RENEW_S = 5.0
# How often a replica asks whether the ingress replicas holding its leases are alive.
LEASE_OWNER_CHECK_S = 5.0
# The replica keeps idle connections open longer than the ingress reuses
# them, so the ingress never sends on a connection the replica is closing.
REPLICA_KEEP_ALIVE_S = 75
INGRESS_KEEP_ALIVE_S = 15
# A finished request's lease stays open this long for the next request on
# its replica to take over: leases follow the load without a Ray call per request.
LEASE_LINGER_S = 1.0
# A lease refused by a dying replica is asked for again, up to this many times in all.
LEASE_TRIES = 4
LEASE_RETRY_PAUSE_S = 0.25
# A request waits at most this long in line for a replica (503 then); a client that
# leaves sooner leaves the line at once.
MAX_QUEUE_WAIT_S = 600.0
# A model that may be scaled to zero is listed without its replica after this long (its
# card is then the one a replica gave before, or its id alone).
MODEL_CARDS_AT_ZERO_S = 2.0
# Headers of a replica's answer that describe its body (vLLM's binary embeddings carry `metadata`).
_ANSWER_HEADERS = {"metadata"}


class ReplicaRelay:
    """The ingress's backend for one model: hold a lease on a replica, relay its bytes there."""

    def __init__(
        self,
        handle: Any,
        admission: Admission = Admission(),
        stream_migrations: int = DEFAULT_MAX_MIGRATIONS,
        model_id: str = "",
        policy: str = "prefix",
    ):
        self._handle = handle
        self.model_id = model_id  # (what its metrics are labelled with)
        self._queue_labels = {"model": model_id, "replica": replica_name(outside_serve="local")}  # (each ingress replica has its own queue)
        self.stream_migrations = stream_migrations  # times a stream may go on at another replica (migration.py)
        self._lease_handle = handle.options(stream=True)
        self._admission = admission  # as the config says; each replica's lease then says it too
        self._session: Any = None  # made on first use, inside the serving event loop
        self._in_flight: dict[str, int] = {}  # replica URL -> this ingress's requests on it
        self.may_have_no_replica = False  # min_replicas 0: /v1/models must not wait for a cold start
        self._cards: Optional[list[dict[str, Any]]] = None  # the last ones a replica gave
        self.caches = ReplicaCaches(policy)  # what each replica likely has cached (placement)
        self._replica_ids: dict[str, str] = {}  # replica URL -> Serve's replica id (to prefer it)
        self._idle_leases: dict[str, list[_Lease]] = {}  # replica URL -> leases no request holds
        self._leasing: dict[str, int] = {}  # replica URL -> requests chosen for it, waiting for their lease
        # Requests without a lease yet, oldest first, each with the replica it waits for
        # (chosen for its cache) or None (any replica).
        self._waiting: deque[tuple[asyncio.Future, Optional[str]]] = deque()

    async def place(self, wanted: Wanted = Wanted()) -> tuple[str, Callable[[], None]]:
        """A replica URL for one request and the callable that ends its lease (call it once done).

        The request runs on the replica its lease is on. ``self.caches`` chooses
        the replica; the request takes a lease a finished request left open
        there, if any (no Ray call); else it asks Serve for one (naming that
        replica if it was chosen for its cache) and waits in line: Serve gives each replica at most
        ``max_ongoing_requests`` leases (a full one passes the lease on to
        another) and refuses past ``max_queued_requests`` waiting ones (429,
        ``TooManyRequestsError``). A lease that a request ends goes to the
        oldest request waiting for its replica, or for any.
        """
        idle = {url for url, leases in self._idle_leases.items() if leases}
        unplaced = replicas_serve_runs(getattr(self._handle, "deployment_id", None)).difference(self._replica_ids.values())
        load = self._in_flight
        if self._leasing:  # (requests still waiting for the lease of the replica chosen for them count there)
            load = {url: count + self._leasing.get(url, 0) for url, count in load.items()}
        chosen, why = self.caches.choose(load, wanted, idle, unplaced=bool(unplaced))
        lease = self._idle_leases[chosen].pop() if chosen in idle else None
        if lease is None:
            self._refuse_past_the_line()
            # Only a choice Serve could not make itself is named to it: one by cache or room, or
            # a baseline's. Else Serve places the lease (so finds replicas it has added); a new
            # prefix goes to one of those first, by its Serve id.
            named = why is not None or self.caches.policy in ("round_robin", "power_of_two")
            if named and chosen is not None:
                lease = await self._lease_for_the_chosen(chosen, why is not None, wanted)
            else:
                prefer_id = random.choice(sorted(unplaced)) if why == ROOMIEST else None
                lease = await self._lease_on_a_live_replica(None, False, prefer_id=prefer_id)
                self.caches.sent(lease.replica_url, wanted)
        else:
            self.caches.sent(chosen, wanted)
        replica_url = lease.replica_url
        self._in_flight[replica_url] = self._in_flight.get(replica_url, 0) + 1
        return replica_url, _once(lambda: self._release(lease))

    async def _lease_for_the_chosen(self, chosen: str, only_there: bool, wanted: Wanted) -> "_Lease":
        """A lease on the replica ``chosen`` for a request, which counts there while it waits.

        The requests of a burst arrive while the first ones still wait for their leases: each
        must see the others where they are going, or all choose the same roomiest (or least
        busy) replica and queue there. Should the lease land elsewhere, the request counts there.
        """
        claim = self.caches.sent(chosen, wanted)
        self._leasing[chosen] = self._leasing.get(chosen, 0) + 1
        try:
            lease = await self._lease_on_a_live_replica(chosen, only_there)
        except BaseException:
            self.caches.unsent(claim)
            raise
        finally:
            self._leasing[chosen] -= 1
            if not self._leasing[chosen]:
                del self._leasing[chosen]
        if lease.replica_url != chosen:
            self.caches.unsent(claim)
            self.caches.sent(lease.replica_url, wanted)
        return lease

    def learn_a_replica(self) -> None:
        """Open a lease now, in the background: a first burst of requests is then admitted by
        a replica's real free places, not counted as waiting while no replica is known."""
        _in_background(self._spare_lease())

    def forget(self, replica_url: str) -> None:
        """That replica refused a connection (scaled down, restarted): stop placing requests on it."""
        self._in_flight.pop(replica_url, None)
        self._replica_ids.pop(replica_url, None)
        self.caches.forget(replica_url)
        for lease in self._idle_leases.pop(replica_url, []):
            lease.cancel()

    def _refuse_past_the_line(self) -> None:
        """Refuse a request that would wait behind ``max_queued_requests`` others.

        Those waiting are in line only past the free places of the replicas
        this ingress knows: at once, each replica takes ``max_ongoing_requests``
        leases, counting those this ingress holds or keeps idle there.
        """
        admission = self._admission
        if admission.max_queued_requests < 0:
            return
        free = sum(
            max(0, admission.max_ongoing_requests - in_flight - len(self._idle_leases.get(url, ())))
            for url, in_flight in self._in_flight.items()
        )
        if len(self._waiting) - free >= admission.max_queued_requests:
            metrics.record(metrics.REJECTIONS, 1, model=self.model_id)
            raise _line_full(admission.refusal_status, admission.retry_after_s)

    async def _lease_on_a_live_replica(self, prefer: Optional[str], only_there: bool, prefer_id: Optional[str] = None) -> "_Lease":
        """A new lease; one that a dying replica refused is asked for again, a moment later:
        the replica exits at once, and Serve then places leases on the others."""
        for attempt in range(LEASE_TRIES):
            try:
                first = attempt == 0
                return await self._wait_for_lease(prefer if first else None, only_there and first, prefer_id if first else None)
            except Exception as exc:
                if not _replica_went_away(exc) or attempt == LEASE_TRIES - 1:
                    raise
                await asyncio.sleep(LEASE_RETRY_PAUSE_S * (attempt + 1))
        raise AssertionError("unreachable")

    async def _wait_for_lease(self, prefer: Optional[str], only_there: bool, prefer_id: Optional[str] = None) -> "_Lease":
        """A new lease from Serve, offered to replica ``prefer`` first, or one a finished request
        hands over first (on that replica if ``only_there``), whichever comes sooner."""
        handed_over = asyncio.get_running_loop().create_future()
        waiter = (handed_over, prefer if only_there else None)
        self._waiting.append(waiter)
        self._queue_changed()
        preferred_id = prefer_id or self._replica_ids.get(prefer or "")
        own = _Lease(self._lease_handle.reserve.remote(_this_actor(), **({PREFER_KWARG: preferred_id} if preferred_id else {})))
        learning = asyncio.ensure_future(self._learn_replica(own))
        waited = False
        try:
            await asyncio.wait([handed_over, learning], timeout=MAX_QUEUE_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
            waited = True
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            self._queue_changed()
            handed = handed_over.result() if handed_over.done() and not handed_over.cancelled() else None
            handed_over.cancel()
            learned = learning.done() and not learning.cancelled() and learning.exception() is None
            if not learned:
                learning.cancel()
                own.cancel()
            # What came and is not used (both came, or the client left) goes to the next in line.
            kept = (handed or (own if learned else None)) if waited else None
            if handed is not None and handed is not kept:
                self._recycle(handed)
            if learned and own is not kept:
                self._recycle(own)
        if handed is not None:
            return handed
        if learned:
            return own
        if learning.done():
            raise _refusal(learning.exception())
        raise ServiceUnavailableError(
            f"No replica of the model was free within {MAX_QUEUE_WAIT_S:.0f} s; retry later.", retry_after_s=1
        )

    def _queue_changed(self) -> None:
        metrics.record(metrics.QUEUED, len(self._waiting), **self._queue_labels)

    def _release(self, lease: "_Lease") -> None:
        if lease.replica_url in self._in_flight:
            self._in_flight[lease.replica_url] -= 1
        self._recycle(lease)

    def _recycle(self, lease: "_Lease") -> None:
        """A lease no request holds: to the oldest waiting request, else idle for a while."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # collected outside the serving loop: nothing to hand it to
            loop = None
        if loop is None or lease.replica_url not in self._in_flight:
            lease.cancel()
            return
        if lease.age() > LEASE_RENEW_S:
            # Serve places a fresh one: a replica being drained gets no more requests,
            # and one just started gets its share.
            lease.cancel()
            if not self._waiting:  # (those in line get the place this frees through Serve)
                _in_background(self._spare_lease())
            return
        for waiter in list(self._waiting):
            handed_over, wants = waiter
            if handed_over.done():
                self._waiting.remove(waiter)
            elif wants is None or wants == lease.replica_url:
                self._waiting.remove(waiter)
                handed_over.set_result(lease)
                return
        # Under steady traffic the next request takes this lease over, so a
        # request costs no Ray call; one nobody takes ends after LEASE_LINGER_S.
        self._idle_leases.setdefault(lease.replica_url, []).append(lease)
        loop.call_later(LEASE_LINGER_S, self._expire, lease)

    async def _spare_lease(self) -> None:
        """A new lease, opened ahead of the request that will take it (so it waits for no Ray call)."""
        spare = _Lease(self._lease_handle.reserve.remote(_this_actor()))
        try:
            await self._learn_replica(spare)
        except BaseException:
            spare.cancel()
            raise
        self._recycle(spare)

    def _expire(self, lease: "_Lease") -> None:
        idle = self._idle_leases.get(lease.replica_url or "", [])
        if lease in idle:
            idle.remove(lease)
            lease.cancel()

    async def respond(self, request: ApiRequest) -> Response:
        """The replica's answer through aiohttp: the path behind Serve's own HTTP proxy."""
        wanted = Wanted.of(request.endpoint, request.body, adapter_of(request.body))
        try:
            upstream, finished = await self._send(wanted, request)
        except Exception as exc:
            return error_response(backend_failure(exc, request.request_id), request.request_id)
        headers = {name: value for name, value in upstream.headers.items() if name.lower() in _ANSWER_HEADERS}
        headers.update({REQUEST_ID_HEADER: request.request_id, REPLICA_HEADER: upstream.headers.get(REPLICA_HEADER, "")})
        if upstream.content_type != "text/event-stream":
            try:
                body = await upstream.read()
            except Exception as exc:
                return error_response(backend_failure(exc, request.request_id), request.request_id)
            finally:
                upstream.release()
                finished()
            return Response(body, status_code=upstream.status, media_type=upstream.content_type, headers=headers)
        relayed = self._relayed(upstream, finished, request.request_id)
        # A client gone before the body starts means the relay never runs its
        # own clean-up; collecting it then still ends the lease.
        weakref.finalize(relayed, finished)
        return StreamingResponse(relayed, status_code=upstream.status, media_type="text/event-stream", headers=headers)

    async def _send(self, wanted: Wanted, request: ApiRequest) -> tuple[Any, Callable[[], None]]:
        headers = {"content-type": request.content_type, REQUEST_ID_HEADER: request.request_id, metrics.ARRIVED_HEADER: f"{time.time():.6f}"}
        path = ENDPOINT_PATHS[request.endpoint]
        import aiohttp

        for declined in range(MAX_DECLINES + 1):
            if declined:
                metrics.record(metrics.RETRIES, 1, model=self.model_id)
            replica_url, finished = await self.place(wanted)
            try:
                upstream = await self._client().post(replica_url + path, data=request.raw_body, headers=headers)
            except (OSError, aiohttp.ClientConnectionError):
                # Nothing was answered yet, so another replica can take it.
                finished()
                self.forget(replica_url)
                if declined == MAX_DECLINES:
                    raise
                continue
            if RETRY_ELSEWHERE_HEADER not in upstream.headers or declined == MAX_DECLINES:
                return upstream, finished
            upstream.release()  # the replica declined (its engine died): the next one serves
            finished()
            self.forget(replica_url)
        raise AssertionError("unreachable")

    async def _learn_replica(self, lease: "_Lease") -> str:
        """The replica a lease landed on, remembered for placing later requests."""
        replica_url, self._admission, replica_id = await anext(lease.call)
        lease.replica_url = replica_url
        self._replica_ids[replica_url] = replica_id
        self._in_flight.setdefault(replica_url, 0)
        return replica_url

    async def _relayed(self, upstream: Any, finished: Any, request_id: str) -> AsyncIterator[bytes]:
        complete = False
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
            complete = True
        except Exception as exc:  # the replica went away mid-stream; the client gets a clean end
            complete = True
            error = backend_failure(exc, request_id)
            yield stream_ending(error).encode()
        finally:
            # An incomplete relay means our client left: closing the connection
            # is what tells the replica (and so the engine) to stop.
            if complete:
                upstream.release()
            else:
                upstream.close()
            finished()

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
        if not self.may_have_no_replica:
            return await self._handle.model_cards.remote()
        try:
            self._cards = await asyncio.wait_for(self._handle.model_cards.remote(), MODEL_CARDS_AT_ZERO_S)
        except asyncio.TimeoutError:  # scaled to zero: what a replica said before, or what the config says
            pass
        return self._cards or [{"id": self.model_id, "object": "model", "created": int(time.time()), "owned_by": "llmserve"}]

    async def api_schema(self) -> dict[str, Any]:
        return await self._handle.api_schema.remote()

    async def aclose(self) -> None:
        for leases in self._idle_leases.values():
            for lease in leases:
                lease.cancel()
        self._idle_leases.clear()
        if self._session is not None:
            await self._session.close()


class _Lease:
    """One streaming ``reserve`` call, and the replica it landed on once known."""

    def __init__(self, call: Any):
        self.call = call
        self.replica_url: Optional[str] = None
        self._opened = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self._opened

    def cancel(self) -> None:
        self.call.cancel()


def _refusal(exc: BaseException) -> BaseException:
    """Serve's own full queue (``max_queued_requests`` set in ``.options()``) as the client
    hears it, with the deployment's ``backpressure_config``; other failures unchanged."""
    if type(exc).__name__ != "BackPressureError":
        return exc
    return _line_full(getattr(exc, "status_code", 503), getattr(exc, "retry_after_s", None))


def _replica_went_away(exc: BaseException) -> bool:
    """A lease failed because its replica is dying or dead, not because of the request."""
    return isinstance(exc, ReplicaUnavailableError) or _actor_gone(exc)


def _actor_gone(exc: BaseException) -> bool:
    """Ray's word that an actor died or cannot be reached (RayActorError and its kinds)."""
    return any(cls.__name__ == "RayActorError" for cls in type(exc).__mro__)


def _line_full(status_code: int, retry_after_s: Optional[float]) -> Exception:
    error_class = TooManyRequestsError if status_code == 429 else ServiceUnavailableError
    return error_class("The model's line of waiting requests is full (max_queued_requests); retry later.", retry_after_s=retry_after_s)


def adapter_of(body: dict[str, Any]) -> Optional[str]:
    """The adapter a request body names (`base:adapter`), if any."""
    model = body.get("model")
    return model.split(":", 1)[1] if isinstance(model, str) and ":" in model else None


def _once(action: Any) -> Any:
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run


def _this_actor() -> Any:
    """This process's Ray actor (an ingress replica's), to name as the owner of its leases."""
    global _own_actor
    if _own_actor is _UNKNOWN:
        try:
            import ray

            _own_actor = ray.get_runtime_context().current_actor if ray.is_initialized() else None
        except Exception:  # not an actor (a driver, a test)
            _own_actor = None
    return _own_actor


_UNKNOWN = object()
_own_actor: Any = _UNKNOWN


class _LeaseOwners:
    """In a replica: one watch per ingress actor that holds leases here, asking every
    LEASE_OWNER_CHECK_S whether it is alive; its leases end when it is not."""

    def __init__(self):
        self._deaths: dict[str, asyncio.Future] = {}

    def death_of(self, owner: Any) -> asyncio.Future:
        key = owner._actor_id.hex()
        death = self._deaths.get(key)
        if death is None:
            death = self._deaths[key] = asyncio.get_running_loop().create_future()
            _in_background(self._watch(key, owner, death))
        return asyncio.shield(death)

    async def _watch(self, key: str, owner: Any, death: asyncio.Future) -> None:
        try:
            while True:
                await asyncio.sleep(LEASE_OWNER_CHECK_S)
                try:
                    await owner.__ray_ready__.remote()
                except Exception as exc:
                    if _actor_gone(exc):
                        logger.warning("the ingress replica holding leases here died; its leases end")
                        death.set_result(None)
                        return
        finally:
            self._deaths.pop(key, None)
            if not death.done():
                death.cancel()


_background: set[asyncio.Task] = set()


def _in_background(work: Any) -> None:
    async def quietly() -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await work

    task = asyncio.ensure_future(quietly())
    _background.add(task)  # asyncio keeps only weak references to tasks
    task.add_done_callback(_background.discard)


class ReplicaDataPlane:
    """A replica's own HTTP server (uvicorn, on a free port of its node)."""

    def __init__(self, app: Any, name: str = "replica"):
        self._app = app
        self._name = name  # what answers say in x-llmserve-replica: a name, never an address
        self._url: Optional[str] = None
        self._server: Any = None
        self._handoff: Optional[HandoffListener] = None
        self._starting = asyncio.Lock()
        self._owners = _LeaseOwners()
        self.leases_held = 0
        self.leases_by_owner: Counter[str] = Counter()  # open leases by the ingress actor holding them (for faults' tests)

    async def url(self) -> str:
        """The server's base URL, starting it on first use."""
        async with self._starting:
            if self._url is None:
                self._url = await self._start()
        return self._url

    async def hold(self, owner: Any = None) -> AsyncIterator[str]:
        """Yield this server's URL once, then stay open until the caller cancels, or until
        ``owner`` (the ingress replica's actor, when there is one) is found dead: Ray does
        not end a call whose caller died, and Serve would count it for an hour."""
        url = await self.url()
        # (Watched from the start: an owner that dies before its lease is granted is seen too.)
        owner_death = self._owners.death_of(owner) if owner is not None else asyncio.get_running_loop().create_future()
        owner_key = owner._actor_id.hex() if owner is not None else "none"
        self.leases_held += 1
        self.leases_by_owner[owner_key] += 1
        try:
            yield url
            await asyncio.wait_for(owner_death, MAX_LEASE_S)
        except asyncio.TimeoutError:
            pass
        finally:
            self.leases_held -= 1
            self.leases_by_owner[owner_key] -= 1
            if not self.leases_by_owner[owner_key]:
                del self.leases_by_owner[owner_key]
            owner_death.cancel()  # (the shield only: the owner's watch goes on for its other leases)

    @property
    def handoffs_taken(self) -> int:
        """Requests that came with their client's socket (from a front door on this node)."""
        return self._handoff.taken if self._handoff is not None else 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        replica = self._name.encode()

        async def send_naming_replica(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), replica)]
            await send(message)

        await self._app(scope, receive, send_naming_replica)

    async def _start(self) -> str:
        self._server, url = await start_http_server(self, _node_ip())
        host, port = url.removeprefix("http://").rsplit(":", 1)
        try:
            self._handoff = HandoffListener(self, address_for(host, int(port)))
        except OSError as exc:  # front doors then splice this replica's answers instead
            logger.warning("replica data plane at %s takes no handed-off connections: %r", url, exc)
        logger.info("replica data plane serving at %s", url)
        return url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._handoff is not None:
            self._handoff.close()
            self._handoff = None


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: this machine only
        pass
    return "127.0.0.1"


async def start_http_server(app: Any, host: str) -> tuple[Any, str]:
    """Serve an ASGI app with uvicorn on a free port of ``host``; the server and its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    config = uvicorn.Config(
        app,
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
            raise RuntimeError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    return server, f"http://{host}:{sock.getsockname()[1]}"
