"""The HTTP layer in-process: real ASGI app, real routing, fake engine, no Ray."""

import asyncio
import json

import httpx
import pytest

from llmserve import LLMConfig, LLMServer
from llmserve.ingress import build_http_app
from llmserve.routing import LocalBackend, ModelRouter
from llmserve.testing import FakeEngine


def make_app(*model_ids):
    async def build():
        servers = {}
        for model_id in model_ids:
            config = LLMConfig(model_loading_config={"model_id": model_id})
            servers[model_id] = LocalBackend(await LLMServer.create(config, engine_cls=FakeEngine))
        return build_http_app(ModelRouter(servers))

    return asyncio.run(build())


def call(app, method, path, **kwargs):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def chat(content, model="alpha", **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(response):
    return [line[len("data: "):] for line in response.text.split("\n\n") if line]


def assert_envelope(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in response.text
    return error


@pytest.fixture(scope="module")
def two_models():
    return make_app("alpha", "beta")


def test_routes_by_model_field(two_models):
    for model in ("alpha", "beta"):
        response = call(two_models, "POST", "/v1/chat/completions", json=chat("hello there", model=model))
        assert response.status_code == 200
        assert response.json()["model"] == model
        assert response.json()["choices"][0]["message"]["content"] == "hello there"


def test_request_id_is_echoed_and_generated(two_models):
    given = call(two_models, "POST", "/v1/completions", json={"model": "alpha", "prompt": "x"}, headers={"x-request-id": "abc"})
    assert given.headers["x-request-id"] == "abc" and given.json()["id"] == "abc"
    in_body = call(two_models, "POST", "/v1/completions", json={"model": "alpha", "prompt": "x", "request_id": "body-id"})
    assert in_body.headers["x-request-id"] == "body-id"
    fresh = call(two_models, "POST", "/v1/completions", json={"model": "alpha", "prompt": "x"})
    assert len(fresh.headers["x-request-id"]) >= 16


def test_unknown_model_is_404_model_not_found(two_models):
    error = assert_envelope(call(two_models, "POST", "/v1/chat/completions", json=chat("hi", model="nope")), 404, "model_not_found")
    assert "nope" in error["message"] and error["param"] == "model"


def test_missing_model_with_two_models_is_400(two_models):
    body = chat("hi")
    del body["model"]
    assert_envelope(call(two_models, "POST", "/v1/chat/completions", json=body), 400)


def test_missing_model_with_one_model_means_that_one():
    app = make_app("solo")
    response = call(app, "POST", "/v1/completions", json={"prompt": "just me"})
    assert response.status_code == 200 and response.json()["model"] == "solo"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_body_is_400(two_models, content):
    assert_envelope(call(two_models, "POST", "/v1/chat/completions", content=content), 400)


def test_non_string_model_is_400(two_models):
    assert_envelope(call(two_models, "POST", "/v1/chat/completions", json=chat("hi", model=7)), 400)


def test_stream_is_read_as_vllm_reads_it_and_anything_else_is_400(two_models):
    for value in ("maybe", 2, [True], {"on": True}):
        error = assert_envelope(call(two_models, "POST", "/v1/chat/completions", json=chat("hi", stream=value)), 400)
        assert error["param"] == "stream"
    # vllm serve's request types take pydantic's booleans, so "yes" streams there, and here.
    streamed = call(two_models, "POST", "/v1/chat/completions", json=chat("hi", stream="yes"))
    assert streamed.headers["content-type"].startswith("text/event-stream")


class BrokenServer:
    """A server object whose transport fails, as a dead replica does."""

    async def generate(self, endpoint, body):
        raise ConnectionError("replica died")

    async def generate_stream(self, endpoint, body):
        yield 'data: {"choices": []}\n\n'
        raise ConnectionError("replica died")

    async def model_cards(self):
        return []


def test_backend_failure_is_500_naming_the_request_and_ends_streams_cleanly():
    app = build_http_app(ModelRouter({"broken": LocalBackend(BrokenServer())}))
    whole = call(app, "POST", "/v1/completions", json={"prompt": "x"}, headers={"x-request-id": "r-1"})
    assert "r-1" in assert_envelope(whole, 500, "engine_error")["message"]
    streamed = call(app, "POST", "/v1/completions", json={"prompt": "x", "stream": True}, headers={"x-request-id": "r-2"})
    events = sse_events(streamed)
    assert json.loads(events[1])["error"]["code"] == "engine_error" and "r-2" in events[1]
    assert events[-1] == "[DONE]"


def test_streaming_passes_events_through(two_models):
    response = call(two_models, "POST", "/v1/chat/completions", json=chat("one two three", stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    words = [json.loads(event)["choices"][0]["delta"]["content"] for event in events[:-1]]
    assert words == ["one", "two", "three"]


def test_error_before_stream_is_a_plain_http_error(two_models):
    assert_envelope(call(two_models, "POST", "/v1/chat/completions", json=chat("fail:client", stream=True)), 400)


def test_engine_failure_is_500_with_request_id_and_no_traceback(two_models):
    response = call(two_models, "POST", "/v1/chat/completions", json=chat("fail:start"), headers={"x-request-id": "req-42"})
    error = assert_envelope(response, 500, "engine_error")
    assert "req-42" in error["message"]
    stream = call(two_models, "POST", "/v1/chat/completions", json=chat("fail:start", stream=True), headers={"x-request-id": "req-43"})
    assert "req-43" in assert_envelope(stream, 500)["message"]


def test_failure_mid_stream_ends_with_one_error_event(two_models):
    response = call(two_models, "POST", "/v1/chat/completions", json=chat("ok fail:stream more", stream=True))
    assert response.status_code == 200
    events = sse_events(response)
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "ok"
    assert json.loads(events[1])["error"]["code"] == "engine_error"
    assert events[2:] == ["[DONE]"]


def test_an_engine_error_event_mid_stream_names_the_request_and_a_client_one_is_passed_on(two_models):
    """vLLM's own error event says "see stack trace above", of a server the client cannot see."""
    response = call(two_models, "POST", "/v1/completions", json={"model": "alpha", "prompt": "ok fail:event more", "stream": True}, headers={"x-request-id": "req-77"})
    events = sse_events(response)
    assert json.loads(events[0])["choices"][0]["text"] == "ok"
    error = json.loads(events[1])["error"]
    assert error["code"] == "engine_error" and "req-77" in error["message"], error
    assert events[2:] == ["[DONE]"]
    response = call(two_models, "POST", "/v1/completions", json={"model": "alpha", "prompt": "ok fail:event400", "stream": True})
    events = sse_events(response)
    assert json.loads(events[1])["error"]["message"] == "fake engine error event 400"
    assert events[2:] == ["[DONE]"]


def test_models_list_and_retrieve(two_models):
    listed = call(two_models, "GET", "/v1/models").json()
    assert listed["object"] == "list" and [card["id"] for card in listed["data"]] == ["alpha", "beta"]
    assert call(two_models, "GET", "/v1/models/beta").json()["id"] == "beta"
    assert_envelope(call(two_models, "GET", "/v1/models/gamma"), 404, "model_not_found")


def test_unknown_route_and_wrong_method_use_the_envelope(two_models):
    assert_envelope(call(two_models, "GET", "/v1/nothing"), 404)
    assert_envelope(call(two_models, "GET", "/v1/chat/completions"), 405)


def test_health(two_models):
    assert call(two_models, "GET", "/health").json() == {"status": "ok"}


def test_every_model_path_reaches_the_engine_as_its_endpoint(two_models):
    from llmserve.engine import API_PATHS

    for path, endpoint in API_PATHS.items():
        body = chat("hi") if endpoint == "chat" else {"model": "alpha", "prompt": "hi"}
        response = call(two_models, "POST", path, json=body)
        assert response.status_code == 200, (path, response.text)
        assert response.json()["endpoint"] == endpoint


def test_multipart_forms_are_routed_by_their_model_field(two_models):
    upload = {"file": ("clip.wav", b"RIFF....", "audio/wav")}
    response = call(two_models, "POST", "/v1/audio/transcriptions", data={"model": "beta", "prompt": "hi there"}, files=upload)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "beta" and response.json()["endpoint"] == "transcriptions"
    streamed = call(two_models, "POST", "/v1/audio/translations", data={"model": "alpha", "prompt": "a b", "stream": "True"}, files=upload)
    assert streamed.headers["content-type"].startswith("text/event-stream") and sse_events(streamed)[-1] == "[DONE]"
    assert_envelope(call(two_models, "POST", "/v1/audio/transcriptions", data={"model": "gamma"}, files=upload), 404, "model_not_found")
    assert_envelope(call(two_models, "POST", "/v1/audio/transcriptions", data={"model": "alpha", "stream": "maybe"}, files=upload), 400)


def test_a_broken_multipart_form_is_400(two_models):
    headers = {"content-type": "multipart/form-data"}  # no boundary
    error = assert_envelope(call(two_models, "POST", "/v1/audio/transcriptions", content=b"--xyz\r\nnonsense", headers=headers), 400)
    assert "multipart" in error["message"]


def test_form_fields_keep_lists_and_files():
    from starlette.datastructures import UploadFile

    from llmserve.bodies import parse_body

    boundary = "b0undary"
    parts = [("model", None, b"whisper"), ("timestamp_granularities[]", None, b"word"), ("timestamp_granularities[]", None, b"segment"), ("file", "a.wav", b"RIFFdata")]
    raw = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        raw += f"--{boundary}\r\ncontent-disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    raw += f"--{boundary}--\r\n".encode()
    body = asyncio.run(parse_body(f"multipart/form-data; boundary={boundary}", raw))
    assert body["model"] == "whisper" and body["timestamp_granularities[]"] == ["word", "segment"]
    assert isinstance(body["file"], UploadFile) and body["file"].filename == "a.wav"


def test_openapi_document_merges_the_models_and_declares_our_errors(two_models):
    document = call(two_models, "GET", "/openapi.json").json()
    assert document["openapi"].startswith("3.") and document["info"]["title"] == "llmserve"
    completions = document["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in completions and {"200", "400", "404", "413", "500", "503"} <= set(completions)
    assert completions["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/LLMServeErrorResponse"}
    assert {"/v1/models", "/v1/models/{model}", "/health"} <= set(document["paths"])
    # The envelope the schema declares is the one an error carries.
    error = call(two_models, "POST", "/v1/completions", json={"model": "gamma"}).json()
    declared = document["components"]["schemas"]["LLMServeErrorResponse"]["properties"]["error"]["required"]
    assert sorted(error["error"]) == sorted(declared)


def test_model_operations_keep_only_the_referenced_schemas():
    from llmserve.openapi import model_operations

    schema = {
        "paths": {"/a": {"post": {"requestBody": {"$ref": "#/components/schemas/A"}}}, "/b": {"post": {}}, "/c": {"get": {}}},
        "components": {"schemas": {"A": {"properties": {"b": {"$ref": "#/components/schemas/B"}}}, "B": {}, "Unused": {}}},
    }
    kept = model_operations(schema, ["/a", "/c", "/missing"])
    assert list(kept["paths"]) == ["/a"] and set(kept["components"]["schemas"]) == {"A", "B"}


def test_json_nested_past_the_limit_is_400(two_models):
    from llmserve.bodies import MAX_JSON_DEPTH

    deep = "[" * 5000 + "]" * 5000
    error = assert_envelope(call(two_models, "POST", "/v1/completions", content=f'{{"model": "alpha", "prompt": {deep}}}'), 400)
    assert "deeper" in error["message"]
    just_too_deep = {"model": "alpha", "prompt": "x", "extra": {}}
    node = just_too_deep["extra"]
    for _ in range(MAX_JSON_DEPTH - 1):  # the body, `extra` and these: one level past the limit
        node["n"] = {}
        node = node["n"]
    assert_envelope(call(two_models, "POST", "/v1/completions", json=just_too_deep), 400)
    fine = {"model": "alpha", "prompt": "x", "extra": {}}
    node = fine["extra"]
    for _ in range(MAX_JSON_DEPTH - 2):
        node["n"] = {}
        node = node["n"]
    assert call(two_models, "POST", "/v1/completions", json=fine).status_code == 200


def test_api_keys_guard_every_route_but_health(monkeypatch):
    from llmserve.auth import ApiKeys

    async def build():
        server = await LLMServer.create(LLMConfig(model_loading_config={"model_id": "alpha"}), engine_cls=FakeEngine)
        monkeypatch.setenv("LLMSERVE_API_KEY", "from-env, second-env")
        return build_http_app(ModelRouter({"alpha": LocalBackend(server)}), ApiKeys.configured(["sk-app"]))

    app = asyncio.run(build())
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic sk-app"}, {"authorization": "Bearer"}):
        error = assert_envelope(call(app, "POST", "/v1/chat/completions", json=chat("hi"), headers=headers), 401, "invalid_api_key")
        assert "sk-app" not in error["message"]
        assert_envelope(call(app, "GET", "/v1/models", headers=headers), 401)
    for key in ("sk-app", "from-env", "second-env"):
        assert call(app, "POST", "/v1/chat/completions", json=chat("hi"), headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert call(app, "GET", "/health").status_code == 200
    assert call(app, "GET", "/v1/models", headers={"authorization": "bearer sk-app"}).status_code == 200


def test_without_keys_the_api_is_open(monkeypatch):
    from llmserve.auth import ApiKeys

    monkeypatch.delenv("LLMSERVE_API_KEY", raising=False)
    assert not ApiKeys.configured([]).required and ApiKeys.configured([]).allows(None)
