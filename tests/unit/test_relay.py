"""The ingress → replica byte path in-process: real HTTP on localhost, fake engine, no Ray."""

import asyncio
import json

import httpx

from llmserve import LLMConfig, LLMServer
from llmserve.ingress import build_http_app
from llmserve.placement import Admission
from llmserve.relay import ReplicaDataPlane, ReplicaRelay
from llmserve.routing import ModelRouter
from llmserve.testing import FakeEngine, InProcessHandle, strand_on


class Relayed:
    """An ingress app over fake-engine replicas (one unless told), reached through the relay."""

    def __init__(self, replicas=1, **admission):
        self._replicas = replicas
        self._admission = admission  # the deployment's max_ongoing_requests, max_queued_requests

    async def __aenter__(self):
        config = LLMConfig(model_loading_config={"model_id": "alpha"}, deployment_config=self._admission)
        self.servers = [await LLMServer.create(config, engine_cls=FakeEngine) for _ in range(self._replicas)]
        self.server = self.servers[0]
        # The handle admits as Serve would; the relay keeps the line, as in the ingress.
        self.handle = InProcessHandle(self.servers, self._admission.get("max_ongoing_requests", 0))
        self.relay = ReplicaRelay(self.handle, Admission.of(config))
        self.app = build_http_app(ModelRouter({"alpha": self.relay}))
        return self

    async def __aexit__(self, *_):
        await self.relay.aclose()
        for server in self.servers:
            server.__del__()

    def leases_held(self):
        return self.server._data_plane.leases_held


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


def test_whole_and_streamed_answers_cross_the_relay_and_hand_their_lease_on():
    async def go():
        async with Relayed() as relayed, client(relayed.app) as http:
            whole = await http.post("/v1/chat/completions", json=chat("one two"), headers={"x-request-id": "w-1"})
            streamed = await http.post("/v1/chat/completions", json=chat("one two three", stream=True))
            assert whole.status_code == 200 and whole.headers["x-request-id"] == "w-1"
            assert whole.json()["id"] == "w-1" and whole.json()["choices"][0]["message"]["content"] == "one two"
            events = [line[len("data: "):] for line in streamed.text.split("\n\n") if line]
            assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["one", "two", "three"]
            assert events[-1] == "[DONE]"
            # The second request took over the lease the first one left; with no
            # request to take it over, it ends a moment later.
            assert len(relayed.handle.leases) == 1
            assert await settle(lambda: all(lease.cancelled for lease in relayed.handle.leases))
            assert await settle(lambda: relayed.leases_held() == 0), "a lease outlived its request"

    asyncio.run(go())


