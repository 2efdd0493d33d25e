"""``OpenAiIngress``: the OpenAI-compatible HTTP front door.

It parses each request body once, picks the backend by the `model` field and
hands the request on; in a Serve app the backend relays the chosen replica's
response bytes as they arrive (``relay.py``), never parsing or re-encoding
them. Every failure leaves as the OpenAI error envelope.
``build_http_app`` is a plain ASGI app (Starlette) so tests can drive it
in-process; ``OpenAiIngress`` is the same app as a Ray Serve deployment.

Example::

    app = OpenAiIngress.as_deployment().bind([llm_deployment_1, llm_deployment_2])
    serve.run(app)
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Optional, Union

import pydantic
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from llmserve.auth import ApiKeyGuard, ApiKeys
from llmserve.bodies import JSON, parse_body
from llmserve.engine import API_PATHS, Endpoint
from llmserve.errors import (
    BadRequestError,
    EngineError,
    LLMServeError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
)
from llmserve.affinity import Wanted, policy_of
from llmserve.front_door import FrontDoor, HttpRequest, Upstream
from llmserve.logs import log_into_serve_replica_log
from llmserve import metrics
from llmserve.migration import CONTINUES_HEADER, DEFAULT_MAX_MIGRATIONS, PROGRESS_HEADER, Continued, resumable
from llmserve.openapi import merged_document
from llmserve.placement import Admission, replica_context
from llmserve.relay import ReplicaRelay, adapter_of, start_http_server
from llmserve.responses import REQUEST_ID_HEADER, ApiRequest, backend_failure, error_response, stream_ending
from llmserve.routing import ModelRouter
from llmserve import serve_port

logger = logging.getLogger(__name__)

# The ingress only parses and forwards; it needs little CPU but must never be
# the queue in front of the engines.
DEFAULT_INGRESS_OPTIONS = {
    "name": "OpenAiIngress",
    "max_ongoing_requests": 4096,
    "ray_actor_options": {"num_cpus": 0},
    # An ingress being replaced finishes the requests its front door took, and some may still
    # wait for a model replica: in a rolling update where the cluster cannot hold old and new
    # model replicas at once, the model has none while the new one starts (22 s here, past
    # Serve's default of 20). Killed at the deadline, their connections close unanswered. The
    # drain ends as soon as they are answered, so this is only ever waited for by stuck ones.
    "graceful_shutdown_timeout_s": 60,
}


_BOOLEAN = pydantic.TypeAdapter(bool)
# A request id is echoed in the x-request-id header: it must be a valid header value.
MAX_REQUEST_ID_CHARS = 256


def _api_endpoint(endpoint: Endpoint, router: ModelRouter):
    async def handle(request: Request) -> Response:
        request_id = request.headers.get(REQUEST_ID_HEADER)
        try:
            raw_body = await request.body()
            content_type = request.headers.get("content-type", JSON)
            body = await parse_body(content_type, raw_body)
            request_id = request_id or _body_request_id(body) or uuid.uuid4().hex
            model_id, backend = router.resolve(body.get("model"))
            stream = _stream_flag(body)
        except LLMServeError as error:
            return error_response(error, request_id)
        body.setdefault("model", model_id)
        body["request_id"] = request_id
        metrics.answering(model_id, adapter_of(body))
        # Set by a front door that handed this request over with its client's socket (migration.py).
        reports_progress = PROGRESS_HEADER in request.headers
        continued = request.headers.get(CONTINUES_HEADER)
        continues = Continued.from_header(continued) if continued else None
        return await backend.respond(ApiRequest(endpoint, body, raw_body, request_id, stream, content_type, reports_progress, continues))

    return handle


def _body_request_id(body: dict[str, Any]) -> Optional[str]:
    """The client's own id for the request, if the body names one; it travels in a header."""
    value = body.get("request_id")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_REQUEST_ID_CHARS or not value.isascii() or not value.isprintable():
        raise BadRequestError(
            f"`request_id` must be a string of at most {MAX_REQUEST_ID_CHARS} printable ASCII characters.", param="request_id"
        )
    return value


