"""`llmserve run` and Ray's `serve run` start the app from the command line and serve requests.

Each command starts (and stops) its own local Ray, as a user's would.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TEST_ENGINE_KWARGS
from tests.e2e.conftest import ask, free_port, wait_for_http

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    import ray

    ray.shutdown()


def start(command, cwd, log_path):
    log = open(log_path, "w")
    # Each command must start its own Ray, not join one a test before left running.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log


def stop(process, timeout=120, ours=True):
    """Ctrl-C, as a user would. Our own CLI must then exit in time; Ray's `serve run` is
    not ours to test, and on a loaded machine it has once missed a Ctrl-C: it gets a
    second one, then is killed."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=timeout if ours else timeout / 2)
    except subprocess.TimeoutExpired:
        if ours:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=timeout / 2)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def wait_for_line(log_path, text, process, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = Path(log_path).read_text()
        if text in content:
            return content
        assert process.poll() is None, f"exited early:\n{content[-3000:]}"
        time.sleep(1)
    raise TimeoutError(f"{text!r} not printed:\n{Path(log_path).read_text()[-3000:]}")


def test_llmserve_run_serves_the_default_example(tiny_model_paths, tmp_path):
    port = free_port()
    log_path = tmp_path / "llmserve.log"
    process, log = start([str(BIN / "llmserve"), "run", "examples/config.yaml", "--port", str(port)], REPO, log_path)
    try:
        output = wait_for_line(log_path, f"ready in", process)
        assert f"http://127.0.0.1:{port}/v1" in output
        assert "LLMServer:tiny-chat" in output  # progress names the model being loaded
        answers = {model: ask(f"http://127.0.0.1:{port}", model) for model in ("tiny-chat", "tiny-chat-2")}
        assert all(answer.model == model for model, answer in answers.items())
        check_front_door(f"http://127.0.0.1:{port}")
    finally:
        assert stop(process) == 0
        log.close()
    assert "shutting down" in log_path.read_text()


def check_front_door(base_url):
    """What `llmserve run`'s own listener must get right on the real engine: streams with
    usage, both models on one kept-alive connection, and the ingress's own errors."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="tiny-chat-2",
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    with httpx.Client(base_url=base_url, timeout=60, limits=httpx.Limits(max_connections=1)) as http:
        for model in ("tiny-chat", "tiny-chat-2"):
            answer = http.post("/v1/completions", json={"model": model, "prompt": "a", "max_tokens": 2})
            assert answer.status_code == 200 and answer.json()["model"] == model
        unknown = http.post("/v1/completions", json={"model": "nope", "prompt": "a"})
        not_json = http.post("/v1/completions", content=b"{oops", headers={"x-request-id": "bad-1"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert not_json.status_code == 400 and not_json.headers["x-request-id"] == "bad-1"


def test_llmserve_run_with_one_model(tiny_model_paths, tmp_path):
    port = free_port()
    log_path = tmp_path / "single.log"
    command = [str(BIN / "llmserve"), "run", "--model", tiny_model_paths["tiny-b"], "--model-id", "solo", "--port", str(port)]
    process, log = start(command, tmp_path, log_path)
    try:
        wait_for_line(log_path, "ready in", process)
        assert ask(f"http://127.0.0.1:{port}", "solo").model == "solo"
    finally:
        stop(process)
        log.close()


def test_ray_serve_run_with_per_model_yaml(tiny_model_paths, tmp_path):
    port = free_port()
    (tmp_path / "models").mkdir()
    model = {"model_loading_config": {"model_id": "from-yaml", "model_source": tiny_model_paths["tiny-a"]}, "engine_kwargs": TEST_ENGINE_KWARGS}
    (tmp_path / "models" / "tiny.yaml").write_text(yaml.safe_dump(model))
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
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
    finally:
        stop(process, ours=False)
        log.close()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)


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
