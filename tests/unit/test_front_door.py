"""The ingress's own listener over real sockets: fake engine replicas, no Ray."""

import asyncio
import json
import socket

import httpx
import pytest
from starlette.responses import StreamingResponse

from llmserve import LLMConfig, LLMServer
from llmserve import front_door as front_door_module
from llmserve import relay as relay_module
from llmserve.front_door import FrontDoor, Upstream
from llmserve.handoff import HandoffCall, HandoffListener, address_for
from llmserve.ingress import open_front_door
from llmserve.placement import Admission
from llmserve.relay import ReplicaRelay
from llmserve.routing import ModelRouter
from llmserve.testing import FakeEngine, InProcessHandle, strand_on


class Door:
    """A front door on a free port over fake-engine replicas (one unless told), as an ingress replica runs it."""

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
        self.door = await open_front_door(ModelRouter({"alpha": self.relay}), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.door.port}"
        return self

    async def __aexit__(self, *_):
        self.door.close()
        for server in self.servers:
            server.__del__()

    def leases_held(self):
        return self.server._data_plane.leases_held

    def handed_off(self):
        return self.server._data_plane._handoff.taken


async def settle(condition, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def chat(content, **extra):
    return {"model": "alpha", "messages": [{"role": "user", "content": content}], **extra}


def one_connection(url):
    return httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))


def test_answers_errors_and_lists_share_one_kept_alive_connection():
    async def go():
        async with Door() as door, one_connection(door.url) as http:
            whole = await http.post("/v1/chat/completions", json=chat("one two"), headers={"x-request-id": "w-1"})
            streamed = await http.post("/v1/completions", json={"model": "alpha", "prompt": "a b c", "stream": True})
            unknown = await http.post("/v1/completions", json={"model": "beta", "prompt": "x"})
            not_json = await http.post("/v1/completions", content=b"{oops")
            models = await http.get("/v1/models")
            assert whole.status_code == 200 and whole.json()["id"] == "w-1"
            assert whole.headers["x-request-id"] == "w-1" and "connection" not in whole.headers
            assert whole.headers["x-llmserve-replica"].startswith("alpha#")  # a name, not the address
            events = [line[len("data: "):] for line in streamed.text.split("\n\n") if line]
            assert [json.loads(event)["choices"][0]["text"] for event in events[:-1]] == ["a", "b", "c"]
            assert events[-1] == "[DONE]"
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
            assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
            assert [card["id"] for card in models.json()["data"]] == ["alpha"]
            # Only the model calls used a lease: the second took over the first's,
            # which ends once no request takes it over.
            assert len(door.handle.leases) == 1
            assert await settle(lambda: all(lease.cancelled for lease in door.handle.leases))
            assert await settle(lambda: door.leases_held() == 0)

    asyncio.run(go())


def test_steady_traffic_hands_leases_on_instead_of_opening_one_per_request():
    async def go():
        async with Door() as door, httpx.AsyncClient(base_url=door.url) as http:
            body = {"model": "alpha", "prompt": "slow a b c", "stream": True}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            for _ in range(3):
                answers = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(4)))
                assert [answer.status_code for answer in answers] == [200] * 4
            # 13 requests, at most 4 at a time: one lease each would be 13.
            assert len(door.handle.leases) < 13
            assert await settle(lambda: all(lease.cancelled for lease in door.handle.leases))
            assert await settle(lambda: door.leases_held() == 0)

    asyncio.run(go())


def test_client_leaving_mid_stream_stops_the_replica_stream():
    async def go():
        async with Door() as door, httpx.AsyncClient(base_url=door.url) as http:
            words = " ".join(["slow"] + [f"w{i}" for i in range(200)])
            body = {"model": "alpha", "prompt": words, "stream": True, "max_tokens": 500}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_bytes():
                    break
                assert door.server.engine.open_streams == 1
                assert door.handed_off() == 1  # the replica itself was writing to the client
            # 200 events at 20 ms would take 4 s; the stream must stop long before.
            assert await settle(lambda: door.server.engine.open_streams == 0, timeout=1.0), "the replica kept generating"
            assert await settle(lambda: door.leases_held() == 0)

    asyncio.run(go())


def slow_stream(words):
    return {"model": "alpha", "prompt": "slow " + " ".join(f"w{i}" for i in range(words)), "stream": True, "max_tokens": 64}