def _stream_flag(body: dict[str, Any]) -> bool:
    """The request's `stream`, read as vLLM's request types read it (pydantic's booleans:
    `true`, `"yes"`, `"1"`, a form's `"true"`...); anything else is a 400."""
    stream = body.get("stream")
    if stream is None:
        return False
    try:
        return _BOOLEAN.validate_python(stream)
    except pydantic.ValidationError as exc:
        raise BadRequestError("`stream` must be true or false.", param="stream") from exc


def _models_endpoints(router: ModelRouter):
    async def all_cards() -> list[dict[str, Any]]:
        card_lists = await asyncio.gather(*(backend.model_cards() for backend in router.backends.values()))
        return [card for cards in card_lists for card in cards]

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await all_cards()})

    async def retrieve_model(request: Request) -> Response:
        model = request.path_params["model"]
        for card in await all_cards():
            if card["id"] == model:
                return JSONResponse(card)
        return error_response(ModelNotFoundError(f"The model `{model}` does not exist.", param="model"))

    return list_models, retrieve_model


def _openapi_endpoint(router: ModelRouter):
    document: Optional[dict[str, Any]] = None  # the models of an app do not change: made once

    async def openapi(request: Request) -> Response:
        nonlocal document
        if document is None:
            model_schemas = await asyncio.gather(*(backend.api_schema() for backend in router.backends.values()))
            document = merged_document(model_schemas)
        return JSONResponse(document)

    return openapi


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _serve_healthz(request: Request) -> Response:
    return PlainTextResponse("success")


async def _serve_routes(request: Request) -> Response:
    context = replica_context()
    return JSONResponse({"/": context.app_name if context is not None else "default"})


async def _metrics(request: Request) -> Response:
    return PlainTextResponse(await metrics.exposition(), media_type="text/plain; version=0.0.4")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        return error_response(NotFoundError(f"No route for {request.method} {request.url.path}."))
    if exc.status_code == 405:
        return error_response(MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}."))
    return error_response(BadRequestError(str(exc.detail)))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s", request.url.path)
    request_id = request.headers.get(REQUEST_ID_HEADER)
    return error_response(EngineError(f"Internal error serving request {request_id or ''}".strip()), request_id)


def build_http_app(router: ModelRouter, keys: ApiKeys = ApiKeys(())) -> Starlette:
    """The OpenAI HTTP API over a router, as a plain ASGI app (behind ``keys``, if any)."""
    list_models, retrieve_model = _models_endpoints(router)
    routes = [Route(path, _api_endpoint(endpoint, router), methods=["POST"]) for path, endpoint in API_PATHS.items()]
    routes += [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
        # What Serve's proxy answers there (probes, KubeRay's among them), for a front door in its place.
        Route("/-/healthz", _serve_healthz),
        Route("/-/routes", _serve_routes),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/openapi.json", _openapi_endpoint(router), methods=["GET"]),
    ]
    # (Measured outside the key check: a refused request is an answer too.)
    middleware = [Middleware(metrics.AnswerMetrics, endpoints=API_PATHS)]
    if keys.required:
        middleware.append(Middleware(ApiKeyGuard, keys=keys))
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _unexpected_error}, middleware=middleware)


_API_ENDPOINTS = {path.encode(): endpoint for path, endpoint in API_PATHS.items()}


