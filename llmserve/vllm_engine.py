"""The vLLM engine: the only module of llmserve that imports vLLM.

It runs vLLM's ``AsyncLLM`` inside the server replica and answers requests with
vLLM's own OpenAI serving classes, built by vLLM's ``init_app_state`` exactly as
``vllm serve`` builds them. That is what makes our answers byte-for-byte the
ones ``vllm serve`` gives: same chat templating, sampling defaults, usage
counts, validation messages.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib
import logging
import os
import subprocess
from typing import Any, AsyncIterator, Optional

import pydantic
from starlette.datastructures import State

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import FrontendArgs

from llmserve import metrics
from llmserve.bodies import MULTIPART
from llmserve.config import LLMConfig
from llmserve.engine import API_PATHS, ENDPOINT_PATHS, BinaryOutput, Endpoint, EngineOutput
from llmserve.errors import BadRequestError, ConfigError, EngineError, error_for_status
from llmserve.ray_llm_compat import with_named_json_schema, with_reasoning_content
from llmserve.storage import mirror_weights

logger = logging.getLogger(__name__)

# On CPU vLLM reserves gpu_memory_utilization (0.92) of the NUMA node's memory
# and fails when that much is not free; a fixed KV cache starts everywhere and
# also skips the memory-profiling warm-up.
CPU_DEFAULT_KV_CACHE_BYTES = 2 * 1024**3


@functools.cache
def _frontend_fields() -> frozenset[str]:
    return frozenset(field.name for field in dataclasses.fields(FrontendArgs))


@functools.cache
def accepted_engine_kwargs() -> frozenset[str]:
    """Every key vLLM accepts in ``engine_kwargs``: engine and OpenAI-frontend arguments."""
    engine_fields = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    return frozenset(engine_fields | _frontend_fields())


def has_accelerator() -> bool:
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def resolve_engine_kwargs(config: LLMConfig, model_path: str) -> dict[str, Any]:
    """The full keyword set for vLLM: the user's kwargs plus our defaults and the model."""
    kwargs = dict(config.engine_kwargs)
    if not has_accelerator():
        sizes_memory = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & kwargs.keys()
        if not sizes_memory and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kwargs["kv_cache_memory_bytes"] = CPU_DEFAULT_KV_CACHE_BYTES
    lora = config.lora_config
    if lora is not None:
        # The engine's LoRA slots follow the config, so users never match them by hand.
        kwargs["enable_lora"] = True
        kwargs.setdefault("max_loras", lora.max_num_adapters_per_replica)
        kwargs.setdefault("max_cpu_loras", kwargs["max_loras"])
        kwargs.setdefault("max_lora_rank", lora.max_lora_rank)
    tokenizer = config.model_loading_config.tokenizer_source
    if tokenizer and "tokenizer" not in kwargs:
        kwargs["tokenizer"] = tokenizer
    kwargs["model"] = model_path
    kwargs["served_model_name"] = [config.model_id]
    return kwargs


def _bound_engine_spin_waits() -> None:
    """On CPU, ask the engine's processes (started next, inheriting our environment) to nap past 1 ms of spinning.

    A user's own LLMSERVE_ENGINE_SPIN_S (e.g. in runtime_env) wins; see vllm_spin_wait.
    """
    from llmserve.vllm_spin_wait import CPU_DEFAULT_SPIN_S, SPIN_ENV

    if not has_accelerator():
        os.environ.setdefault(SPIN_ENV, str(CPU_DEFAULT_SPIN_S))


def _fork_engine_workers(vllm_config: Any) -> None:
    """On CPU, ask the engine core (started next, inheriting our environment) to fork its workers.

    A spawned worker imports vLLM again, 8-10 s; see vllm_worker_fork. NUMA
    binding wraps the worker's executable, which needs spawn.
    """
    from llmserve.vllm_worker_fork import FORK_ENV

    if not has_accelerator() and not getattr(vllm_config.parallel_config, "numa_bind", False):
        os.environ.setdefault(FORK_ENV, "1")


def split_engine_kwargs(kwargs: dict[str, Any]) -> tuple[AsyncEngineArgs, FrontendArgs]:
    frontend = {key: value for key, value in kwargs.items() if key in _frontend_fields()}
    engine = {key: _as_vllm_parses(key, value) for key, value in kwargs.items() if key not in frontend}
    return AsyncEngineArgs(**engine), FrontendArgs(**frontend)