def test_at_most_max_ongoing_requests_run_and_the_rest_wait_their_turn_in_order():
    async def go():
        async with Door(max_ongoing_requests=2) as door, httpx.AsyncClient(base_url=door.url) as http:
            peak, started = 0, []

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, door.server.engine.open_streams)
                    await asyncio.sleep(0.002)

            async def one(index):
                await asyncio.sleep(0.03 * index)  # the order they are sent in
                async with http.stream("POST", "/v1/completions", json=slow_stream(5)) as response:
                    events = 0
                    async for chunk in response.aiter_bytes():
                        if not events:
                            started.append(index)
                        events += chunk.count(b"data: ")
                    return response.status_code, events

            watcher = asyncio.ensure_future(watch())
            answers = await asyncio.gather(*(one(i) for i in range(6)))
            watcher.cancel()
            assert answers == [(200, 7)] * 6  # 6 words and [DONE] each
            assert peak == 2, f"{peak} streams ran at once; max_ongoing_requests is 2"
            assert started == list(range(6)), f"served out of order: {started}"
            assert await settle(lambda: door.handle.open == 0 and door.handle.queued == 0 and not door.relay._waiting)

    asyncio.run(go())


def test_past_max_queued_requests_the_answer_is_429_with_retry_after_in_the_envelope():
    async def go():
        async with Door(max_ongoing_requests=1, max_queued_requests=2) as door, httpx.AsyncClient(base_url=door.url) as http:

            async def one(index):
                await asyncio.sleep(0.02 * index)
                return await http.post("/v1/completions", json=slow_stream(10))

            answers = await asyncio.gather(*(one(i) for i in range(6)))
            served = [a for a in answers if a.status_code == 200]
            refused = [a for a in answers if a.status_code == 429]
            assert (len(served), len(refused)) == (3, 3), [a.status_code for a in answers]
            for answer in refused:
                assert answer.headers["retry-after"] == "1"
                assert answer.json()["error"]["code"] == "rate_limit_exceeded"
            assert await settle(lambda: door.handle.open == 0 and door.handle.queued == 0)

    asyncio.run(go())


def test_a_client_that_leaves_while_waiting_in_line_leaves_the_line():
    async def go():
        async with Door(max_ongoing_requests=1) as door, httpx.AsyncClient(base_url=door.url) as http:
            running = asyncio.ensure_future(http.post("/v1/completions", json=slow_stream(15)))
            assert await settle(lambda: door.handle.open == 1)
            waiting = asyncio.ensure_future(http.post("/v1/completions", json=slow_stream(3)))
            assert await settle(lambda: door.handle.queued == 1 and len(door.relay._waiting) == 1)
            waiting.cancel()  # the client hangs up
            assert await settle(lambda: door.handle.queued == 0 and not door.relay._waiting)
            assert (await running).status_code == 200
            assert await settle(lambda: door.handle.open == 0)

    asyncio.run(go())


def test_a_replica_that_went_away_is_forgotten_and_serve_names_another():
    async def go():
        async with Door() as door, httpx.AsyncClient(base_url=door.url) as http:
            assert (await http.post("/v1/completions", json={"prompt": "x"})).status_code == 200
            live_url = await door.server._data_plane.url()
            strand_on(door.relay, "http://127.0.0.1:9")  # nothing listens on the discard port
            response = await http.post("/v1/completions", json={"prompt": "again"})
            assert response.status_code == 200 and response.json()["choices"][0]["text"] == "again"
            assert set(door.relay._in_flight) == {live_url}

    asyncio.run(go())


def test_no_reachable_replica_is_a_503_naming_the_request_and_ends_every_lease():
    async def go():
        async with Door() as door, httpx.AsyncClient(base_url=door.url) as http:
            door.server._data_plane._url = "http://127.0.0.1:9"
            response = await http.post("/v1/completions", json={"prompt": "x"}, headers={"x-request-id": "gone-1"})
            assert response.status_code == 503 and "gone-1" in response.json()["error"]["message"]
            assert len(door.handle.leases) == 2
            assert await settle(lambda: all(lease.cancelled for lease in door.handle.leases))

    asyncio.run(go())


async def raw_exchange(port, data, read_until=b"\r\n\r\n"):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.readuntil(read_until), 5)
    return reader, writer, answer


