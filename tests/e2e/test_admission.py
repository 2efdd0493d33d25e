"""Serve's admission rules on the paths users run, real engine: `llmserve run` and Ray's
`serve run config.yaml` (front door + handoff on both; under `serve run` the ingress takes
Serve's port, serve_port.py).

Each command serves the same tiny model twice, one replica each, both
with `max_ongoing_requests: 4`: "lined-up" queues without bound, "bounded"
queues at most 8 requests and refuses the rest with a 429. Plain HTTP clients.
A client that leaves, mid-stream or while waiting in line, is let go by the engine too.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from tests.conftest import TEST_ENGINE_KWARGS
from tests.e2e import scrape
from tests.e2e.conftest import FRONTS, engine_stats, free_port, serving, wait_for_http, wait_for_line

RUNNING: dict = {}  # the `llmserve run` process, for the Ctrl-C test
MAX_ONGOING = 4
MAX_QUEUED = 8
# Equal requests: the same greedy prompt, always this many tokens.
TOKENS = 160


@pytest.fixture(scope="module", params=FRONTS)
def base_url(request, tiny_model_paths, tmp_path_factory):
    folder = tmp_path_factory.mktemp("admission")
    port = free_port()

    def model(model_id, **deployment):
        return {
            "model_loading_config": {"model_id": model_id, "model_source": tiny_model_paths["tiny-a"]},
            "engine_kwargs": TEST_ENGINE_KWARGS,
            "deployment_config": {"num_replicas": 1, "max_ongoing_requests": MAX_ONGOING, **deployment},
        }

    models = [model("lined-up"), model("bounded", max_queued_requests=MAX_QUEUED)]
    application = {"name": "llm_app", "route_prefix": "/", "import_path": "llmserve:build_openai_app", "args": {"llm_configs": models}}
    (folder / "config.yaml").write_text(yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": port}, "applications": [application]}))
    log_path = folder / "run.log"
    with serving(request.param, folder, log_path) as process:
        if request.param == "llmserve run":
            wait_for_line(log_path, "ready in", process)
        else:
            wait_for_http(f"http://127.0.0.1:{port}/v1/models", process=process, timeout=600)
        RUNNING["process"] = process
        yield f"http://127.0.0.1:{port}"


def complete(base_url, model):
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0}
    started = time.monotonic()
    response = requests.post(base_url + "/v1/completions", json=body, timeout=600)
    return response, time.monotonic() - started


def at_once(base_url, model, count):
    """``count`` requests released together; their answers and seconds, and the wall time."""
    gate = threading.Barrier(count)

    def one(_):
        gate.wait()
        return complete(base_url, model)

    started = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, range(count)))
    return answers, time.monotonic() - started


def test_past_max_ongoing_requests_requests_wait_their_turn_and_all_succeed(base_url):
    complete(base_url, "lined-up")  # warm: the first request also opens the lease
    # The faster of two batches of four: a first batch can pay once for the engine's new batch size.
    (first, first_s), (few, few_s) = at_once(base_url, "lined-up", MAX_ONGOING), at_once(base_url, "lined-up", MAX_ONGOING)
    few_s = min(first_s, few_s)
    many, many_s = at_once(base_url, "lined-up", 6 * MAX_ONGOING)
    texts = {response.json()["choices"][0]["text"] for response, _ in first + few + many}
    assert [response.status_code for response, _ in first + few + many] == [200] * 8 * MAX_ONGOING
    assert len(texts) == 1  # greedy and equal: one answer
    ratio = many_s / few_s
    print(f"{MAX_ONGOING} requests: {few_s:.2f} s; {6 * MAX_ONGOING}: {many_s:.2f} s ({ratio:.1f}x)")
    # Six turns of four: at least 4x (measured 4.6-6x), where admitting all at once took 1.75x.
    assert ratio >= 4, f"{6 * MAX_ONGOING} requests took {ratio:.1f}x the time of {MAX_ONGOING}"


def test_past_max_queued_requests_the_rest_get_429_with_retry_after_at_once(base_url):
    complete(base_url, "bounded")
    before = scrape.settled(base_url)
    answers, _ = at_once(base_url, "bounded", 3 * MAX_ONGOING * 2)
    served = [(response, seconds) for response, seconds in answers if response.status_code == 200]
    refused = [(response, seconds) for response, seconds in answers if response.status_code == 429]
    assert len(served) + len(refused) == len(answers), sorted(response.status_code for response, _ in answers)
    print(f"served {len(served)}, refused {len(refused)}; slowest refusal {max(s for _, s in refused):.2f} s")
    assert len(served) == MAX_ONGOING + MAX_QUEUED and len(refused) == len(answers) - len(served)
    for response, seconds in refused:
        assert seconds < 1.0
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
    # Once the line is gone, the model serves again.
    assert complete(base_url, "bounded")[0].status_code == 200
    # /metrics counts each refusal, as a rejection and as a 429 answer of the front door.
    refusals = {"model": "bounded", "status": "429"}

    def delta(samples, name, **labels):
        return scrape.total(samples, name, **labels) - scrape.total(before, name, **labels)

    after = scrape.wait_until(base_url, lambda samples: delta(samples, "ray_llmserve_requests_total", **refusals) >= len(refused))
    assert delta(after, "ray_llmserve_requests_total", **refusals) == len(refused)
    assert delta(after, "ray_llmserve_rejections_total", model="bounded") == len(refused)


def test_a_client_leaving_mid_stream_aborts_its_engine_request(base_url):
    deployment = "LLMServer:lined-up"
    before = engine_stats(deployment)
    body = {"model": "lined-up", "prompt": "Once upon a time", "max_tokens": 400, "min_tokens": 400, "temperature": 0, "stream": True}
    with requests.post(base_url + "/v1/completions", json=body, stream=True, timeout=120) as response:
        events = (line for line in response.iter_lines(chunk_size=1) if line.startswith(b"data: "))
        next(events), next(events)  # under way; then the client hangs up
    # (Each look at the stats is a new process joining Ray: seconds apiece on a loaded machine.)
    deadline = time.monotonic() + 60
    while (after := engine_stats(deployment))["requests_aborted"] == before["requests_aborted"]:
        assert time.monotonic() < deadline, "the engine never aborted the request of a client that left"
        time.sleep(0.5)
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["requests_in_engine"] == 0
    assert after["requests_handed_off"] > before["requests_handed_off"]  # the default path: the replica wrote the stream


def test_ctrl_c_lets_the_streams_in_flight_finish(base_url):
    """Graceful drain: Ctrl-C while streams run; each ends whole, with [DONE] and no error (runs last)."""
    import signal

    from tests.e2e import chaos

    body = {"model": "lined-up", "prompt": "Once upon a time", "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0}
    expected = chaos.stream(base_url, body)
    assert expected[0] == "completed"
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(chaos.stream, base_url, body) for _ in range(4)]
        time.sleep(0.5)  # under way
        RUNNING["process"].send_signal(signal.SIGINT)
        outcomes = [future.result() for future in streams]
    assert outcomes == [expected] * 4, outcomes
    assert RUNNING["process"].wait(timeout=120) == 0