def test_a_lease_is_held_while_its_request_runs():
    async def go():
        async with Relayed() as relayed:
            front_door = ReplicaDataPlane(relayed.app)
            async with httpx.AsyncClient(base_url=await front_door.url()) as http:
                body = {"prompt": "slow a b c d e f g h i j", "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    chunks = response.aiter_bytes()
                    await anext(chunks)
                    assert relayed.leases_held() == 1
                    async for _ in chunks:
                        pass
            assert await settle(lambda: relayed.leases_held() == 0)
            front_door.stop()

    asyncio.run(go())


def test_replica_errors_keep_their_status_and_envelope():
    async def go():
        async with Relayed() as relayed, client(relayed.app) as http:
            client_error = await http.post("/v1/chat/completions", json=chat("fail:client", stream=True))
            engine_error = await http.post("/v1/chat/completions", json=chat("fail:start"), headers={"x-request-id": "e-1"})
            mid_stream = await http.post("/v1/chat/completions", json=chat("ok fail:stream", stream=True))
        assert client_error.status_code == 400 and client_error.json()["error"]["param"] == "messages"
        assert engine_error.status_code == 500 and "e-1" in engine_error.json()["error"]["message"]
        events = [line for line in mid_stream.text.split("\n\n") if line]
        assert json.loads(events[1][len("data: "):])["error"]["code"] == "engine_error"
        assert events[-1] == "data: [DONE]"

    asyncio.run(go())


def test_client_leaving_mid_stream_stops_the_replica_stream():
    async def go():
        async with Relayed() as relayed:
            # In-process ASGI transports buffer whole responses, so the ingress
            # gets a real HTTP server here: a client can only leave over a socket.
            front_door = ReplicaDataPlane(relayed.app)
            words = " ".join(["slow"] + [f"w{i}" for i in range(200)])
            async with httpx.AsyncClient(base_url=await front_door.url()) as http:
                body = {"prompt": words, "stream": True, "max_tokens": 500}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for _ in response.aiter_bytes():
                        break
                    assert relayed.server.engine.open_streams == 1
            # 200 events at 20 ms would take 4 s; the stream must stop long before.
            assert await settle(lambda: relayed.server.engine.open_streams == 0, timeout=1.0), "the replica kept generating"
            assert await settle(lambda: relayed.leases_held() == 0)
            front_door.stop()

    asyncio.run(go())


def test_behind_serves_proxy_too_a_full_queue_is_429_and_the_rest_are_served_in_turn():
    async def go():
        async with Relayed(max_ongoing_requests=1, max_queued_requests=1) as relayed, client(relayed.app) as http:
            body = {"model": "alpha", "prompt": "slow a b c d e f g h", "stream": True}

            async def one(index):
                await asyncio.sleep(0.02 * index)
                return await http.post("/v1/completions", json=body)

            answers = await asyncio.gather(*(one(i) for i in range(4)))
            assert [answer.status_code for answer in answers] == [200, 200, 429, 429]
            assert answers[2].headers["retry-after"] == "1" and answers[2].json()["error"]["type"] == "requests"
            assert all(answer.text.endswith("data: [DONE]\n\n") for answer in answers[:2])
            assert await settle(lambda: relayed.handle.open == 0 and relayed.handle.queued == 0)

    asyncio.run(go())


def test_behind_serves_proxy_requests_for_a_replica_whose_engine_died_are_served_by_another():
    async def go():
        async with Relayed(replicas=2) as relayed, client(relayed.app) as http:
            body = {"model": "alpha", "prompt": "slow a b c", "stream": True}
            warm = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(2)))
            assert len({answer.headers["x-llmserve-replica"] for answer in warm}) == 2
            dead, alive = relayed.servers
            dead.engine.dead = True
            answers = [await http.post("/v1/completions", json={"model": "alpha", "prompt": "one two", "stream": stream}) for stream in (True, False, True, False)]
            assert [answer.status_code for answer in answers] == [200] * 4
            assert all(answer.headers["x-llmserve-replica"] == alive._data_plane._name for answer in answers)
            assert answers[1].json()["choices"][0]["text"] == "one two" and "error" not in answers[0].text

    asyncio.run(go())


def test_a_replica_that_went_away_is_forgotten_and_serve_names_another():
    async def go():
        async with Relayed() as relayed, client(relayed.app) as http:
            assert (await http.post("/v1/completions", json={"prompt": "x"})).status_code == 200
            live_url = await relayed.server._data_plane.url()
            strand_on(relayed.relay, "http://127.0.0.1:9")  # nothing listens on the discard port
            response = await http.post("/v1/completions", json={"prompt": "again"})
            assert response.status_code == 200 and response.json()["choices"][0]["text"] == "again"
            assert set(relayed.relay._in_flight) == {live_url}

    asyncio.run(go())


def test_no_reachable_replica_is_a_500_naming_the_request_and_ends_the_lease():
    async def go():
        async with Relayed() as relayed, client(relayed.app) as http:
            relayed.server._data_plane._url = "http://127.0.0.1:9"
            response = await http.post("/v1/completions", json={"prompt": "x"}, headers={"x-request-id": "gone-1"})
            assert response.status_code == 500 and "gone-1" in response.json()["error"]["message"]
            assert relayed.handle.leases[0].cancelled

    asyncio.run(go())


def test_an_ingress_that_learned_a_replica_at_start_admits_a_first_burst_by_its_free_places():
    """Cold start: without a replica known, every request of a burst would count as waiting."""

    async def go():
        async with Relayed(max_ongoing_requests=2, max_queued_requests=1) as relayed, client(relayed.app) as http:
            relayed.relay.learn_a_replica()
            assert await settle(lambda: relayed.relay._in_flight)
            body = {"model": "alpha", "prompt": "slow a b c d e f g h", "stream": True}
            answers = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(4)))
            assert sorted(answer.status_code for answer in answers) == [200, 200, 200, 429]

    asyncio.run(go())
