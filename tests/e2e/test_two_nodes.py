"""The front door on one Ray node, models on another: every endpoint through the splice path.

`ray.cluster_utils.Cluster` starts two Ray nodes on this machine. The ingress
(with the front door, as under `llmserve run`) runs on the first with the
cross-encoder, the other models on the second. A front door hands a client's
socket only to replicas of its own node: the cross-encoder's answers are
handed off, every other answer is spliced from its replica over TCP.
"""

import json
import os

import pytest
import ray
import requests
from ray import serve

from llmserve.builder import build_openai_app_at
from llmserve.cli import _configure_local_serve
from tests.conftest import SPEECH_ENGINE_KWARGS
from tests.e2e import surface
from tests.e2e.conftest import free_port, tiny_config, wait_for_http

ON_MODEL_NODE = {"ray_actor_options": {"resources": {"models": 0.01}}}
ON_FRONT_NODE = {"ray_actor_options": {"resources": {"front": 0.01}}}
POOLING = {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 1024**2, "enforce_eager": True}


@pytest.fixture(scope="module")
def base_url(tiny_model_paths, example_model_paths):
    from ray.cluster_utils import Cluster

    saved_environment = dict(os.environ)
    _configure_local_serve("none")  # what `llmserve run` sets for its front door, in every node's processes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"front": 1}})
    cluster.add_node(num_cpus=8, resources={"models": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        port = free_port()
        configs = [tiny_config("tiny-a", tiny_model_paths["tiny-a"], deployment_config=ON_MODEL_NODE)]
        configs += [
            {
                "model_loading_config": {"model_id": model_id, "model_source": example_model_paths[model_id]},
                "engine_kwargs": POOLING,
                "deployment_config": node,
            }
            for model_id, node in (("minilm", ON_MODEL_NODE), ("cross-encoder", ON_FRONT_NODE))
        ]
        configs.append(
            {
                "model_loading_config": {"model_id": "whisper", "model_source": example_model_paths["whisper"]},
                "engine_kwargs": SPEECH_ENGINE_KWARGS,
                "deployment_config": ON_MODEL_NODE,
            }
        )
        args = {"llm_configs": configs, "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0, "resources": {"front": 0.01}}}}
        serve.run(build_openai_app_at(args, base_dir=None, front_door={"host": "127.0.0.1", "port": port}), name="two-nodes", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/v1/models")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved_environment)


def test_the_models_run_where_they_were_placed(base_url):
    from ray.util.state import list_actors

    nodes = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")]):
        if actor.class_name.startswith("ServeReplica:two-nodes:"):
            nodes.setdefault(actor.class_name.removeprefix("ServeReplica:two-nodes:"), set()).add(actor.node_id)
    front = nodes["OpenAiIngress"]
    assert len(front) == 1 and nodes["LLMServer:cross-encoder"] == front
    assert all(nodes[f"LLMServer:{model_id}"].isdisjoint(front) for model_id in ("tiny-a", "minilm", "whisper"))


def test_every_endpoint_through_the_splice(base_url):
    surface.check_every_endpoint(base_url, chat_model="tiny-a", embed_model="minilm", cross_encoder="cross-encoder", speech_model="whisper")
    handed_off = {
        model_id: serve.get_deployment_handle(f"LLMServer:{model_id}", app_name="two-nodes").engine_stats.remote().result()["requests_handed_off"]
        for model_id in ("tiny-a", "minilm", "cross-encoder", "whisper")
    }
    # The front door's node took the client's socket; the other node's answers were spliced.
    assert handed_off["cross-encoder"] > 0 and handed_off["tiny-a"] == handed_off["minilm"] == handed_off["whisper"] == 0


def test_streams_and_errors_through_the_splice(base_url):
    body = {"model": "tiny-a", "prompt": "Tell me a story", "max_tokens": 12, "temperature": 0}
    whole = requests.post(base_url + "/v1/completions", json=body, timeout=120).json()
    with requests.post(base_url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=120) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1] == b"data: [DONE]"
    text = "".join(json.loads(line[len(b"data: "):])["choices"][0]["text"] for line in lines[:-1])
    assert text == whole["choices"][0]["text"]
    too_long = {"model": "tiny-a", "prompt": "dragon " * 2000, "max_tokens": 4}
    response = requests.post(base_url + "/v1/completions", json=too_long, timeout=120)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