def test_malformed_and_oversized_requests_get_the_error_envelope(monkeypatch):
    async def go():
        monkeypatch.setattr(front_door_module, "MAX_BODY_BYTES", 10)
        door = FrontDoor(lambda request: pytest.fail("routed a request it should have refused"))
        await door.start("127.0.0.1", 0)
        _, _, garbage = await raw_exchange(door.port, b"NOT HTTP AT ALL\r\n\r\n", read_until=b"}}")
        body = b'{"prompt": "far too long"}'
        head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body)
        _, _, too_big = await raw_exchange(door.port, head + body, read_until=b"}}")
        door.close()
        assert garbage.startswith(b"HTTP/1.1 400 ") and b'"invalid_request_error"' in garbage
        assert too_big.startswith(b"HTTP/1.1 413 ") and b'"payload_too_large"' in too_big

    asyncio.run(go())


async def one_shot_upstream(answer: bytes):
    """A replica stand-in that reads one request, writes ``answer`` and hangs up."""

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_a_replica_dying_mid_stream_ends_the_stream_with_one_error_event():
    async def go():
        event = b"data: {}\n\n"
        cut_short = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        server, port = await one_shot_upstream(cut_short + b"%x\r\n%s\r\n" % (len(event), event))
        ended = []
        last = b'data: {"error": {"code": "engine_error"}}\n\ndata: [DONE]\n\n'

        async def route(request):
            return Upstream("127.0.0.1", port, "r-1", done=lambda: ended.append(1), last_words=lambda: b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))

        door = FrontDoor(route)
        await door.start("127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{door.port}") as http:
            response = await http.post("/v1/completions", json={"stream": True})
        door.close()
        server.close()
        assert response.status_code == 200
        assert response.text == (event + last).decode()
        assert ended == [1]

    asyncio.run(go())


def test_expect_100_continue_is_answered_before_the_body_is_sent():
    async def go():
        server, port = await one_shot_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

        async def route(request):
            assert request.body == b"{}"
            return Upstream("127.0.0.1", port)

        door = FrontDoor(route)
        await door.start("127.0.0.1", 0)
        head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
        reader, writer, interim = await raw_exchange(door.port, head)
        writer.write(b"{}")
        final = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        writer.close()
        door.close()
        server.close()
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert final.startswith(b"HTTP/1.1 200 OK") and b"connection" not in final.lower()

    asyncio.run(go())


def test_a_reserved_port_is_refused_to_others_but_not_to_front_doors():
    reservation = front_door_module.reserve_port("127.0.0.1", 0)
    port = reservation.getsockname()[1]
    try:
        with socket.socket() as stranger:  # e.g. an outgoing connection's local port
            with pytest.raises(OSError):
                stranger.bind(("127.0.0.1", port))
        with pytest.raises(OSError):  # a second llmserve run on the same port
            front_door_module.reserve_port("127.0.0.1", port).close()
        with socket.socket() as probe:  # nothing answers before a front door opens
            assert probe.connect_ex(("127.0.0.1", port)) != 0

        async def go():
            async with Door() as door:
                door.door.close()
                reopened = await open_front_door(ModelRouter({"alpha": door.relay}), "127.0.0.1", port)
                try:
                    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                        answer = await http.post("/v1/completions", json={"model": "alpha", "prompt": "a b"})
                    assert answer.status_code == 200 and answer.json()["model"] == "alpha"
                    with pytest.raises(OSError):  # nor once the door listens
                        front_door_module.reserve_port("127.0.0.1", port).close()
                finally:
                    reopened.close()

        asyncio.run(go())
    finally:
        reservation.close()


