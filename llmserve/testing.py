"""A fake engine, shipped so users can test their apps without a model.

``FakeEngine`` answers like vLLM does in shape (OpenAI JSON and SSE) but its
text is the prompt echoed back word by word. Words that start with ``fail:``
make it fail on purpose: ``fail:start`` (before any output), ``fail:stream``
(after the first event), ``fail:client`` (a 400 the client caused);
``fail:event`` and ``fail:event400`` end the stream as vLLM does when it fails
mid-stream: an error event of its own (code 500 or 400), then ``[DONE]``. The word
``slow`` spaces a stream's events 20 ms apart, and ``open_streams`` counts the
streams being generated, so a test can see a stream stop when its client
leaves. Whole answers name the endpoint that served them (``"endpoint"``).

``InProcessHandle`` stands in for a Serve handle to such a server, so the
ingress's relay and front door can be tested without Ray.

Example::

    server = await LLMServer.create(config, engine_cls=FakeEngine)
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any, AsyncIterator

from llmserve import metrics
from llmserve.config import LLMConfig
from llmserve.engine import Endpoint, EngineOutput
from llmserve.errors import BadRequestError, ModelNotFoundError


class FakeEngine:
    def __init__(self, config: LLMConfig):
        self._model_id = config.model_id
        self.started = False
        self.open_streams = 0
        self.adapters: dict[str, str] = {}  # "base:adapter" -> its folder
        self.dead = False  # set it to make the engine die, as a killed vLLM engine core does

    async def start(self) -> None:
        self.started = True

    async def generate(self, endpoint: Endpoint, body: dict[str, Any]) -> EngineOutput:
        if self.dead:
            raise RuntimeError("fake engine is dead")
        if ":" in body.get("model", "") and body["model"] not in self.adapters:
            raise ModelNotFoundError(f"The model `{body['model']}` does not exist.", param="model")
        words = _prompt_text(endpoint, body).split()[: int(body.get("max_tokens") or 16)]
        metrics.engine_tokens(len(words), 0 if body.get("stream") else len(words))  # (a word is a token)
        if "fail:start" in words:
            raise RuntimeError("fake engine failure before output")
        if "fail:client" in words:
            raise BadRequestError("fake client error", param="messages")
        if body.get("stream"):
            return self._stream(endpoint, body, words)
        return json.dumps(self._response(endpoint, body, " ".join(words), len(words))).encode()

    async def _stream(self, endpoint: Endpoint, body: dict[str, Any], words: list[str]) -> AsyncIterator[str]:
        pause = 0.02 if "slow" in words else 0.0
        self.open_streams += 1
        try:
            for index, word in enumerate(words):
                if self.dead:
                    raise RuntimeError("fake engine died mid-stream")
                if word == "fail:stream" and index > 0:
                    raise RuntimeError("fake engine failure mid-stream")
                if word in ("fail:event", "fail:event400") and index > 0:
                    code = 400 if word == "fail:event400" else 500
                    error = {"message": f"fake engine error event {code}", "type": "BadRequestError" if code == 400 else "InternalServerError", "param": None, "code": code}
                    yield f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n"
                    return
                chunk = {"id": body["request_id"], "model": body["model"], "choices": [_choice(endpoint, word, delta=True)]}
                metrics.engine_tokens(0, 1)
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(pause)
            yield "data: [DONE]\n\n"
        finally:
            self.open_streams -= 1

    def _response(self, endpoint: Endpoint, body: dict[str, Any], text: str, tokens: int) -> dict[str, Any]:
        return {
            "id": body["request_id"],
            "object": "chat.completion" if endpoint == "chat" else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [_choice(endpoint, text, delta=False)],
            "usage": {"prompt_tokens": tokens, "completion_tokens": tokens, "total_tokens": 2 * tokens},
            "endpoint": endpoint,  # not OpenAI's: lets a test see which endpoint a path reached
        }

    async def model_cards(self) -> list[dict[str, Any]]:
        return [{"id": self._model_id, "object": "model", "owned_by": "llmserve", "created": 0}]

    async def api_schema(self) -> dict[str, Any]:
        text = {"type": "object", "properties": {"model": {"type": "string"}, "prompt": {"type": "string"}}}
        post = {"requestBody": {"content": {"application/json": {"schema": text}}}, "responses": {"200": {"description": "ok"}, "422": {"description": "x"}}}
        return {"paths": {"/v1/completions": {"post": post}}, "components": {"schemas": {}}}

    async def check_health(self) -> None:
        if not self.started or self.dead:
            raise RuntimeError("not started" if not self.started else "dead")

    def is_dead(self) -> bool:
        return self.dead

    def continues_streams_of(self, endpoint: Endpoint) -> None:
        return None  # its events carry no token ids
    async def load_adapter(self, model_name: str, local_dir: str) -> None:
        self.adapters[model_name] = local_dir

    async def unload_adapter(self, model_name: str) -> None:
        self.adapters.pop(model_name, None)

    async def stats(self) -> dict[str, float]:
        return {"requests_in_engine": self.open_streams, "requests_aborted": 0, "engine_running": self.open_streams, "engine_waiting": 0, "kv_cache_usage": 0.0}

    def shutdown(self) -> None:
        self.started = False


class LeaseCall:
    """What ``handle.options(stream=True).reserve.remote()`` returns in Serve, over a local generator."""

    def __init__(self, items):
        self._items = items
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._items.__anext__()

    def cancel(self):
        self.cancelled = True
        asyncio.ensure_future(self._items.aclose())


class InProcessHandle:
    """A stand-in for an ``LLMServer`` deployment handle: the calls the ingress makes
    (leases, model cards), answered by a server object in this process.

    With ``max_ongoing_requests`` it admits as Serve does: at most that many
    leases open at once, the rest wait in order (the ingress bounds that line).
    Given several servers, it places leases on them in turn, as replicas.

    Example::

        relay = ReplicaRelay(InProcessHandle(await LLMServer.create(config, engine_cls=FakeEngine)))
    """

    def __init__(self, server, max_ongoing_requests: int = 0):
        self._servers = list(server) if isinstance(server, (list, tuple)) else [server]
        self._server = self._servers[0]  # model cards and schemas: every replica has the same
        self._turn = 0
        self.leases = []
        self._slots = asyncio.Semaphore(max_ongoing_requests) if max_ongoing_requests else None
        self.queued = 0  # leases waiting for a slot
        self.open = 0  # leases holding one

    def options(self, **_):
        return self

    def _reserve(self, owner=None, prefer=None):
        self.leases.append(LeaseCall(self._admitted(prefer)))
        return self.leases[-1]

    async def _admitted(self, prefer=None):
        # A preferred replica (named by the id its leases carry) gets the lease, as
        # affinity.LeaseRouter offers it; else the replicas take turns.
        ids = [f"replica-{index}" for index in range(len(self._servers))]
        if prefer in ids:
            index = ids.index(prefer)
        else:
            index = self._turn % len(self._servers)
            self._turn += 1
        server = self._servers[index]
        if self._slots is not None:
            self.queued += 1
            try:
                await self._slots.acquire()
            finally:
                self.queued -= 1
            self.open += 1
        try:
            async for url, admission, _ in server.reserve():
                yield url, admission, ids[index]
        finally:
            if self._slots is not None:
                self.open -= 1
                self._slots.release()

    @property
    def reserve(self):
        return SimpleNamespace(remote=self._reserve)

    @property
    def model_cards(self):
        return SimpleNamespace(remote=self._server.model_cards)

    @property
    def api_schema(self):
        return SimpleNamespace(remote=self._server.api_schema)


def _prompt_text(endpoint: Endpoint, body: dict[str, Any]) -> str:
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadRequestError("messages must be a list", param="messages")
        return " ".join(str(message.get("content", "")) for message in messages)
    return str(body.get("prompt", ""))


def _choice(endpoint: Endpoint, text: str, *, delta: bool) -> dict[str, Any]:
    if endpoint == "chat":
        key = "delta" if delta else "message"
        return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": None if delta else "stop"}
    return {"index": 0, "text": text, "finish_reason": None if delta else "stop"}


def strand_on(relay: Any, replica_url: str) -> None:
    """Make ``relay`` hold an open lease on ``replica_url`` only, as if that replica had
    served its last request and then went away (scaled down, restarted)."""
    from llmserve.relay import _Lease

    lease = _Lease(SimpleNamespace(cancel=lambda: None))
    lease.replica_url = replica_url
    relay._in_flight = {replica_url: 0}
    relay._idle_leases = {replica_url: [lease]}
