"""Which backend serves a request: the `model` field decides.

A backend turns an ``ApiRequest`` into an HTTP response and lists its model
cards. In production it is a ``ReplicaRelay`` (``relay.py``: a Serve handle
picks the replica, the bytes come from the replica's own HTTP server); in
process, for tests and inside each replica, it is a ``LocalBackend`` over an
``LLMServer`` object. The router itself knows no Ray and no HTTP.

Example::

    router = ModelRouter({"qwen": ReplicaRelay(handle)})
    router.resolve("qwen")        # -> ("qwen", that backend)
    router.resolve("qwen:sql")    # -> ("qwen", that backend): an adapter of qwen
    router.resolve("gpt-9")       # -> raises ModelNotFoundError (404)
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from starlette.responses import Response

from llmserve.engine import BinaryOutput
from llmserve.errors import BadRequestError, LLMServeError, ModelNotFoundError
from llmserve.responses import REQUEST_ID_HEADER, ApiRequest, backend_failure, error_response, guarded, streamed_response


class Backend(Protocol):
    async def respond(self, request: ApiRequest) -> Response: ...

    async def model_cards(self) -> list[dict[str, Any]]: ...

    async def api_schema(self) -> dict[str, Any]: ...


class ModelRouter:
    """Maps model ids to backends."""

    def __init__(self, backends: dict[str, Backend]):
        if not backends:
            raise ValueError("the router needs at least one model")
        self._backends = dict(backends)

    @property
    def model_ids(self) -> list[str]:
        return list(self._backends)

    @property
    def backends(self) -> dict[str, Backend]:
        return dict(self._backends)

    def resolve(self, model: Optional[Any]) -> tuple[str, Backend]:
        """The model id and backend for a request's `model` field."""
        if model is None:
            if len(self._backends) == 1:
                return next(iter(self._backends.items()))
            raise BadRequestError(
                f"The `model` field is required: this server serves {self.model_ids}.", param="model"
            )
        if not isinstance(model, str):
            raise BadRequestError("The `model` field must be a string.", param="model")
        base_id = model.split(":", 1)[0]
        if base_id not in self._backends:
            raise ModelNotFoundError(
                f"The model `{model}` does not exist. Available models: {self.model_ids}.", param="model"
            )
        return base_id, self._backends[base_id]


class LocalBackend:
    """An ``LLMServer`` object called in-process (no Ray, no network)."""

    def __init__(self, server: Any):
        self._server = server

    async def respond(self, request: ApiRequest) -> Response:
        if request.stream:
            progress = {"reports_progress": True, "continues": request.continues} if request.reports_progress else {}
            events = self._server.generate_stream(request.endpoint, request.body, **progress)
            return await streamed_response(guarded(events, request.request_id), request.request_id)
        try:
            result = await self._server.generate(request.endpoint, request.body)
        except Exception as exc:  # the server object itself failed, not its engine
            result = backend_failure(exc, request.request_id)
        if isinstance(result, LLMServeError):
            return error_response(result, request.request_id)
        if isinstance(result, BinaryOutput):
            return Response(result.body, media_type=result.media_type, headers={**result.headers, REQUEST_ID_HEADER: request.request_id})
        return Response(result, media_type="application/json", headers={REQUEST_ID_HEADER: request.request_id})

    async def model_cards(self) -> list[dict[str, Any]]:
        return await self._server.model_cards()

    async def api_schema(self) -> dict[str, Any]:
        return await self._server.api_schema()