def front_door_route(router: ModelRouter, own_app: tuple[str, int], keys: ApiKeys = ApiKeys(())):
    """Where the front door sends each request: API calls for a served model to a replica
    of it, everything else (lists, health, errors, requests without a valid key) to the
    ingress's own app at ``own_app``."""

    async def route(request: HttpRequest) -> Upstream:
        endpoint = _API_ENDPOINTS.get(request.path.split(b"?", 1)[0]) if request.method == b"POST" else None
        if endpoint is not None and not keys.allows(request.header(b"authorization")):
            endpoint = None  # the own app answers it: 401
        if endpoint is not None:
            try:
                content_type = (request.header(b"content-type") or JSON.encode()).decode("latin-1")
                body = await parse_body(content_type, request.body)
                model_id, backend = router.resolve(body.get("model"))
                body_request_id = _body_request_id(body)
            except LLMServeError:
                pass  # the ingress's own app answers it, in the OpenAI error format
            else:
                request.labels = {"model": model_id, "adapter": adapter_of(body) or "", "endpoint": endpoint}
                if isinstance(backend, ReplicaRelay):
                    migrations = backend.stream_migrations if resumable(endpoint, body) else 0
                    wanted = Wanted.of(endpoint, body, adapter_of(body))
                    return await _to_replica(backend, request, body_request_id, wanted, migrations)
        return Upstream(*own_app)

    return route


async def _to_replica(
    relay: ReplicaRelay, request: HttpRequest, body_request_id: Optional[str], wanted: Wanted, migrations: int
) -> Upstream:
    """A replica for the request, and ``elsewhere``: another one, for a request the first could
    not serve (the front door bounds how often it asks)."""
    given_id = request.header(REQUEST_ID_HEADER.encode())
    request_id = given_id.decode("latin-1") if given_id else body_request_id or uuid.uuid4().hex
    replica_url, done = await relay.place(wanted)

    async def elsewhere() -> Upstream:
        relay.forget(replica_url)
        return await _to_replica(relay, request, body_request_id, wanted, migrations)

    def last_words() -> bytes:  # the replica died mid-stream: end the client's stream cleanly
        error = backend_failure(ConnectionError("the replica closed the stream"), request_id)
        event = stream_ending(error).encode()
        return b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event)

    host, port = replica_url.removeprefix("http://").rsplit(":", 1)
    extra_headers = [(metrics.ARRIVED_HEADER.encode(), b"%.6f" % request.arrived)]
    if not given_id:
        extra_headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
    return Upstream(host, int(port), request_id, extra_headers, done, elsewhere, last_words, hand_off=True, migrations=migrations)


def _relay_for(config: Any, handle: Any) -> ReplicaRelay:
    migrations = config.deployment_config.max_stream_migrations
    relay = ReplicaRelay(
        handle,
        Admission.of(config),
        DEFAULT_MAX_MIGRATIONS if migrations is None else migrations,
        config.model_id,
        policy_of(config.deployment_config.request_router_config),
    )
    autoscaling = config.deployment_config.autoscaling_config or {}
    if autoscaling.get("min_replicas", 1) > 0:  # (a lease would wake a deployment scaled to zero)
        relay.learn_a_replica()
    else:
        relay.may_have_no_replica = True
    return relay


def _drain_budget_s() -> float:
    """Serve's graceful_shutdown_timeout_s for this replica, less a second for the rest of the shutdown."""
    context = replica_context()
    timeout = context._deployment_config.graceful_shutdown_timeout_s if context is not None else 20.0
    return max(0.0, timeout - 1.0)


async def _unopened_front_door(router: ModelRouter, keys: ApiKeys) -> FrontDoor:
    """A front door for ``router``, with the ingress's own app (on an internal port) behind
    it for everything that is not a replica's to answer."""
    _, own_url = await start_http_server(build_http_app(router, keys), "127.0.0.1")
    own_host, own_port = own_url.removeprefix("http://").rsplit(":", 1)
    return FrontDoor(front_door_route(router, (own_host, int(own_port)), keys))


async def open_front_door(router: ModelRouter, host: str, port: int, keys: ApiKeys = ApiKeys(())) -> FrontDoor:
    """A front door for ``router`` listening on host:port (``llmserve run``: Serve runs no proxy)."""
    door = await _unopened_front_door(router, keys)
    await door.start(host, port)
    return door