@functools.cache
def _nested_config_classes() -> dict[str, type]:
    """Engine arguments whose value is one of vLLM's config classes (structured_outputs_config, ...)."""
    from vllm.engine.arg_utils import get_type_hints

    classes = {}
    for field in dataclasses.fields(AsyncEngineArgs):
        config_class = next((hint for hint in get_type_hints(field.type) if dataclasses.is_dataclass(hint)), None)
        if config_class is not None:
            classes[field.name] = config_class
    return classes


def _as_vllm_parses(key: str, value: Any) -> Any:
    """A mapping given for a config-class argument, made into that class as `vllm serve` makes its
    JSON flag value (`--structured-outputs-config '{"backend": "xgrammar"}'`)."""
    config_class = _nested_config_classes().get(key)
    if config_class is None or not isinstance(value, dict):
        return value
    try:
        return pydantic.TypeAdapter(config_class).validate_python(value)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"engine_kwargs.{key} is not a valid {config_class.__name__}: {exc}", param=f"engine_kwargs.{key}") from exc


class VLLMEngine:
    """vLLM behind the ``Engine`` protocol; one per server replica."""

    def __init__(self, config: LLMConfig):
        self._config = config
        self._aborted = 0
        self._load = _EngineLoad()
        self._engine_client = None
        self._state = State()
        self._handlers: dict[str, tuple[pydantic.TypeAdapter, Any, _Route]] = {}
        self._parses_reasoning = False
        self._app_args: Optional[argparse.Namespace] = None
        self._supported_tasks: tuple[str, ...] = ()
        self._api_schema: Optional[dict[str, Any]] = None

    async def start(self) -> None:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.gc_utils import freeze_gc_heap
        from vllm.v1.engine.async_llm import AsyncLLM

        source = self._config.model_loading_config.model_source
        if not isinstance(source, str):
            source = await asyncio.to_thread(mirror_weights, self._config.model_id, source.bucket_uri)
        kwargs = resolve_engine_kwargs(self._config, source)
        engine_args, frontend_args = split_engine_kwargs(kwargs)
        _bound_engine_spin_waits()
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        _fork_engine_workers(vllm_config)
        self._parses_reasoning = bool(vllm_config.structured_outputs_config.reasoning_parser)
        self._engine_client = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=self._stat_loggers(),
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
        )
        _end_with_this_process(_child_pids())
        self._count_aborts()
        self._count_tokens()
        supported_tasks = await self._engine_client.get_supported_tasks()
        args = argparse.Namespace(**(vars(frontend_args) | vars(engine_args)))
        await init_app_state(self._engine_client, self._state, args, supported_tasks)
        self._app_args, self._supported_tasks = args, supported_tasks
        self._handlers = self._endpoint_handlers()
        # What is loaded by now lives as long as the replica. `vllm serve` freezes
        # it out of the collector's sight once started, and so do we: without it
        # the replica's oldest-generation collections paused its event loop (and
        # every stream on it) for 0.4-0.55 s each (measured, docs/data-path.md).
        freeze_gc_heap()

    def _stat_loggers(self):
        loggers = [_load_logger(self._load)]
        if self._config.log_engine_metrics:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            loggers.append(RayPrometheusStatLogger)
        return loggers

    def _endpoint_handlers(self) -> dict[str, tuple[pydantic.TypeAdapter, Any, "_Route"]]:
        handlers = {}
        for endpoint, route in VLLM_ROUTES.items():
            serving = getattr(self._state, route.serving, None)
            if serving is None:
                continue  # the model lacks this capability: its requests get a 400 naming the endpoint
            handler = getattr(serving, route.method) if route.method else serving
            handlers[endpoint] = (pydantic.TypeAdapter(_import(route.request_type)), handler, route)
        return handlers

    async def generate(self, endpoint: Endpoint, body: dict[str, Any]) -> EngineOutput:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if endpoint not in self._handlers:
            raise BadRequestError(
                f"The model `{self._config.model_id}` does not support the {endpoint} endpoint "
                f"({ENDPOINT_PATHS[endpoint]}).",
                code="unsupported_endpoint",
            )
        request_adapter, handler, route = self._handlers[endpoint]
        request = _validated(request_adapter, body, route)
        try:
            if route.uploads_audio:
                from vllm.entrypoints.speech_to_text.base.utils import read_upload_with_limit

                result = await handler(await read_upload_with_limit(request.file), request, None)
            elif route.takes_raw_request:
                result = await handler(request, None)
            else:
                result = await handler(request)
        except Exception as exc:
            raise _client_error_or_reraise(exc, fetches_media=_names_media_urls(body)) from exc
        if isinstance(result, ErrorResponse):
            raise error_for_status(result.error.code, result.error.message, param=result.error.param)
        if endpoint == "chat" and self._parses_reasoning:
            result = with_reasoning_content(result)
        if isinstance(result, pydantic.BaseModel):
            return result.model_dump_json(by_alias=route.by_alias).encode()
        if isinstance(result, list):  # one answer per prompt (completions render)
            return b"[" + b",".join(item.model_dump_json(by_alias=route.by_alias).encode() for item in result) + b"]"
        if hasattr(result, "body") and hasattr(result, "status_code"):  # a Starlette response
            if result.status_code >= 400:
                raise error_for_status(result.status_code, result.body.decode(errors="replace"))
            return bytes(result.body)
        if hasattr(result, "body_iterator") and result.media_type != "text/event-stream":
            return await _binary_output(result)  # embeddings as raw bytes
        return result if route.sse_ready else _named_sse_events(result)

    async def load_adapter(self, model_name: str, local_dir: str) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        request = LoadLoRAAdapterRequest(lora_name=model_name, lora_path=local_dir)
        result = await self._state.openai_serving_models.load_lora_adapter(request)
        if isinstance(result, ErrorResponse):
            raise BadRequestError(f"The LoRA adapter `{model_name}` cannot be loaded: {result.error.message}", param="model")

    async def unload_adapter(self, model_name: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        models = self._state.openai_serving_models
        loaded = models.lora_requests.get(model_name)
        if loaded is None:
            return
        await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=model_name))
        await self._engine_client.remove_lora(loaded.lora_int_id)

    async def model_cards(self) -> list[dict[str, Any]]:
        models = await self._state.openai_serving_models.show_available_models()
        return [card.model_dump() for card in models.data]

    async def api_schema(self) -> dict[str, Any]:
        if self._api_schema is None:
            # Made on first ask, off the event loop: FastAPI takes seconds over vLLM's models.
            self._api_schema = await asyncio.to_thread(self._vllm_serve_schema)
        return self._api_schema

    def _vllm_serve_schema(self) -> dict[str, Any]:
        """What `vllm serve` of this model publishes, for the paths we route."""
        from vllm.entrypoints.launchers.app import build_app

        from llmserve.openapi import model_operations

        app = build_app(self._app_args, self._supported_tasks, self._engine_client.model_config)
        paths = [path for path, endpoint in API_PATHS.items() if endpoint in self._handlers]
        schema = model_operations(app.openapi(), paths)
        for path, operations in schema["paths"].items():
            if VLLM_ROUTES[API_PATHS[path]].uploads_audio:
                # FastAPI calls a Form() model urlencoded; the file makes it multipart, as clients send it.
                content = operations["post"]["requestBody"]["content"]
                content[MULTIPART] = content.pop("application/x-www-form-urlencoded")
        return schema

    async def check_health(self) -> None:
        if self._engine_client is None:
            raise EngineError("the engine has not started")
        await self._engine_client.check_health()

    def is_dead(self) -> bool:
        # vLLM's client watches its engine core process and flags its death at once.
        return self._engine_client is not None and self._engine_client.errored

    def continues_streams_of(self, endpoint: Endpoint) -> Optional[int]:
        # A reasoning parser splits a chat's output into fields a continued
        # completions stream does not have; completions streams are plain text.
        if endpoint not in ("chat", "completions") or (endpoint == "chat" and self._parses_reasoning):
            return None
        return self._engine_client.model_config.max_model_len if self._engine_client else None

    def _count_aborts(self) -> None:
        # vLLM aborts a request (in its output processor and engine core) when
        # the generator serving it is closed early: a client that left. The
        # count is how a test sees that a disconnect reached the engine.
        client = self._engine_client
        abort = client.abort

        async def counting_abort(request_id, *args, **kwargs):
            ids = [request_id] if isinstance(request_id, str) else list(request_id)
            self._aborted += sum(1 for one in ids if one in client.output_processor.request_states)
            return await abort(request_id, *args, **kwargs)

        client.abort = counting_abort

    def _count_tokens(self) -> None:
        # Every endpoint that generates goes through the client's generate: its
        # outputs tell the answer being made (metrics.py) its prompt and output
        # tokens, whatever the endpoint's own format says of them.
        from vllm.sampling_params import RequestOutputKind

        client = self._engine_client
        generate = client.generate

        async def counting_generate(prompt, sampling_params, request_id, *args, **kwargs):
            cumulative = getattr(sampling_params, "output_kind", None) == RequestOutputKind.CUMULATIVE
            outputs = generate(prompt, sampling_params, request_id, *args, **kwargs)
            prompted, counted = False, 0  # (counted: of a cumulative output's tokens)
            try:
                async for output in outputs:
                    if not prompted and output.prompt_token_ids is not None:
                        prompted = True
                        metrics.engine_tokens(len(output.prompt_token_ids), 0)
                    carried = sum(len(one.token_ids) for one in output.outputs)
                    metrics.engine_tokens(0, carried - counted)
                    if cumulative:
                        counted = carried
                    yield output
            finally:
                await outputs.aclose()  # (closing this generator early must still abort the request)

        client.generate = counting_generate

    async def stats(self) -> dict[str, float]:
        # The output processor drops a request when it finishes or is aborted,
        # at the same time as the engine core is told to.
        held = self._engine_client.output_processor.get_num_unfinished_requests() if self._engine_client else 0
        load = self._load
        return {
            "requests_in_engine": held, "requests_aborted": self._aborted,
            "engine_running": load.running, "engine_waiting": load.waiting, "kv_cache_usage": load.kv_cache_usage,
        }  # fmt: skip

    def shutdown(self) -> None:
        if self._engine_client is not None:
            self._engine_client.shutdown()
            self._engine_client = None


