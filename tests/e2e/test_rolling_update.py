"""A RayService update, done as KubeRay does it: the CPU manifest's serveConfigV2 (model swapped
for the tiny one) deployed with `serve deploy` to a running cluster (`ray start --head`, Serve's
proxy), then a changed config deployed while clients stream through the proxy. Serve replaces
every replica (model and ingress); no request fails."""

import json
import os
import subprocess
import threading
import time

import pytest
import requests
import yaml

from tests.conftest import REPO, TEST_ENGINE_KWARGS
from tests.e2e.conftest import BIN, free_port

pytestmark = pytest.mark.engine


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    import ray

    ray.shutdown()


def cli(*args, env, timeout=300):
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def config_from_manifest(model_path, http_port, max_model_len):
    service = yaml.safe_load((REPO / "examples" / "kubernetes" / "ray-service.cpu.yaml").read_text())
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (model,) = config["applications"][0]["args"]["llm_configs"]
    model["model_loading_config"]["model_source"] = model_path
    model["engine_kwargs"] = {**TEST_ENGINE_KWARGS, "max_model_len": max_model_len}
    model["deployment_config"] = {"num_replicas": 1}  # (the manifest autoscales 1-4; this machine holds few engines)
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    return config


def applications(dashboard, env):
    return json.loads(requests.get(f"{dashboard}/api/serve/applications/", timeout=30).text)["applications"]


def wait_running(dashboard, env, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        apps = applications(dashboard, env)
        if apps.get("llmserve", {}).get("status") == "RUNNING":
            return apps["llmserve"]
        time.sleep(2)
    raise TimeoutError(apps)


def test_a_config_change_deployed_to_a_running_cluster_under_load_fails_no_request(tiny_model_paths, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # A throwaway local cluster: no token to hand around (a real one gives `serve deploy` RAY_AUTH_TOKEN).
    env["RAY_AUTH_MODE"] = "disabled"
    gcs_port, dashboard_port, http_port = free_port(), free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    cli("ray", "start", "--head", f"--port={gcs_port}", "--num-cpus=8", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", env=env)  # fmt: skip
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    answers, stop_load = [], threading.Event()
    try:
        for version, max_model_len in (("v1", 512), ("v2", 384)):
            (tmp_path / f"{version}.yaml").write_text(yaml.safe_dump(config_from_manifest(tiny_model_paths["tiny-a"], http_port, max_model_len)))
        cli("serve", "deploy", str(tmp_path / "v1.yaml"), "-a", dashboard, env=env)
        wait_running(dashboard, env)
        url = f"http://127.0.0.1:{http_port}"

        def client():
            while not stop_load.is_set():
                body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 16, "stream": True}
                try:
                    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=300) as answer:
                        done = any(line == b"data: [DONE]" for line in answer.iter_lines())
                        answers.append((answer.status_code, done, answer.headers.get("x-llmserve-replica")))
                except requests.RequestException as exc:
                    answers.append((repr(exc), False, None))

        clients = [threading.Thread(target=client) for _ in range(4)]
        for worker in clients:
            worker.start()
        time.sleep(5)
        before_update = len(answers)
        cli("serve", "deploy", str(tmp_path / "v2.yaml"), "-a", dashboard, env=env)
        time.sleep(5)  # (the controller takes the new config first)
        wait_running(dashboard, env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the new model replica answers: its max_model_len is v2's
            cards = requests.get(url + "/v1/models", timeout=30).json()["data"]
            if cards and cards[0].get("max_model_len") == 384:
                break
            time.sleep(2)
        assert cards[0].get("max_model_len") == 384, cards
        time.sleep(5)
        stop_load.set()
        for worker in clients:
            worker.join()
    finally:
        stop_load.set()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=env, timeout=120)
    failed = [answer for answer in answers if answer[0] != 200 or not answer[1]]
    replicas = {answer[2] for answer in answers if answer[2]}
    print(f"rolling update under load: {len(answers)} streams ({len(answers) - before_update} after the update began), {len(failed)} failed; replicas seen {sorted(replicas)}")
    assert not failed, failed[:5]
    assert len(replicas) == 2, replicas  # the old model replica, then the new one
