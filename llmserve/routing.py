"""Which backend serves a request: the `model` field decides.

A backend is anything with the server's three calls (``generate``,
``generate_stream``, ``model_cards``): a Ray deployment handle in production
(``HandleBackend``), a server object in-process for tests (``LocalBackend``).
The router itself knows no Ray and no HTTP.

Example::

    router = ModelRouter({"qwen": HandleBackend(handle)})
    router.resolve("qwen")        # -> that backend
    router.resolve("gpt-9")       # -> raises ModelNotFoundError (404)
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Protocol, Union

from llmserve.engine import Endpoint
from llmserve.errors import BadRequestError, LLMServeError, ModelNotFoundError


class Backend(Protocol):
    async def generate(self, endpoint: Endpoint, body: dict[str, Any]) -> Union[bytes, LLMServeError]: ...

    def generate_stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[Union[str, LLMServeError]]: ...

    async def model_cards(self) -> list[dict[str, Any]]: ...


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
    """A server object called in-process (no Ray): for tests and embedding."""

    def __init__(self, server: Any):
        self._server = server

    async def generate(self, endpoint, body):
        return await self._server.generate(endpoint, body)

    def generate_stream(self, endpoint, body):
        return self._server.generate_stream(endpoint, body)

    async def model_cards(self):
        return await self._server.model_cards()


class HandleBackend:
    """A Ray Serve deployment handle of an ``LLMServer``."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._stream_handle = handle.options(stream=True)

    async def generate(self, endpoint, body):
        return await self._handle.generate.remote(endpoint, body)

    async def generate_stream(self, endpoint, body):
        response = self._stream_handle.generate_stream.remote(endpoint, body)
        finished = False
        try:
            async for item in response:
                yield item
            finished = True
        finally:
            if not finished:
                # The client went away: stop the replica (and the engine) too.
                response.cancel()

    async def model_cards(self):
        return await self._handle.model_cards.remote()