@dataclasses.dataclass
class _EngineLoad:
    """The scheduler's latest figures (vLLM reports them every step), for the autoscaling policy."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


def _load_logger(load: _EngineLoad) -> type:
    """A vLLM stat logger class that keeps the scheduler's figures in ``load``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EngineLoadLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                load.running, load.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                load.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return EngineLoadLogger


@dataclasses.dataclass(frozen=True)
class _Route:
    """How vLLM's own router serves one endpoint: the request type it validates, the
    serving object in vLLM's app state (absent when the model lacks the capability)
    and its method (None: the object itself is called)."""

    request_type: str
    serving: str
    method: Optional[str] = None
    by_alias: bool = False  # vLLM dumps these answers with their fields' aliases
    sse_ready: bool = True  # False: it streams event objects, not SSE text
    uploads_audio: bool = False  # a multipart form: the handler takes the file's bytes first
    takes_raw_request: bool = True  # False: the handler takes the request alone


VLLM_ROUTES: dict[str, _Route] = {
    "chat": _Route("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest", "openai_serving_chat", "create_chat_completion"),
    "completions": _Route("vllm.entrypoints.openai.completion.protocol:CompletionRequest", "openai_serving_completion", "create_completion"),
    "embeddings": _Route("vllm.entrypoints.pooling.embed.protocol:EmbeddingRequest", "serving_embedding"),
    "responses": _Route(
        "vllm.entrypoints.openai.responses.protocol:ResponsesRequest",
        "openai_serving_responses",
        "create_responses",
        by_alias=True,
        sse_ready=False,
    ),
    "tokenize": _Route("vllm.entrypoints.serve.tokenize.protocol:TokenizeRequest", "serving_tokenization", "create_tokenize"),
    "detokenize": _Route("vllm.entrypoints.serve.tokenize.protocol:DetokenizeRequest", "serving_tokenization", "create_detokenize"),
    "score": _Route("vllm.entrypoints.pooling.scoring.protocol:ScoreRequest", "serving_scores"),
    "rerank": _Route("vllm.entrypoints.pooling.scoring.protocol:RerankRequest", "serving_scores"),
    "classify": _Route("vllm.entrypoints.pooling.classify.protocol:ClassificationRequest", "serving_classification"),
    "pooling": _Route("vllm.entrypoints.pooling.pooling.protocol:PoolingRequest", "serving_pooling"),
    "chat_batch": _Route(
        "vllm.entrypoints.openai.chat_completion.protocol:BatchChatCompletionRequest",
        "openai_serving_chat_batch",
        "create_batch_chat_completion",
    ),
    "render_chat": _Route("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest", "serving_render", "render_chat_request"),
    "render_completions": _Route("vllm.entrypoints.openai.completion.protocol:CompletionRequest", "serving_render", "render_completion_request"),
    "render_responses": _Route(
        "vllm.entrypoints.openai.responses.protocol:ResponsesRequest", "serving_render", "render_responses_request", takes_raw_request=False
    ),
    "transcriptions": _Route(
        "vllm.entrypoints.speech_to_text.transcription.protocol:TranscriptionRequest",
        "openai_serving_transcription",
        "create_transcription",
        uploads_audio=True,
    ),
    "translations": _Route(
        "vllm.entrypoints.speech_to_text.translation.protocol:TranslationRequest",
        "openai_serving_translation",
        "create_translation",
        uploads_audio=True,
    ),
}


