"""``LLMServer``: the Ray Serve deployment that owns one engine per replica.

The ingress sends each request to a replica's own HTTP server (``relay.py``),
which answers with the same OpenAI API for this one model, and holds a lease
(``reserve``) through the deployment handle while it runs, so Serve sees
the load. ``generate`` and
``generate_stream`` are the in-process form of the same calls: every answer is
a value (bytes, SSE text, or an ``LLMServeError``), so no exception (and no
traceback) reaches a client. The engine class is a constructor argument, so
tests swap in a fake one.

Example::

    deployment = LLMServer.as_deployment(config.get_serve_options(name_prefix="vLLM:")).bind(config)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any, AsyncIterator, Optional, Union

from llmserve import autoscaling, metrics
from llmserve.coalesce import coalesced
from llmserve.config import LLMConfig
from llmserve.engine import BinaryOutput, Endpoint, Engine
from llmserve.errors import BadRequestError, EngineError, LLMServeError, ModelNotFoundError, ReplicaUnavailableError
from llmserve.adapters import AdapterStore, LoadedAdapters
from llmserve.logs import log_into_serve_replica_log, reopen_serve_replica_log
from llmserve.migration import Continued, Marked, StreamCut, StreamMarks
from llmserve.placement import Admission, replica_context, replica_name
from llmserve.relay import ReplicaDataPlane
from llmserve.responses import stream_ending

logger = logging.getLogger(__name__)

COALESCING_WINDOW_PER_STREAM_S = 0.00025
MAX_COALESCING_WINDOW_S = 0.01
# How often a replica looks at its engine; vLLM's client flags a dead engine core at once.
ENGINE_WATCH_PERIOD_S = 0.25
# A replica whose engine died waits this long for its streams to send their
# error events, then exits so that Serve starts another (not at its next health check).
DEAD_REPLICA_EXIT_DELAY_S = 0.5


def _default_engine_cls() -> type[Engine]:
    from llmserve.vllm_engine import VLLMEngine

    return VLLMEngine


def _split_at_error(text: str) -> tuple[str, Optional[str]]:
    """A write's events before vLLM's error event, and that event with what follows (or None).
    (Inside an event's JSON a quote is escaped: the pattern only matches an event's start.)"""
    at = text.find('data: {"error"')
    if at < 0:
        return text, None
    return text[:at], text[at:]


def _admission(config: LLMConfig) -> Admission:
    """This replica's admission limits: Serve's max_ongoing_requests (the bind pattern may
    have set it in `.options()`), and the line the config asks the ingress to keep."""
    context = replica_context()
    return Admission.of(config, context._deployment_config.max_ongoing_requests if context else None)


def _replica_name(model_id: str) -> str:
    import uuid

    return replica_name(outside_serve=f"{model_id}#{uuid.uuid4().hex[:8]}")


class LLMServer:
    """Serves one model on one replica; Serve scales it by replicas."""

    async def __init__(self, llm_config: Union[LLMConfig, dict], *, engine_cls: Optional[type[Engine]] = None):
        log_into_serve_replica_log()
        self._config = LLMConfig.model_validate(llm_config)
        self._active_streams = 0
        self._engine = (engine_cls or _default_engine_cls())(self._config)
        try:
            await self._engine.start()
        finally:
            reopen_serve_replica_log()  # vLLM's logging set-up closed it (logs.py)
        self._adapters = self._adapter_set()
        self._data_plane = ReplicaDataPlane(self._own_http_app(), _replica_name(self._config.model_id))
        self._admission = _admission(self._config)
        self._watch = asyncio.get_running_loop().create_task(self._exit_when_the_engine_dies())

    def _adapter_set(self) -> Optional[LoadedAdapters]:
        lora = self._config.lora_config
        if lora is None or not lora.dynamic_lora_loading_path:
            return None
        store = AdapterStore(lora)
        return LoadedAdapters(self._config.model_id, store, self._engine, lora.max_num_adapters_per_replica, lora.max_lora_rank)

    def _own_http_app(self):
        from llmserve.ingress import build_http_app
        from llmserve.routing import LocalBackend, ModelRouter

        return build_http_app(ModelRouter({self._config.model_id: LocalBackend(self)}))

    @classmethod
    async def create(cls, llm_config: Union[LLMConfig, dict], *, engine_cls: Optional[type[Engine]] = None) -> "LLMServer":
        """A started server outside Ray Serve (tests, notebooks): ``await LLMServer.create(config)``."""
        server = cls.__new__(cls)
        await server.__init__(llm_config, engine_cls=engine_cls)
        return server

    @classmethod
    def as_deployment(cls, deployment_options: Optional[dict[str, Any]] = None):
        """This class as a Ray Serve deployment with the given options."""
        from ray import serve

        return serve.deployment(cls).options(**(deployment_options or {}))

    @property
    def engine(self) -> Engine:
        return self._engine

    async def llm_config(self) -> LLMConfig:
        return self._config

    async def model_cards(self) -> list[dict[str, Any]]:
        """The base model's card and one per adapter under the LoRA path (``base:name``)."""
        cards = await self._engine.model_cards()
        if self._adapters is not None:
            listed = {card["id"] for card in cards}
            base = next((card for card in cards if card["id"] == self._config.model_id), {"object": "model"})
            for name in await self._adapters.store.names():
                model_name = f"{self._config.model_id}:{name}"
                if model_name not in listed:
                    cards.append({**base, "id": model_name, "root": name, "parent": self._config.model_id})
        return cards

    async def api_schema(self) -> dict[str, Any]:
        """The OpenAPI operations of this model's endpoints (openapi.py)."""
        return await self._engine.api_schema()

    async def reserve(self, owner: Any = None, prefer: Optional[str] = None) -> AsyncIterator[tuple[str, Admission, str]]:
        """A lease: this replica's HTTP URL, admission limits and Serve id, then open (one
        ongoing request to Serve) until cancelled, or until ``owner`` (the ingress actor)
        dies. ``prefer`` is for Serve's router (``affinity.LeaseRouter``), not for us."""
        if self._engine.is_dead():
            raise self._unavailable()
        context = replica_context()
        replica_id = context.replica_id.unique_id if context is not None else ""
        async for url in self._data_plane.hold(owner):
            yield url, self._admission, replica_id

    async def generate(self, endpoint: Endpoint, body: dict[str, Any]) -> Union[bytes, BinaryOutput, LLMServeError]:
        """A whole (non-streaming) response body, or the error to send instead."""
        try:
            async with self._adapter_for(body):
                output = await self._engine.generate(endpoint, body)
            if not isinstance(output, (bytes, BinaryOutput)):
                raise TypeError(f"the engine streamed a request sent without stream: {body.get('stream')!r}")
            return output
        except Exception as exc:
            return self._as_client_error(exc, body)

    async def generate_stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, reports_progress: bool = False, continues: Optional[Continued] = None
    ) -> AsyncIterator[Union[str, Marked, LLMServeError]]:
        """SSE events; a failure before the first event is yielded as the error itself.

        With ``reports_progress`` (a front door on this node asks), each write
        carries its tokens for the front door, so another replica can continue
        the stream if this one dies (``migration.py``); ``continues`` names the
        stream this request continues.
        """
        marks = None
        if reports_progress:
            marks = StreamMarks.for_request(endpoint, body, continues=continues, context_length=self._engine.continues_streams_of(endpoint))
        async with contextlib.AsyncExitStack() as adapter_held:
            try:
                await adapter_held.enter_async_context(self._adapter_for(body))
                output = await self._engine.generate(endpoint, marks.engine_body() if marks else body)
            except Exception as exc:
                yield self._as_client_error(exc, body)
                return
            if isinstance(output, bytes):  # an engine that does not stream this endpoint
                yield f"data: {output.decode()}\n\ndata: [DONE]\n\n"
                return
            self._active_streams += 1
            try:
                first = True
                async for event in coalesced(output, self._coalescing_window):
                    if first and event.startswith('data: {"error"') and self._engine.is_dead():
                        # vLLM ends its streams with an error event when the engine dies;
                        # before anything was sent, another replica can serve it instead.
                        yield self._unavailable()
                        return
                    first = False
                    if marks is None:
                        shown, error_tail = _split_at_error(event)
                    else:
                        marked = marks.mark(event)
                        shown, error_tail = marked, marks.error_tail
                        if error_tail is not None and self._engine.is_dead():
                            yield marked
                            raise StreamCut()  # the front door continues the stream elsewhere
                    if error_tail is None:
                        yield shown
                        continue
                    if shown:
                        yield shown
                    yield self._ending_after(error_tail, body)
                    return
            except StreamCut:
                raise
            except Exception as exc:
                yield stream_ending(self._failed_mid_stream(body, exc))
            finally:
                self._active_streams -= 1

    def _ending_after(self, error_tail: str, body: dict[str, Any]) -> str:
        """How a stream ends after vLLM sent an error event in it: vLLM's own event for the
        client's faults (4xx), else ours, which names the request (vLLM's says "see stack trace
        above", of a server the client cannot see)."""
        try:
            error = json.loads(error_tail.split("\n\n", 1)[0][len("data: ") :])["error"]
            status = int(error.get("code") or 500)
        except (ValueError, KeyError, TypeError, AttributeError):
            error, status = error_tail, 500
        if status < 500 and not self._engine.is_dead():
            return error_tail
        return stream_ending(self._failed_mid_stream(body, error))

    def _failed_mid_stream(self, body: dict[str, Any], cause: Any) -> LLMServeError:
        """The error a stream that already began ends with (never "go elsewhere": it began here)."""
        if isinstance(cause, LLMServeError) and not isinstance(cause, ReplicaUnavailableError):
            return cause
        request_id = body.get("request_id", "unknown")
        what = "died" if self._engine.is_dead() else "failed"
        logger.error("request %s: the engine of %s %s mid-stream: %r", request_id, self._config.model_id, what, cause)
        return EngineError(f"The engine {what} while serving request {request_id}; see the server log for details.")

    def _adapter_for(self, body: dict[str, Any]) -> contextlib.AbstractAsyncContextManager:
        """Holds the request's LoRA adapter loaded (``base:adapter``); nothing for the base model."""
        model = body.get("model")
        if not isinstance(model, str) or ":" not in model:
            return contextlib.nullcontext()
        if self._adapters is None:
            raise ModelNotFoundError(f"The model `{model}` does not exist: {self._config.model_id} serves no adapters.", param="model")
        return self._adapters.using(model.split(":", 1)[1])

    def _coalescing_window(self) -> float:
        # A lone stream waits for nothing; each concurrent stream adds a little
        # wait, so a crowded replica makes fewer, larger writes.
        if self._active_streams <= 1:
            return 0.0
        return min(MAX_COALESCING_WINDOW_S, self._active_streams * COALESCING_WINDOW_PER_STREAM_S)

    async def _exit_when_the_engine_dies(self) -> None:
        while not self._engine.is_dead():
            await asyncio.sleep(ENGINE_WATCH_PERIOD_S)
        logger.error("the engine of %s died; this replica stops serving and exits", self._config.model_id)
        if replica_context() is not None:
            await asyncio.sleep(DEAD_REPLICA_EXIT_DELAY_S)
            # Serve replaces a replica whose process is gone as soon as it sees it;
            # a failing health check would take up to health_check_period_s more.
            os._exit(1)

    def _unavailable(self) -> ReplicaUnavailableError:
        return ReplicaUnavailableError(f"The engine of this replica of {self._config.model_id} died; another replica serves.")

    async def engine_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = dict(await self._engine.stats())
        stats["requests_handed_off"] = self._data_plane.handoffs_taken
        if self._adapters is not None:
            stats.update(adapters_held=self._adapters.held, adapter_loads=self._adapters.loads, adapter_evictions=self._adapters.evictions)
        return stats

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What this replica tells Serve's autoscaler besides requests in flight (autoscaling.TtftPolicy)."""
        stats = await self._engine.stats()
        ttft = metrics.recent_ttft_quantile(0.9, autoscaling.TTFT_WINDOW_S)
        return {
            autoscaling.TTFT_P90: ttft or 0.0,
            autoscaling.ENGINE_WAITING: float(stats.get("engine_waiting", 0)),
            autoscaling.KV_CACHE_USAGE: float(stats.get("kv_cache_usage", 0.0)),
        }

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self):
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.cancel()
        data_plane = getattr(self, "_data_plane", None)
        if data_plane is not None:
            data_plane.stop()
        engine = getattr(self, "_engine", None)  # absent when start-up failed
        if engine is not None:
            engine.shutdown()

    def _as_client_error(self, exc: Exception, body: dict[str, Any]) -> LLMServeError:
        if self._engine.is_dead():
            return self._unavailable()  # the request is not at fault; another replica can serve it
        if isinstance(exc, LLMServeError):
            return exc
        request_id = body.get("request_id", "unknown")
        logger.exception("request %s failed in the engine of %s", request_id, self._config.model_id)
        return EngineError(f"The engine failed to serve request {request_id}; see the server log for details.")
