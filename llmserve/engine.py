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

from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Protocol, Union

if TYPE_CHECKING:
    from llmserve.config import LLMConfig

Endpoint = Literal["chat", "completions", "embeddings"]

# A whole JSON body, or the stream of SSE events ("data: ...\n\n") of a streaming request.
EngineOutput = Union[bytes, AsyncIterator[str]]


class Engine(Protocol):
    """What ``LLMServer`` drives. One instance per replica."""

    def __init__(self, config: "LLMConfig") -> None: ...

    async def start(self) -> None:
        """Load the model; return once requests can be served."""

    async def generate(self, endpoint: Endpoint, body: dict[str, Any]) -> EngineOutput:
        """Serve one request; raise ``LLMServeError`` for anything a client did wrong."""

    async def model_cards(self) -> list[dict[str, Any]]:
        """The `/v1/models` entries this engine serves (OpenAI model objects)."""

    async def check_health(self) -> None:
        """Raise if the engine can no longer serve."""

    def shutdown(self) -> None:
        """Release the engine's processes and memory."""


def unknown_engine_kwargs(engine_kwargs: dict[str, Any]) -> set[str]:
    """Keys of ``engine_kwargs`` that vLLM would reject; empty where vLLM is absent."""
    if not engine_kwargs:
        return set()
    try:
        from llmserve.vllm_engine import accepted_engine_kwargs
    except ImportError:
        return set()  # an ingress-only or client machine: the replica checks again
    return set(engine_kwargs) - accepted_engine_kwargs()
