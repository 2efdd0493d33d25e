"""``OpenAiIngress``: the OpenAI-compatible HTTP front door.

It parses each request body once, picks the backend by the `model` field,
and passes bytes through: whole JSON bodies as they are, streams as the SSE
events the engine made. Every failure leaves as the OpenAI error envelope.
``build_http_app`` is a plain ASGI app (Starlette) so tests can drive it
in-process; ``OpenAiIngress`` is the same app as a Ray Serve deployment.

Example::

    app = OpenAiIngress.as_deployment().bind([llm_deployment_1, llm_deployment_2])
    serve.run(app)
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmserve.engine import Endpoint
from llmserve.errors import (
    BadRequestError,
    EngineError,
    LLMServeError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from llmserve.routing import HandleBackend, ModelRouter

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# The ingress only parses and forwards; it needs little CPU but must never be
# the queue in front of the engines.
DEFAULT_INGRESS_OPTIONS = {
    "name": "OpenAiIngress",
    "max_ongoing_requests": 4096,
    "ray_actor_options": {"num_cpus": 0},
}


def error_response(error: LLMServeError, request_id: Optional[str] = None) -> Response:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return Response(error.to_json_bytes(), status_code=error.status_code, media_type="application/json", headers=headers)


async def _read_json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    return body


def _api_endpoint(endpoint: Endpoint, router: ModelRouter):
    async def handle(request: Request) -> Response:
        request_id = request.headers.get(REQUEST_ID_HEADER)
        try:
            body = await _read_json_object(request)
            request_id = request_id or _body_request_id(body) or uuid.uuid4().hex
            model_id, backend = router.resolve(body.get("model"))
            stream = _stream_flag(body)
        except LLMServeError as error:
            return error_response(error, request_id)
        body.setdefault("model", model_id)
        body["request_id"] = request_id
        headers = {REQUEST_ID_HEADER: request_id}
        if stream:
            return await _stream(_guarded(backend.generate_stream(endpoint, body), request_id), headers)
        try:
            result = await backend.generate(endpoint, body)
        except Exception as exc:  # the replica or Ray failed, not the engine
            result = _backend_failure(exc, request_id)
        if isinstance(result, LLMServeError):
            return error_response(result, request_id)
        return Response(result, media_type="application/json", headers=headers)

    return handle


def _body_request_id(body: dict[str, Any]) -> Optional[str]:
    value = body.get("request_id")
    return value if isinstance(value, str) and value else None


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise BadRequestError("`stream` must be true or false.", param="stream")
    return stream


def _backend_failure(exc: Exception, request_id: str) -> LLMServeError:
    if type(exc).__name__ == "BackPressureError":  # Serve's queue for the model is full
        return ServiceUnavailableError(f"The model is overloaded; retry request {request_id} later.")
    logger.exception("request %s failed between the ingress and the model replica", request_id)
    return EngineError(f"The server failed to serve request {request_id}; see the server log for details.")


async def _guarded(events: AsyncIterator[Any], request_id: str) -> AsyncIterator[Any]:
    """The backend's events; a failure of the replica itself becomes one last error item."""
    started = False
    try:
        async for event in events:
            started = True
            yield event
    except Exception as exc:
        error = _backend_failure(exc, request_id)
        yield error.to_sse_event() + "data: [DONE]\n\n" if started else error
    finally:
        await events.aclose()


async def _stream(events: AsyncIterator[Any], headers: dict[str, str]) -> Response:
    # The first event decides the status: an error before any token is a plain
    # HTTP error, not a 200 stream that carries one.
    first = await anext(events, None)
    if isinstance(first, LLMServeError):
        await events.aclose()
        return error_response(first, headers[REQUEST_ID_HEADER])

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


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


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


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


def build_http_app(router: ModelRouter) -> Starlette:
    """The OpenAI HTTP API over a router, as a plain ASGI app."""
    list_models, retrieve_model = _models_endpoints(router)
    routes = [
        Route("/v1/chat/completions", _api_endpoint("chat", router), methods=["POST"]),
        Route("/v1/completions", _api_endpoint("completions", router), methods=["POST"]),
        Route("/v1/embeddings", _api_endpoint("embeddings", router), methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected_error},
    )


class OpenAiIngress:
    """The ingress deployment: one OpenAI endpoint in front of many ``LLMServer`` deployments."""

    async def __init__(self, llm_deployments: list[Any]):
        configs = await asyncio.gather(*(handle.llm_config.remote() for handle in llm_deployments))
        self._router = ModelRouter(
            {config.model_id: HandleBackend(handle) for config, handle in zip(configs, llm_deployments)}
        )

    def __serve_build_asgi_app__(self) -> Starlette:
        return build_http_app(self._router)

    @classmethod
    def as_deployment(cls, deployment_options: Optional[dict[str, Any]] = None):
        """This class as a Ray Serve ingress deployment with the given options."""
        from ray import serve

        options = {**DEFAULT_INGRESS_OPTIONS, **(deployment_options or {})}
        return serve.deployment(serve.ingress()(cls)).options(**options)
