"""The dashboard, proven on real parts: a real Prometheus (Debian's package) scrapes `llmserve run`
(real engine, a base model and a LoRA adapter) under load with errors and refusals; every panel's
query of examples/grafana/llmserve-dashboard.json returns data, and `llmserve dashboard` draws
the panels to a PNG from that Prometheus."""

import concurrent.futures
import json
import math
import shutil
import subprocess
import threading
import time
from collections import Counter

import pytest
import requests
import yaml

from llmserve.dashboard import panel_queries, query
from llmserve.tiny_model import make_tiny_adapter
from tests.conftest import REPO, TEST_ENGINE_KWARGS
from tests.e2e.conftest import BIN, free_port, start, stop, wait_for_http, wait_for_line

LOAD_S = 45  # Ray exports every 10 s: enough for several points in each rate window


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def app_url(tiny_model_paths, tmp_path_factory):
    """tiny-a with adapter `sql`, 4 requests at once and 4 queued (more are refused), under `llmserve run`."""
    folder = tmp_path_factory.mktemp("dashboard")
    make_tiny_adapter(tiny_model_paths["tiny-a"], folder / "adapters" / "sql", seed=21)
    model = {
        "model_loading_config": {"model_id": "tiny-a", "model_source": tiny_model_paths["tiny-a"]},
        "engine_kwargs": TEST_ENGINE_KWARGS,
        "lora_config": {"dynamic_lora_loading_path": str(folder / "adapters"), "max_num_adapters_per_replica": 2, "max_lora_rank": 8},
        "deployment_config": {"max_ongoing_requests": 4, "max_queued_requests": 4},
    }
    config = {"applications": [{"name": "llmserve", "route_prefix": "/", "import_path": "llmserve:build_openai_app", "args": {"llm_configs": [model]}}]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    process, log = start([str(BIN / "llmserve"), "run", "config.yaml", "--host", "127.0.0.1", "--port", str(port)], folder, folder / "run.log")
    try:
        wait_for_line(folder / "run.log", "ready in", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
        log.close()


@pytest.fixture
def prometheus(app_url, tmp_path):
    """Prometheus with the example's scrape config, pointed at the app and scraping every second."""
    assert shutil.which("prometheus"), "make test installs Debian's prometheus package"
    config = yaml.safe_load((REPO / "examples" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [app_url.removeprefix("http://")]}]
    job["scrape_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/-/ready", timeout=60, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def load(url, stop_at, statuses):
    """Streams to the base model and the adapter, a steady trickle of bad requests, and bursts past the queue."""

    def streams(model):
        while time.monotonic() < stop_at:
            body = {"model": model, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 24, "stream": True}
            with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=120) as answer:
                statuses[answer.status_code] += 1
                for _ in answer.iter_lines():
                    pass

    def bad_requests():
        while time.monotonic() < stop_at:
            statuses[requests.post(url + "/v1/completions", json={"model": "no-such-model", "prompt": "x"}, timeout=30).status_code] += 1
            statuses[requests.post(url + "/v1/completions", json={"model": "tiny-a", "prompt": "x", "max_tokens": -1}, timeout=30).status_code] += 1
            time.sleep(2)

    def bursts():
        body = {"model": "tiny-a", "prompt": "one two", "max_tokens": 8}
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            while time.monotonic() < stop_at:
                for status in pool.map(lambda _: requests.post(url + "/v1/completions", json=body, timeout=120).status_code, range(12)):
                    statuses[status] += 1
                time.sleep(4)

    workers = [threading.Thread(target=streams, args=(model,)) for model in ("tiny-a", "tiny-a:sql", "tiny-a", "tiny-a:sql")]
    workers += [threading.Thread(target=bad_requests), threading.Thread(target=bursts)]
    for worker in workers:
        worker.start()
    return workers


def test_every_panel_has_data_from_a_real_prometheus_and_the_png_draws_them(app_url, prometheus, tmp_path):
    statuses = Counter()
    workers = load(app_url, time.monotonic() + LOAD_S + 30, statuses)
    try:
        time.sleep(LOAD_S)  # (queried while the load goes on: a quantile of an idle window is NaN)
        (target,) = requests.get(prometheus + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        assert target["health"] == "up", target
        dashboard = json.loads((REPO / "examples" / "grafana" / "llmserve-dashboard.json").read_text())
        empty, answered = [], {}
        for title, targets in panel_queries(dashboard):
            for expr, _ in targets:
                values = [float(series["value"][1]) for series in query(prometheus, expr)]
                answered[expr] = values
                if not any(math.isfinite(value) for value in values):
                    empty.append(f"{title}: {expr}")
        assert not empty, f"panels without data: {empty}"
        by_adapter = query(prometheus, 'sum by (adapter) (rate(ray_llmserve_requests_total{model="tiny-a"}[1m]))')
        assert {series["metric"].get("adapter", "") for series in by_adapter} >= {"", "sql"}
    finally:
        for worker in workers:
            worker.join()
    assert statuses[200] and statuses[404] and statuses[400] and statuses[429], statuses
    print(f"load answers by status: {dict(statuses)}; {len(answered)} panel queries, each with data")

    png = tmp_path / "dashboard.png"
    result = subprocess.run([str(BIN / "llmserve"), "dashboard", "--prometheus", prometheus, "--minutes", "2", "--out", str(png)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    drawn = int(result.stdout.split("llmserve dashboard: ")[1].split()[0])
    assert drawn >= len(answered), result.stdout  # at least a line per query
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    print(f"dashboard drawn: {png} ({drawn} series)")
