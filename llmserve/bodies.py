"""Request bodies as the API takes them: a JSON object, or a multipart form (audio uploads).

Either becomes one dict of fields, parsed once where a request enters (the
ingress's app, the front door) so routing reads `model` the same way for both.
A form's fields stay the strings that were sent (vLLM's request types coerce
them, as FastAPI's ``Form()`` does for ``vllm serve``), repeated fields and
``name[]`` fields become lists, and files are Starlette ``UploadFile`` objects.

Example::

    body = await parse_body(request.headers.get("content-type", ""), await request.body())
    body["model"], body.get("file")
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from llmserve.errors import BadRequestError

JSON = "application/json"
MULTIPART = "multipart/form-data"
# A form is an audio upload and its options: a handful of fields, one file.
MAX_FORM_FIELDS = 100
MAX_FORM_FILES = 4
# Deep enough for any real request (JSON schemas for structured output included).
MAX_JSON_DEPTH = 64


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


async def parse_body(content_type: str, raw: bytes) -> dict[str, Any]:
    """The request's fields: a multipart form when it says it is one, else a JSON object."""
    if media_type(content_type) == MULTIPART:
        return await _parse_form(content_type, raw)
    return parse_json_object(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"The request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # nested deeper than Python's stack: the decoder gives up
        raise _too_deep() from exc
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    if _nesting_exceeds(body, MAX_JSON_DEPTH):
        raise _too_deep()
    return body


def _too_deep() -> BadRequestError:
    return BadRequestError(f"The request body nests objects and arrays deeper than {MAX_JSON_DEPTH} levels.")


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers deeper than ``limit`` (no recursion: a deep
    body must not exhaust the stack of whatever walks it later, pydantic or vLLM)."""
    level = [value]
    for _ in range(limit):
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


async def _parse_form(content_type: str, raw: bytes) -> dict[str, Any]:
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def chunks() -> AsyncIterator[bytes]:
        yield raw

    parser = MultiPartParser(Headers({"content-type": content_type}), chunks(), max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequestError(f"The multipart form cannot be read: {exc.message}") from exc
    body: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in body or name.endswith("[]"):
            earlier = body.get(name, [])
            body[name] = [*(earlier if isinstance(earlier, list) else [earlier]), value]
        else:
            body[name] = value
    return body