async def _binary_output(response: Any) -> BinaryOutput:
    """A whole binary answer vLLM gave as a Starlette streaming response."""
    chunks = [chunk if isinstance(chunk, bytes) else chunk.encode() async for chunk in response.body_iterator]
    described_by = {name: value for name, value in response.headers.items() if name not in ("content-type", "content-length")}
    return BinaryOutput(b"".join(chunks), response.media_type, described_by)


def _import(qualified_name: str) -> Any:
    module, _, name = qualified_name.partition(":")
    return getattr(importlib.import_module(module), name)


async def _named_sse_events(events: Any) -> AsyncIterator[str]:
    """Responses-API events as `vllm serve` sends them: each named by its type."""
    async for event in events:
        yield f"event: {getattr(event, 'type', 'unknown')}\ndata: {event.model_dump_json(by_alias=True)}\n\n"


def _validated(request_adapter: pydantic.TypeAdapter, body: dict[str, Any], route: _Route) -> Any:
    """The body as vLLM's request type, or the 400 that says what is wrong with it."""
    from starlette.exceptions import HTTPException
    from starlette.datastructures import UploadFile

    if route.uploads_audio:
        if not isinstance(body.get("file"), UploadFile):
            raise BadRequestError("`file` must be an audio file sent as a multipart/form-data upload.", param="file")
        body = {name: value for name, value in body.items() if name != "request_id"}  # a form has no such field
    try:
        return request_adapter.validate_python(with_named_json_schema(body))
    except pydantic.ValidationError as exc:
        raise _bad_request_from(exc) from exc
    except HTTPException as exc:  # vLLM's own validators raise FastAPI's errors
        raise error_for_status(exc.status_code, str(exc.detail)) from exc
    except Exception as exc:  # vLLM's validators raise its own errors too (VLLMValidationError)
        raise _client_error_or_reraise(exc) from exc


