"""Model weights from object storage (`model_source: {bucket_uri: s3://...}`) under `llmserve run`,
on a local moto S3 server and the real engine.

Two replicas start together on one node: each file is fetched once. A restart on the
same cache fetches nothing. A prefix that holds nothing fails the deployment at once,
saying so.
"""

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TEST_ENGINE_KWARGS
from tests.e2e.conftest import BIN, ask, free_port, local_s3, s3_requests, start, stop, wait_for_line


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def weights_bucket(tiny_model_paths):
    """tiny-a's folder uploaded to s3://weights/tiny on a moto server in this process."""
    with local_s3() as (credentials, s3):
        s3.create_bucket(Bucket="weights")
        folder = Path(tiny_model_paths["tiny-a"])
        sizes = {}
        for file in sorted(path for path in folder.rglob("*") if path.is_file()):
            key = f"tiny/{file.relative_to(folder)}"
            s3.upload_file(str(file), "weights", key)
            sizes[f"/weights/{key}"] = file.stat().st_size
        yield credentials, sizes


def serve_from_bucket(tmp_path, credentials, bucket_uri, replicas, cache):
    port = free_port()
    model = {
        "model_loading_config": {"model_id": "tiny-s3", "model_source": {"bucket_uri": bucket_uri}},
        "engine_kwargs": TEST_ENGINE_KWARGS,
        "deployment_config": {"num_replicas": replicas},
        "runtime_env": {"env_vars": {**credentials, "XDG_CACHE_HOME": str(cache)}},
    }
    config = {"applications": [{"name": "llmserve", "route_prefix": "/", "import_path": "llmserve:build_openai_app", "args": {"llm_configs": [model]}}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / f"run-{replicas}-{time.monotonic_ns()}.log"
    process, log = start([str(BIN / "llmserve"), "run", "config.yaml", "--host", "127.0.0.1", "--port", str(port)], tmp_path, log_path)
    return port, process, log, log_path


def object_gets(requests):
    return [line.split(" ", 1)[1] for line in requests if line.startswith("GET /weights/tiny/")]


def test_two_replicas_starting_together_fetch_the_weights_once_and_a_restart_fetches_none(weights_bucket, tmp_path):
    credentials, sizes = weights_bucket
    cache = tmp_path / "cache"
    with s3_requests() as requests:
        port, process, log, log_path = serve_from_bucket(tmp_path, credentials, "s3://weights/tiny", 2, cache)
        try:
            output = wait_for_line(log_path, "ready in", process)
            answer = ask(f"http://127.0.0.1:{port}", "tiny-s3")
            assert answer.model == "tiny-s3" and answer.usage.completion_tokens > 0
        finally:
            stop(process)
            log.close()
    gets = object_gets(requests)
    fetched = sum(sizes[path] for path in gets)
    print(f"two replicas starting together: {len(gets)} object GETs, {fetched} bytes fetched; the model is {sum(sizes.values())} bytes")
    assert sorted(gets) == sorted(sizes), "each file fetched exactly once for both replicas"
    # The download in the status lines (its last word; a fast one's first lines pass between two looks).
    assert re.search(rf"tiny-s3: s3://weights/tiny is in \S+: fetched {len(sizes)} files", output), output[-2000:]

    with s3_requests() as requests:
        port, process, log, log_path = serve_from_bucket(tmp_path, credentials, "s3://weights/tiny", 1, cache)
        try:
            wait_for_line(log_path, "ready in", process)
            assert ask(f"http://127.0.0.1:{port}", "tiny-s3").model == "tiny-s3"
        finally:
            stop(process)
            log.close()
    print(f"restart on the same cache: {len(object_gets(requests))} object GETs")
    assert object_gets(requests) == [] and any(line.startswith("GET /weights?list-type=2") for line in requests)


def test_a_prefix_with_nothing_under_it_fails_the_deployment_at_once_saying_so(weights_bucket, tmp_path):
    credentials, _ = weights_bucket
    started = time.monotonic()
    port, process, log, log_path = serve_from_bucket(tmp_path, credentials, "s3://weights/tyop", 1, tmp_path / "cache")
    try:
        assert process.wait(timeout=300) == 1
    except subprocess.TimeoutExpired:
        stop(process)
        raise
    finally:
        log.close()
    output = log_path.read_text()
    assert "s3://weights/tyop: no files under this prefix" in output, output[-3000:]
    assert "ready in" not in output
    print(f"a wrong prefix failed the deployment in {time.monotonic() - started:.0f}s")
