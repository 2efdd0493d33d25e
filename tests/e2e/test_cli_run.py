"""`llmserve run` and Ray's `serve run` start the app from the command line and serve requests.

(The default example under `llmserve run` has its own module, test_default_example.py.)

Each command starts (and stops) its own local Ray, as a user's would.
"""

import json
import socket
import subprocess

import openai
import requests

import pytest
import yaml

from tests.conftest import REPO, TEST_ENGINE_KWARGS
from tests.e2e import scrape
from tests.e2e.conftest import BIN, ask, free_port, start, stop, wait_for_http, wait_for_line


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    import ray

    ray.shutdown()


def test_llmserve_run_with_one_model_shows_an_access_line_per_answer(tiny_model_paths, tmp_path):
    port = free_port()
    log_path = tmp_path / "single.log"
    command = [str(BIN / "llmserve"), "run", "--model", tiny_model_paths["tiny-b"], "--model-id", "solo", "--port", str(port),
               "--access-log", "-", "--access-log-format", "json"]  # fmt: skip
    process, log = start(command, tmp_path, log_path)
    try:
        wait_for_line(log_path, "ready in", process)
        url = f"http://127.0.0.1:{port}"
        assert ask(url, "solo").model == "solo"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="solo", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-request-id": "cli-stream"},
        )  # fmt: skip
        usage = [chunk.usage for chunk in stream if chunk.usage][0]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=1)
        output = wait_for_line(log_path, '"model":""', process, timeout=60)
    finally:
        stop(process)
        log.close()
    entries = [json.loads(line) for line in output.splitlines() if line.startswith('{"time"')]
    assert [(entry["model"], entry["endpoint"], entry["status"]) for entry in entries] == [("solo", "chat", 200), ("solo", "chat", 200), ("", "completions", 404)]
    streamed = entries[1]
    assert streamed["request_id"] == "cli-stream" and streamed["replica"].startswith("LLMServer:solo#")
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert 0 < streamed["ttft_s"] <= streamed["duration_s"] and entries[0]["ttft_s"] is None
    assert entries[2]["replica"].startswith("OpenAiIngress#")  # the ingress's own answer


def test_ray_serve_run_with_per_model_yaml(tiny_model_paths, tmp_path):
    port = free_port()
    (tmp_path / "models").mkdir()
    model = {"model_loading_config": {"model_id": "from-yaml", "model_source": tiny_model_paths["tiny-a"]}, "engine_kwargs": TEST_ENGINE_KWARGS}
    (tmp_path / "models" / "tiny.yaml").write_text(yaml.safe_dump(model))
    config = {
        "http_options": {"port": port},  # on 0.0.0.0, as configs and RayService have it
        "applications": [
            {"name": "llm_app", "route_prefix": "/", "import_path": "llmserve:build_openai_app", "args": {"llm_configs": ["models/tiny.yaml"]}}
        ],
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / "serve.log"
    process, log = start([str(BIN / "serve"), "run", "config.yaml"], tmp_path, log_path)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/models", process=process)
        assert ask(f"http://127.0.0.1:{port}", "from-yaml").model == "from-yaml"
        # The ingress took the port from Serve's proxy on this node (serve_port.py): a stream's
        # connection is held by the ingress and the model replica it was handed to, not by the proxy.
        import ray
        from ray import serve

        ray.init(address="auto", log_to_driver=False)  # the Ray `serve run` started
        try:
            replica = serve.get_deployment_handle("LLMServer:from-yaml", app_name="llm_app")
            handed_off = replica.engine_stats.remote().result()["requests_handed_off"]
            holders = holders_of_a_stream(port, "from-yaml")
            assert any("OpenAiIngress" in holder for holder in holders) and not any("ProxyActor" in holder for holder in holders), holders
            # and the model replica wrote the answer on the client's socket itself.
            assert replica.engine_stats.remote().result()["requests_handed_off"] == handed_off + 1
        finally:
            ray.shutdown()
        # Serve's own health checks, as its proxy answers them (KubeRay probes /-/healthz).
        health = requests.get(f"http://127.0.0.1:{port}/-/healthz", timeout=10)
        assert (health.status_code, health.text) == (200, "success")
        assert requests.get(f"http://127.0.0.1:{port}/-/routes", timeout=10).json() == {"/": "llm_app"}
        # The same series as under `llmserve run`, at /metrics (and in Ray's export).
        answered = {"model": "from-yaml", "adapter": "", "endpoint": "chat", "status": "200"}
        samples = scrape.wait_until(f"http://127.0.0.1:{port}", lambda s: scrape.total(s, "ray_llmserve_requests_total", **answered) >= 1)
        assert scrape.total(samples, "ray_llmserve_requests_total", **answered) == 1
        assert scrape.total(samples, "ray_llmserve_completion_tokens_total", model="from-yaml") > 0
    finally:
        stop(process, ours=False)
        log.close()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)


def holders_of_a_stream(port: int, model: str) -> set[str]:
    """The command lines of the processes holding the server side of a connection, read while
    it streams an answer (a raw socket: its local port is known)."""
    import psutil

    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 300, "min_tokens": 300, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        client.sendall(head + body)
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        client_port = client.getsockname()[1]
        pids = {
            connection.pid
            for connection in psutil.net_connections(kind="tcp")
            if connection.pid and connection.raddr and connection.raddr.port == client_port and connection.laddr.port == port
        }
        return {" ".join(psutil.Process(pid).cmdline()) for pid in pids}


def test_llmserve_run_on_a_taken_port_fails_before_loading_anything(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        command = [str(BIN / "llmserve"), "run", "examples/config.yaml", "--host", "127.0.0.1", "--port", str(port)]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "deploying" not in result.stdout


def test_llmserve_run_requires_its_api_keys(tiny_model_paths, tmp_path, monkeypatch):
    """`--api-key` and LLMSERVE_API_KEY, through the front door to the real engine (openai client)."""
    import openai
    import requests

    monkeypatch.setenv("LLMSERVE_API_KEY", "sk-from-env")  # inherited by the command, as a user's shell passes it
    port = free_port()
    log_path = tmp_path / "keys.log"
    command = [str(BIN / "llmserve"), "run", "--model", tiny_model_paths["tiny-b"], "--model-id", "solo", "--port", str(port), "--api-key", "sk-cli"]
    process, log = start(command, tmp_path, log_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_line(log_path, "ready in", process)

        def chat(key, **extra):
            client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)
            return client.chat.completions.create(model="solo", messages=[{"role": "user", "content": "Hello!"}], max_tokens=4, temperature=0, **extra)

        with pytest.raises(openai.AuthenticationError) as refused:
            chat("sk-wrong")
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        assert chat("sk-cli").model == "solo" and chat("sk-from-env").model == "solo"
        assert len(list(chat("sk-cli", stream=True))) > 1
        assert requests.post(base_url + "/tokenize", json={"model": "solo", "prompt": "hi"}, timeout=60).status_code == 401
        assert requests.get(base_url + "/v1/models", timeout=60).status_code == 401
        assert requests.get(base_url + "/health", timeout=60).status_code == 200
        assert "sk-cli" not in log_path.read_text() and "sk-from-env" not in log_path.read_text()
    finally:
        stop(process)
        log.close()
