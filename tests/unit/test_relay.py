"""The ingress → replica byte path in-process: real HTTP on localhost, fake engine, no Ray."""

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from llmserve import LLMConfig, LLMServer
from llmserve.ingress import build_http_app
from llmserve import relay as relay_module
from llmserve.relay import ReplicaDataPlane, ReplicaRelay
from llmserve.routing import ModelRouter
from llmserve.testing import FakeEngine


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
    """The two handle calls the relay makes, answered by a server object in this process."""

    def __init__(self, server):
        self._server = server
        self.leases = []

    def options(self, **_):
        return self

    def _reserve(self, lease_id):
        self.leases.append(LeaseCall(self._server.reserve(lease_id)))
        return self.leases[-1]

    @property
    def reserve(self):
        return SimpleNamespace(remote=self._reserve)

    @property
    def model_cards(self):
        return SimpleNamespace(remote=self._server.model_cards)


async def relayed_app(model_id="alpha"):
    server = await LLMServer.create(LLMConfig(model_loading_config={"model_id": model_id}), engine_cls=FakeEngine)
    handle = InProcessHandle(server)
    relay = ReplicaRelay(handle)
    RELAYS.append(relay)
    return server, handle, build_http_app(ModelRouter({model_id: relay}))


RELAYS = []


@pytest.fixture(autouse=True)
def quick_spare_expiry(monkeypatch):
    monkeypatch.setattr(relay_module, "SPARE_LEASE_IDLE_S", 0.3)


async def close_relays():
    while RELAYS:
        await RELAYS.pop().aclose()


def client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def chat(content, **extra):
    return {"model": "alpha", "messages": [{"role": "user", "content": content}], **extra}


async def settle(condition, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def test_whole_and_streamed_answers_cross_the_relay_and_leases_end():
    async def go():
        server, handle, app = await relayed_app()
        async with client(app) as http:
            whole = await http.post("/v1/chat/completions", json=chat("one two"), headers={"x-request-id": "w-1"})
            streamed = await http.post("/v1/chat/completions", json=chat("one two three", stream=True))
        assert whole.status_code == 200 and whole.headers["x-request-id"] == "w-1"
        assert whole.json()["id"] == "w-1" and whole.json()["choices"][0]["message"]["content"] == "one two"
        events = [line[len("data: "):] for line in streamed.text.split("\n\n") if line]
        assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["one", "two", "three"]
        assert events[-1] == "[DONE]"
        # Only the spare lease opened for the next request is left, and it is
        # given back once no request comes.
        assert await settle(lambda: len(server._data_plane._leases) <= 1, timeout=0.25)
        assert await settle(lambda: not server._data_plane._leases), "a lease outlived its request"
        assert handle.leases[-1].cancelled, "the last spare lease was not given back"
        await close_relays()

    asyncio.run(go())


def test_replica_errors_keep_their_status_and_envelope():
    async def go():
        _, _, app = await relayed_app()
        async with client(app) as http:
            client_error = await http.post("/v1/chat/completions", json=chat("fail:client", stream=True))
            engine_error = await http.post("/v1/chat/completions", json=chat("fail:start"), headers={"x-request-id": "e-1"})
            mid_stream = await http.post("/v1/chat/completions", json=chat("ok fail:stream", stream=True))
        assert client_error.status_code == 400 and client_error.json()["error"]["param"] == "messages"
        assert engine_error.status_code == 500 and "e-1" in engine_error.json()["error"]["message"]
        events = [line for line in mid_stream.text.split("\n\n") if line]
        assert json.loads(events[1][len("data: "):])["error"]["code"] == "engine_error"
        assert events[-1] == "data: [DONE]"
        await close_relays()

    asyncio.run(go())


def test_client_leaving_mid_stream_stops_the_replica_stream():
    async def go():
        server, _, app = await relayed_app()
        # In-process ASGI transports buffer whole responses, so the ingress
        # gets a real HTTP server here: a client can only leave over a socket.
        front_door = ReplicaDataPlane(app)
        words = " ".join(["slow"] + [f"w{i}" for i in range(200)])
        async with httpx.AsyncClient(base_url=await front_door.url()) as http:
            async with http.stream("POST", "/v1/completions", json={"prompt": words, "stream": True, "max_tokens": 500}) as response:
                async for _ in response.aiter_bytes():
                    break
                assert server.engine.open_streams == 1
        # 200 events at 20 ms would take 4 s; the stream must stop long before.
        assert await settle(lambda: server.engine.open_streams == 0, timeout=1.0), "the replica kept generating"
        assert await settle(lambda: not server._data_plane._leases)
        front_door.stop()
        await close_relays()

    asyncio.run(go())


def test_unreachable_replica_is_a_500_naming_the_request_and_cancels_the_lease():
    async def go():
        server, handle, app = await relayed_app()
        server._data_plane._url = "http://127.0.0.1:9"  # nothing listens on the discard port
        async with client(app) as http:
            response = await http.post("/v1/completions", json={"prompt": "x"}, headers={"x-request-id": "gone-1"})
        assert response.status_code == 500 and "gone-1" in response.json()["error"]["message"]
        assert any(lease.cancelled for lease in handle.leases)
        await close_relays()

    asyncio.run(go())