def _client_error_or_reraise(exc: Exception, *, fetches_media: bool = False) -> Exception:
    """vLLM's own mapping of its exceptions to statuses; 5xx stay engine failures."""
    import aiohttp

    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    if fetches_media and isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError)):
        # vLLM fetches a request's image/audio/video URLs itself; one that cannot be
        # fetched is the request's fault, not the engine's (vLLM answers it with a 500).
        return BadRequestError(f"A media URL in the request could not be fetched: {exc}", param="messages", code="media_fetch_failed")

    error = create_error_response(exc).error
    if error.code >= 500 and error.code not in (501, 503):
        return exc  # a real engine failure: the server logs it and names the request id
    return error_for_status(error.code, error.message, param=error.param)


def _names_media_urls(body: dict[str, Any]) -> bool:
    """Whether a message part names media by an http(s) URL, which vLLM fetches itself."""
    messages = body.get("messages") if isinstance(body.get("messages"), list) else body.get("input")
    if not isinstance(messages, list):
        return False
    for message in messages:
        parts = message.get("content") if isinstance(message, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            for value in part.values():
                url = value.get("url") if isinstance(value, dict) else value
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    return True
    return False


def _bad_request_from(exc: pydantic.ValidationError) -> BadRequestError:
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if not str(part).startswith("function-")]
    # Union request types (embeddings) prefix the location with the variant's name.
    location = [part for part in location if not part[:1].isupper()]
    param = ".".join(location) or None
    where = f" (field `{param}`)" if param else ""
    return BadRequestError(f"Invalid request{where}: {first['msg']}", param=param)


def _child_pids() -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process().children(recursive=True)]


def _end_with_this_process(pids: list[int]) -> None:
    """Kill the engine's processes when this replica process dies, however it dies.

    vLLM's engine core outlives a parent killed with SIGKILL (an OOM kill, a
    replica Serve gives up on, `ray stop --force`) and keeps its memory and a
    core. A small shell loop watches this process and kills them then.
    """
    if not pids:
        return
    script = f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 2; done; kill -9 {' '.join(map(str, pids))} 2>/dev/null"
    subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