class OpenAiIngress:
    """The ingress deployment: one OpenAI endpoint in front of many ``LLMServer`` deployments.

    The replica also listens itself and hands requests to model replicas or splices their
    answers (``front_door.py``): by default on Serve's HTTP port, on its node, ahead of
    Serve's proxy (``serve_port.py``); with ``front_door={"host": ..., "port": ...}`` at that
    address (``llmserve run``, where Serve runs no proxy); with ``front_door=False``
    not at all, leaving every connection to Serve's proxy.
    """

    async def __init__(
        self,
        llm_deployments: list[Any],
        front_door: Union[dict[str, Any], bool, None] = None,
        api_keys: Optional[list[str]] = None,
        llm_configs: Optional[list[Any]] = None,
    ):
        log_into_serve_replica_log()
        self._keys = ApiKeys.configured(api_keys or ())
        # build_openai_app says which config each deployment serves. Asking the deployments
        # instead (the bind pattern) waits for a replica of each, and wakes one scaled to zero.
        configs = llm_configs or await asyncio.gather(*(handle.llm_config.remote() for handle in llm_deployments))
        relays = {config.model_id: _relay_for(config, handle) for config, handle in zip(configs, llm_deployments)}
        self._router = ModelRouter(relays)
        self._door: Optional[FrontDoor] = None
        if isinstance(front_door, dict):
            self._door = await open_front_door(self._router, front_door["host"], int(front_door["port"]), self._keys)
        self._serve_port_held = False
        self._serve_port_refusal: Optional[str] = None
        self._serve_port_watch: Optional[asyncio.Task] = None
        if front_door is None:
            await self._hold_serve_port()  # (before the replica is ready: its first requests take the fast path)
            self._serve_port_watch = asyncio.create_task(self._keep_holding_serve_port())

    async def _hold_serve_port(self) -> None:
        """Take Serve's HTTP port on this node where the front door can answer all that Serve's
        proxy would, and give it back where it no longer can (serve_port.py)."""
        context = replica_context()
        if context is None:
            return
        try:
            addresses, port, refusal = await serve_port.takeover_plan(context.app_name)
            if addresses and not self._serve_port_held:
                listeners = serve_port.listen_before(addresses, port)
                if self._door is None:
                    self._door = await _unopened_front_door(self._router, self._keys)
                await self._door.start_on(listeners)
                self._serve_port_held = True
        except Exception as exc:  # an unexpected Serve, a refused bind: Serve's proxy serves, as without us
            addresses, refusal = [], f"{type(exc).__name__}: {exc}"
        if not addresses and self._serve_port_held:
            self._door.close()  # (connections already open finish on the front door)
            self._serve_port_held = False
        if refusal != self._serve_port_refusal:
            if refusal:
                logger.info("Serve's proxy keeps this node's HTTP connections: %s", refusal)
            self._serve_port_refusal = refusal

    async def _keep_holding_serve_port(self) -> None:
        while True:
            await asyncio.sleep(serve_port.RECHECK_S)
            await self._hold_serve_port()

    async def __del__(self):
        """Serve stops this replica (Ctrl-C, redeploy, scale-down): the front door takes no
        new requests, and the answers in flight finish before their leases end, so the
        model replicas drain as soon as those are done."""
        watch = getattr(self, "_serve_port_watch", None)
        if watch is not None:
            watch.cancel()
        if self._door is not None:
            left = await self._door.drain(_drain_budget_s())
            if left:
                logger.warning("%d connections were still being answered when the drain time ran out", left)
        for backend in self._router.backends.values():
            if isinstance(backend, ReplicaRelay):
                await backend.aclose()

    def __serve_build_asgi_app__(self) -> Starlette:
        return build_http_app(self._router, self._keys)

    @classmethod
    def as_deployment(cls, deployment_options: Optional[dict[str, Any]] = None):
        """This class as a Ray Serve ingress deployment with the given options."""
        from ray import serve

        options = {**DEFAULT_INGRESS_OPTIONS, **(deployment_options or {})}
        return serve.deployment(serve.ingress()(cls)).options(**options)
