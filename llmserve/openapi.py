"""The OpenAPI document at `/openapi.json`: vLLM's own schema of each endpoint, for one app.

Each model's engine publishes the operations of the endpoints it serves as
``vllm serve`` publishes them (its FastAPI app's schema, so request bodies are
vLLM's request types). The ingress merges those of every model, adds its own
routes (model lists, health) and declares the answers we give: errors in
OpenAI's envelope (`code` a string, not vLLM's number), 400 for every request
that fails validation (FastAPI's 422 never comes from us), 413 for a body
too large, 503 when a model is overloaded.

Example::

    document = merged_document([await backend.api_schema() for backend in backends])
"""

from __future__ import annotations

import copy
import importlib.metadata
from typing import Any, Iterable

ERROR_SCHEMA = {
    "type": "object",
    "title": "ErrorResponse",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/LLMServeErrorResponse"}
_ERROR_ANSWERS = {
    "400": "Bad Request: the body fails validation, or the model lacks the endpoint",
    "404": "Not Found: no such model",
    "413": "Payload Too Large",
    "500": "Internal Server Error (names the request id)",
    "503": "Service Unavailable: the model is overloaded",
}
_OWN_OPERATIONS = {
    "/v1/models": ("List the served models and their adapters", {"200": "The model list (OpenAI `list` object)"}),
    "/v1/models/{model}": ("Retrieve one model", {"200": "The model object", "404": "Not Found: no such model"}),
    "/health": ("Whether the ingress answers", {"200": "`{\"status\": \"ok\"}`"}),
}


def model_operations(schema: dict[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """The POST operations of ``paths`` in a ``vllm serve`` schema, with the component
    schemas they refer to: what one model publishes."""
    operations = {path: {"post": schema["paths"][path]["post"]} for path in paths if "post" in schema["paths"].get(path, {})}
    components = schema.get("components", {}).get("schemas", {})
    wanted: dict[str, Any] = {}
    pending = list(_refs(operations))
    while pending:
        name = pending.pop()
        if name in wanted or name not in components:
            continue
        wanted[name] = components[name]
        pending.extend(_refs(components[name]))
    return {"paths": operations, "components": {"schemas": wanted}}


def merged_document(model_schemas: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One OpenAPI document for the app: every model's operations (the first model that
    publishes a path describes it) and the ingress's own routes."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for model_schema in model_schemas:
        for path, operations in model_schema.get("paths", {}).items():
            paths.setdefault(path, copy.deepcopy(operations))
        for name, schema in model_schema.get("components", {}).get("schemas", {}).items():
            schemas.setdefault(name, schema)
    for operations in paths.values():
        for operation in operations.values():
            operation["responses"] = _our_answers(operation.get("responses", {}))
    for path, (summary, answers) in _OWN_OPERATIONS.items():
        operation: dict[str, Any] = {"summary": summary, "responses": {code: {"description": text} for code, text in answers.items()}}
        if "{model}" in path:
            operation["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
            operation["responses"]["404"]["content"] = {"application/json": {"schema": _ERROR_REF}}
        paths[path] = {"get": operation}
    schemas["LLMServeErrorResponse"] = ERROR_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmserve", "version": importlib.metadata.version("llmserve")},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _our_answers(vllm_answers: dict[str, Any]) -> dict[str, Any]:
    answers = {code: answer for code, answer in vllm_answers.items() if code.startswith("2")}
    for code, description in _ERROR_ANSWERS.items():
        answers[code] = {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}
    return answers


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/components/schemas/"):
                yield value.rsplit("/", 1)[1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)