async def read_response(reader):
    """One HTTP/1.1 response off a raw connection: (head, body), by content-length or chunks."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").lower().split("\r\n")
    length = next((int(line.split(":", 1)[1]) for line in lines if line.startswith("content-length:")), None)
    if length is not None:
        return head, await reader.readexactly(length)
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return head, body
        body += chunk[:-2]


def post(path, payload):
    body = json.dumps(payload).encode()
    return b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (path, len(body), body)


def test_a_replica_on_this_node_answers_on_the_client_socket_which_stays_the_front_doors():
    async def go():
        async with Door() as door:
            reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
            writer.write(post(b"/v1/completions", {"model": "alpha", "prompt": "one two"}))
            whole_head, whole = await read_response(reader)
            writer.write(post(b"/v1/completions", {"model": "alpha", "prompt": "a b c", "stream": True}))
            stream_head, stream = await read_response(reader)
            # The same connection then carries a request the ingress answers itself.
            writer.write(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            _, models = await read_response(reader)
            writer.close()
            assert whole_head.startswith(b"HTTP/1.1 200 ") and json.loads(whole)["choices"][0]["text"] == "one two"
            assert b"x-llmserve-replica: alpha#" in whole_head and b"127.0.0.1" not in whole_head
            assert b"transfer-encoding: chunked" in stream_head and b"text/event-stream" in stream_head
            assert stream.count(b"data: ") == 4 and stream.endswith(b"data: [DONE]\n\n")
            assert [card["id"] for card in json.loads(models)["data"]] == ["alpha"]
            assert door.handed_off() == 2

    asyncio.run(go())


def test_a_replica_without_handoff_still_answers_through_the_splice():
    async def go():
        async with Door() as door, httpx.AsyncClient(base_url=door.url) as http:
            assert (await http.post("/v1/completions", json={"prompt": "x"})).status_code == 200
            door.server._data_plane._handoff.close()  # as seen from a front door on another node
            streamed = await http.post("/v1/completions", json={"prompt": "a b", "stream": True})
            assert streamed.status_code == 200 and streamed.text.count("data: ") == 3
            assert door.handed_off() == 1

    asyncio.run(go())


@pytest.mark.parametrize("transport", ["handoff", "splice"])
def test_requests_sent_to_a_replica_whose_engine_died_are_served_by_another(transport):
    async def go():
        async with Door(replicas=2) as door, httpx.AsyncClient(base_url=door.url) as http:
            body = {"model": "alpha", "prompt": "slow a b c", "stream": True}
            warm = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(2)))
            names = {answer.headers["x-llmserve-replica"] for answer in warm}
            assert len(names) == 2  # both replicas served, and each left a lease open
            if transport == "splice":  # as seen from a front door on another node
                for server in door.servers:
                    server._data_plane._handoff.close()
            dead, alive = door.servers
            dead.engine.dead = True
            answers = []
            for stream in (True, False, True, False):
                answers.append(await http.post("/v1/completions", json={"model": "alpha", "prompt": "one two", "stream": stream}))
            answers += await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(4)))
            assert [answer.status_code for answer in answers] == [200] * 8
            assert all(answer.headers["x-llmserve-replica"] == alive._data_plane._name for answer in answers)
            assert answers[1].json()["choices"][0]["text"] == "one two"
            assert answers[0].text.endswith("data: [DONE]\n\n") and "error" not in answers[0].text

    asyncio.run(go())


def test_old_leases_are_replaced_so_serve_keeps_placing_requests(monkeypatch):
    monkeypatch.setattr(relay_module, "LEASE_RENEW_S", 0.05)

    async def go():
        async with Door(replicas=2) as door, one_connection(door.url) as http:
            names = []
            for _ in range(8):
                answer = await http.post("/v1/completions", json={"prompt": "x"})
                names.append(answer.headers["x-llmserve-replica"])
                await asyncio.sleep(0.08)  # one request at a time: without renewal one lease serves them all
            assert len(set(names)) == 2, names
            assert len(door.handle.leases) >= 4

    asyncio.run(go())


def test_a_drain_lets_answers_in_flight_finish_and_takes_nothing_new():
    async def go():
        async with Door() as door:
            async with httpx.AsyncClient(base_url=door.url) as streaming, one_connection(door.url) as idle:
                assert (await idle.post("/v1/completions", json={"prompt": "x"})).status_code == 200  # kept alive
                in_flight = asyncio.ensure_future(streaming.post("/v1/completions", json=slow_stream(20)))
                assert await settle(lambda: door.server.engine.open_streams == 1)
                left = await door.door.drain(5.0)
                answer = await in_flight
                assert left == 0
                assert answer.status_code == 200 and answer.text.count("data: ") == 22  # all 21 words and [DONE]
                with pytest.raises(httpx.TransportError):  # the kept-alive connection was closed, no new one is taken
                    await idle.post("/v1/completions", json={"prompt": "y"})
            assert await settle(lambda: door.leases_held() <= 1)

    asyncio.run(go())


def test_a_connection_accepted_just_before_a_drain_gets_its_first_request_answered():
    """As in a rolling update: clients connected, the drain began, then their requests came."""
    from llmserve.front_door import FIRST_REQUEST_GRACE_S

    async def go():
        async with Door() as door:
            reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
            silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", door.door.port)
            assert await settle(lambda: len(door.door._connections) == 2)  # both accepted
            started = asyncio.get_running_loop().time()
            draining = asyncio.ensure_future(door.door.drain(10.0))
            await asyncio.sleep(0.1)
            body = json.dumps({"model": "alpha", "prompt": "one two"}).encode()
            writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            answer = await asyncio.wait_for(reader.read(), 5)  # to the end: the connection closes after it
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"] == "one two"
            # The one that sends nothing is closed once its grace is over; the drain waits no longer.
            assert await asyncio.wait_for(silent_reader.read(), 5) == b""
            assert await draining == 0
            assert asyncio.get_running_loop().time() - started < FIRST_REQUEST_GRACE_S + 1
            writer.close()
            silent_writer.close()

    asyncio.run(go())


def test_a_handed_off_stream_cut_short_ends_with_one_error_event():
    async def go():
        event = b"data: {}\n\n"
        last = b'data: {"error": {"code": "engine_error"}}\n\ndata: [DONE]\n\n'

        async def failing_app(scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": event, "more_body": True})
            raise RuntimeError("the replica broke mid-stream")

        listener = HandoffListener(failing_app, address_for("127.0.0.1", 9))
        ended = []

        async def route(request):
            return Upstream("127.0.0.1", 9, "r-1", done=lambda: ended.append(1), last_words=lambda: b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last), hand_off=True)

        door = FrontDoor(route)
        await door.start("127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{door.port}") as http:
            response = await http.post("/v1/completions", json={"stream": True})
        door.close()
        listener.close()
        assert response.status_code == 200
        assert response.text == (event + last).decode()
        assert ended == [1] and listener.taken == 1

    asyncio.run(go())


def test_a_handed_off_stream_outlives_its_front_door_and_then_closes_the_connection():
    async def go():
        events = [b"data: %d\n\n" % index for index in range(20)]
        engine_stopped = asyncio.Event()

        async def slowly():
            for event in events:
                yield event
                await asyncio.sleep(0.01)
            engine_stopped.set()

        async def slow_app(scope, receive, send):
            # Starlette's stream stops as soon as `receive` says the client left.
            await StreamingResponse(slowly(), media_type="text/event-stream")(scope, receive, send)

        listener = HandoffListener(slow_app, address_for("127.0.0.1", 9))
        server = socket.create_server(("127.0.0.1", 0))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.getsockname()[1])
        accepted, _ = server.accept()
        head = {"method": "POST", "path": "/v1/completions", "headers": [["content-length", "2"]]}
        call = await HandoffCall.start(address_for("127.0.0.1", 9), accepted, head, b"{}")
        await asyncio.sleep(0.05)  # a few events in: then the front door dies (no CLIENT_LEFT)
        accepted.close()
        call._connection.close()
        answer = await asyncio.wait_for(reader.read(), 5)  # read to EOF: the replica closes after
        body, payload = answer.split(b"\r\n\r\n", 1)[1], b""
        while body:  # chunked framing, to its last (empty) chunk
            size, rest = body.split(b"\r\n", 1)
            payload, body = payload + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
        assert payload == b"".join(events) and answer.endswith(b"0\r\n\r\n")
        assert engine_stopped.is_set()
        writer.close()
        listener.close()
        server.close()

    asyncio.run(go())


async def answer_to(port, data, read_until=b"}}"):
    _, writer, answer = await raw_exchange(port, data, read_until=read_until)
    writer.close()
    return answer


def test_request_heads_past_the_limits_are_431_and_declared_huge_bodies_413_at_once():
    async def go():
        door = FrontDoor(lambda request: pytest.fail("routed a request it should have refused"))
        await door.start("127.0.0.1", 0)
        many = b"".join(b"x-h%d: v\r\n" % index for index in range(front_door_module.MAX_HEADERS + 1))
        too_many = await answer_to(door.port, b"GET /health HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
        long_head = await answer_to(door.port, b"GET /health HTTP/1.1\r\nx-big: " + b"a" * (front_door_module.MAX_HEAD_BYTES + 1) + b"\r\n\r\n")
        # Two gigabytes declared, none sent: the answer comes before any of the body.
        huge = await answer_to(door.port, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2147483648\r\n\r\n")
        door.close()
        assert too_many.startswith(b"HTTP/1.1 431 ") and b'"request_header_fields_too_large"' in too_many
        assert long_head.startswith(b"HTTP/1.1 431 ")
        assert huge.startswith(b"HTTP/1.1 413 ") and b'"payload_too_large"' in huge

    asyncio.run(go())


def test_stalled_clients_get_408_and_idle_connections_are_closed(monkeypatch):
    async def go():
        monkeypatch.setattr(front_door_module, "HEAD_TIMEOUT_S", 0.2)
        monkeypatch.setattr(front_door_module, "BODY_STALL_S", 0.2)
        monkeypatch.setattr(front_door_module, "IDLE_TIMEOUT_S", 0.3)
        door = FrontDoor(lambda request: pytest.fail("routed a request it should have refused"))
        await door.start("127.0.0.1", 0)
        slow_head = await answer_to(door.port, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        slow_body = await answer_to(door.port, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        idle_closed = await asyncio.wait_for(reader.read(), 5)  # EOF once the idle timeout passed
        writer.close()
        door.close()
        assert slow_head.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in slow_head
        assert slow_body.startswith(b"HTTP/1.1 408 ")
        assert idle_closed == b""

    asyncio.run(go())


def test_a_bad_request_pipelined_behind_a_stream_is_answered_after_the_stream():
    async def go():
        async with Door() as door:
            body = json.dumps(chat("slow one two three four five", stream=True)).encode()
            first = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
            reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
            writer.write(first + body + b"NOT HTTP AT ALL\r\n\r\n")
            everything = await asyncio.wait_for(reader.read(), 10)  # the door closes after the 400
            writer.close()
        stream_end = everything.index(b"data: [DONE]")
        refusal = everything.index(b"HTTP/1.1 400 ")
        assert everything.count(b"HTTP/1.1 200 ") == 1 and stream_end < refusal
        assert everything[:refusal].count(b"data: {") == 6  # "slow" and five words, none cut

    asyncio.run(go())


def test_the_front_door_answers_requests_without_a_valid_key_with_401():
    async def go():
        from llmserve.auth import ApiKeys

        config = LLMConfig(model_loading_config={"model_id": "alpha"})
        server = await LLMServer.create(config, engine_cls=FakeEngine)
        door = await open_front_door(ModelRouter({"alpha": ReplicaRelay(InProcessHandle(server))}), "127.0.0.1", 0, ApiKeys(["sk-1"]))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{door.port}") as http:
            refused = await http.post("/v1/chat/completions", json=chat("hi"))
            served = await http.post("/v1/chat/completions", json=chat("hi"), headers={"authorization": "Bearer sk-1"})
            health = await http.get("/health")
        door.close()
        handed_off = server._data_plane.handoffs_taken
        server.__del__()
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert served.status_code == 200 and handed_off == 1  # only the authorized request reached the replica
        assert health.status_code == 200

    asyncio.run(go())


def test_a_handed_off_stream_describes_each_write_and_the_socket_says_which_went_out():
    """The pipe's lines and the client socket's byte count tell exactly which tokens a client
    has, also of a stream its replica stops (migration.py); the lines never reach the client."""
    from llmserve.handoff import COMPLETE, CUT_SHORT
    from llmserve.migration import Marked, StreamCut
    from llmserve.responses import streamed_response

    async def go(cut_after):
        async def events():
            for index in range(6):
                if index == cut_after:
                    raise StreamCut()
                yield Marked(f"data: {index}\n\n", json.dumps({"t": [100 + index]}).encode())

        async def app(scope, receive, send):
            await (await streamed_response(events(), "r"))(scope, receive, send)

        listener = HandoffListener(app, address_for("127.0.0.1", 10))
        server = socket.create_server(("127.0.0.1", 0))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.getsockname()[1])
        accepted, _ = server.accept()
        accepted.sendall(b"earlier bytes")  # the front door's own, before the handoff: not counted
        await reader.readexactly(13)
        head = {"method": "POST", "path": "/v1/completions", "headers": [["content-length", "2"]]}
        call = await HandoffCall.start(address_for("127.0.0.1", 10), accepted, head, b"{}", reports_progress=True)
        outcome = await call.finished()
        delivered = call.delivered()
        call.close()
        writer.close()
        accepted.close()
        listener.close()
        server.close()
        return outcome, delivered

    outcome, delivered = asyncio.run(go(cut_after=None))
    assert outcome == COMPLETE and delivered.exact and delivered.ended
    assert delivered.tokens == [100, 101, 102, 103, 104, 105]
    outcome, delivered = asyncio.run(go(cut_after=3))
    assert outcome == CUT_SHORT and delivered.exact and not delivered.ended
    assert delivered.tokens == [100, 101, 102]
