"""Autoscaling on the real engine under `llmserve run`: a second replica starts under load (llmserve's
TtftPolicy), serves, and goes after the load with no failed request; a model at zero replicas
starts on its first request, which waits and succeeds."""

import json
import re
import threading
import time

import pytest
import requests
import yaml

from tests.conftest import TEST_ENGINE_KWARGS
from tests.e2e.conftest import BIN, free_port, start, stop, wait_for_line

STATUS_LINE = re.compile(r"llmserve: \[\s*([\d.]+)s\] LLMServer:tiny-a: \w+ \((.*)\)")


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    import ray

    ray.shutdown()


def start_app(tmp_path, tiny_model_paths, autoscaling_config, **engine_kwargs):
    model = {
        "model_loading_config": {"model_id": "tiny-a", "model_source": tiny_model_paths["tiny-a"]},
        "engine_kwargs": {**TEST_ENGINE_KWARGS, **engine_kwargs},
        "deployment_config": {"autoscaling_config": autoscaling_config},
    }
    config = {"applications": [{"name": "llmserve", "route_prefix": "/", "import_path": "llmserve:build_openai_app", "args": {"llm_configs": [model]}}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    process, log = start([str(BIN / "llmserve"), "run", "config.yaml", "--host", "127.0.0.1", "--port", str(port)], tmp_path, tmp_path / "run.log")
    return f"http://127.0.0.1:{port}", process, log


def stream_once(url, started):
    """One streamed chat: (seconds since ``started``, TTFT or None, replica, status, finished)."""
    sent = time.monotonic()
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 32, "stream": True}
    try:
        with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=300) as answer:
            ttft, finished = None, False
            for line in answer.iter_lines():
                if line and ttft is None:
                    ttft = time.monotonic() - sent
                finished = finished or line == b"data: [DONE]"
            return sent - started, ttft, answer.headers.get("x-llmserve-replica"), answer.status_code, finished
    except requests.RequestException as exc:
        return sent - started, None, None, repr(exc), False


def replica_timeline(log_text):
    """(seconds since `llmserve run` started, running replicas) at each status line of the model."""
    points = []
    for seconds, states in STATUS_LINE.findall(log_text):
        running = re.search(r"(\d+) running", states)
        points.append((float(seconds), int(running.group(1)) if running else 0))
    return points


def plot(timeline, answers, offset, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    times = [t - offset for t, _ in timeline]
    top.step(times + [max(times[-1], answers[-1][0]) + 5], [n for _, n in timeline] + [timeline[-1][1]], where="post")
    top.set_ylabel("running replicas")
    top.set_title("TtftPolicy, min 1 / max 2: 8 concurrent streams, then none")
    replicas = sorted({a[2] for a in answers if a[2]})
    for replica in replicas:
        points = [(a[0], a[1]) for a in answers if a[2] == replica and a[1] is not None]
        bottom.scatter([p[0] for p in points], [p[1] for p in points], s=6, label=replica)
    bottom.set_ylabel("time to first token (s)")
    bottom.set_xlabel("seconds since the load began")
    bottom.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def test_a_second_replica_starts_under_load_serves_and_goes_after_it_with_no_failed_request(tiny_model_paths, tmp_path):
    policy = {"policy_function": "llmserve.autoscaling:TtftPolicy", "policy_kwargs": {"ttft_target_s": 0.05}}
    scaling = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 2, "downscale_delay_s": 10, "policy": policy}
    # 8 streams on an engine that runs 2 at a time keep requests waiting in the engine, which
    # TtftPolicy scales on whatever the machine's speed (on a fast one the tiny model's TTFT
    # stays under any target a slow one could meet).
    url, process, log = start_app(tmp_path, tiny_model_paths, scaling, max_num_seqs=2)
    answers, stop_load = [], threading.Event()
    try:
        ready = wait_for_line(tmp_path / "run.log", "ready in", process)
        load_started = time.monotonic()
        load_began_at = float(re.search(r"ready in ([\d.]+)s", ready).group(1))  # (on the status lines' clock)

        def client():
            while not stop_load.is_set():
                answers.append(stream_once(url, load_started))

        clients = [threading.Thread(target=client) for _ in range(8)]
        for worker in clients:
            worker.start()
        deadline = time.monotonic() + 300
        while len({a[2] for a in answers if a[3] == 200}) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        second_serving = time.monotonic() - load_started
        time.sleep(15)  # both serve a while
        stop_load.set()
        for worker in clients:
            worker.join()
        load_ended = time.monotonic() - load_started
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            timeline = replica_timeline((tmp_path / "run.log").read_text())
            if max(n for _, n in timeline) == 2 and timeline[-1][1] == 1 and "1 stopping" not in (tmp_path / "run.log").read_text().splitlines()[-1]:
                break
            time.sleep(2)
        scaled_down = time.monotonic() - load_started
    finally:
        stop_load.set()
        stop(process)
        log.close()
    log_text = (tmp_path / "run.log").read_text()
    timeline = replica_timeline(log_text)
    failed = [a for a in answers if a[3] != 200 or not a[4]]
    served_by = {a[2] for a in answers if a[3] == 200}
    ttfts = sorted(a[1] for a in answers if a[1] is not None)
    plot(timeline, answers, load_began_at, tmp_path / "autoscaling.png")
    print(
        f"autoscaling: {len(answers)} streams, {len(failed)} failed; second replica serving after {second_serving:.0f}s of load; "
        f"load ended at {load_ended:.0f}s; back to one replica at {scaled_down:.0f}s; TTFT p50 {ttfts[len(ttfts) // 2]:.3f}s "
        f"p90 {ttfts[int(len(ttfts) * 0.9)]:.3f}s; plot {tmp_path / 'autoscaling.png'}; timeline {timeline}"
    )
    assert not failed, failed[:5]
    assert len(served_by) == 2, served_by
    assert max(n for _, n in timeline) == 2 and timeline[-1][1] == 1, timeline


def test_a_model_at_zero_replicas_starts_on_its_first_request_which_waits_and_succeeds(tiny_model_paths, tmp_path):
    scaling = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "downscale_delay_s": 600}
    url, process, log = start_app(tmp_path, tiny_model_paths, scaling)
    try:
        output = wait_for_line(tmp_path / "run.log", "ready in", process)
        assert not any(n for _, n in replica_timeline(output)), "no replica before the first request"
        listed = time.monotonic()
        cards = requests.get(url + "/v1/models", timeout=30).json()["data"]
        assert [card["id"] for card in cards] == ["tiny-a"] and time.monotonic() - listed < 10  # listed without waiting for a replica
        sent = time.monotonic()
        body = {"model": "tiny-a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        answer = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
        waited = time.monotonic() - sent
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.text)["usage"]["completion_tokens"] > 0
        print(f"cold start: the first request waited {waited:.0f}s for a replica and got its answer")
    finally:
        stop(process)
        log.close()
