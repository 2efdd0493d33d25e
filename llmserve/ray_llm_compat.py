"""What code written for ray.serve.llm sends and reads, in the shapes vLLM 0.32 takes and gives.

Two request/answer shims, applied by the vLLM engine around vLLM's own
serving objects (the third, ``task`` in ``engine_kwargs``, is a config matter
and lives in ``config.py``). No vLLM import: both work on plain JSON and
pydantic objects.

Example::

    body = with_named_json_schema(body)        # before vLLM validates a request
    answer = with_reasoning_content(answer)    # a chat answer or its SSE stream
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import pydantic


def with_named_json_schema(body: dict[str, Any]) -> dict[str, Any]:
    """The body with a bare JSON schema as ``response_format.json_schema`` wrapped as OpenAI's
    ``{name, schema}``.

    ray.serve.llm's documentation passes a pydantic model's schema itself
    (``"json_schema": Color.model_json_schema()``), which its own request
    type accepted and vLLM's rejects for want of a name.
    """
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return body
    schema = response_format.get("json_schema")
    if not isinstance(schema, dict) or "schema" in schema or "name" in schema:
        return body
    if not {"type", "properties", "$defs", "anyOf", "oneOf", "enum"} & schema.keys():
        return body
    named = {"name": str(schema.get("title") or "response"), "schema": schema}
    return {**body, "response_format": {**response_format, "json_schema": named}}


def with_reasoning_content(result: Any) -> Any:
    """A chat answer whose reasoning is also under ``reasoning_content``, in messages and stream deltas.

    vLLM 0.32 names the parsed reasoning ``reasoning``; clients written for
    ray.serve.llm and DeepSeek's API read ``reasoning_content``.
    """
    if isinstance(result, pydantic.BaseModel):
        for choice in getattr(result, "choices", []):
            if getattr(choice.message, "reasoning", None) is not None:
                choice.message.reasoning_content = choice.message.reasoning
        return result
    return _stream_with_reasoning_content(result)


async def _stream_with_reasoning_content(events: AsyncIterator[str]) -> AsyncIterator[str]:
    async for event in events:
        if '"reasoning":' in event and event.startswith("data: {"):
            chunk = json.loads(event[len("data: "):])
            for choice in chunk.get("choices", []):
                delta = choice.get("delta") or {}
                if delta.get("reasoning") is not None:
                    delta["reasoning_content"] = delta["reasoning"]
            event = f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
        yield event
