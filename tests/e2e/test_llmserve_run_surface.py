"""The whole OpenAI surface under `llmserve run`, the path users run (front door + socket handoff).

One `llmserve run` serves the default example's models (SmolLM2 and MiniLM,
exactly as examples/config.yaml configures them) beside a cross-encoder, a tiny Whisper, the scripted
model (exact reasoning and tool calls) and a tiny vision-language model. It starts its own local Ray, as a user's would.
"""

from pathlib import Path

import httpx
import pytest
import requests
import yaml

from llmserve.scripted_model import ANSWER, REASONING, TOOL_CALL, make_scripted_model
from llmserve.tiny_model import make_tiny_vlm
from tests.conftest import REPO, SPEECH_ENGINE_KWARGS, TEST_ENGINE_KWARGS
from tests.e2e import scrape, surface
from tests.e2e.fuzz import fuzz
from tests.e2e.hostile import send_corpus, stalled_connections
from tests.e2e.conftest import BIN, free_port, start, stop, wait_for_line

EXAMPLES = REPO / "examples"


SCRIPTED_ENGINE_KWARGS = {
    **TEST_ENGINE_KWARGS,
    "reasoning_parser": "qwen3",
    "tool_call_parser": "hermes",
    "enable_auto_tool_choice": True,
    # A mapping, as `vllm serve --structured-outputs-config '{...}'` takes JSON; without it a
    # model with no real preferences fills grammar-enforced JSON with whitespace forever.
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


def example_models() -> list[dict]:
    """examples/config.yaml's model configs, inline, with absolute paths."""
    config = yaml.safe_load((EXAMPLES / "config.yaml").read_text())
    models = []
    for entry in config["applications"][0]["args"]["llm_configs"]:
        base = EXAMPLES
        if isinstance(entry, str):
            base = (EXAMPLES / entry).parent
            entry = yaml.safe_load((EXAMPLES / entry).read_text())
        loading = entry["model_loading_config"]
        source = str((base / loading["model_source"]).resolve())
        models.append({**entry, "model_loading_config": {**loading, "model_source": source}})
    return models


def surface_config(example_model_paths: dict, scripted_path: str, vlm_path: str, port: int) -> dict:
    pooling = {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 1024**2, "enforce_eager": True}
    models = example_models() + [
        {"model_loading_config": {"model_id": "cross-encoder", "model_source": example_model_paths["cross-encoder"]}, "engine_kwargs": pooling},
        {"model_loading_config": {"model_id": "whisper", "model_source": example_model_paths["whisper"]}, "engine_kwargs": SPEECH_ENGINE_KWARGS},
        {"model_loading_config": {"model_id": "scripted", "model_source": scripted_path}, "engine_kwargs": SCRIPTED_ENGINE_KWARGS},
        {"model_loading_config": {"model_id": "vlm", "model_source": vlm_path}, "engine_kwargs": TEST_ENGINE_KWARGS},
    ]
    application = {"name": "llm_app", "route_prefix": "/", "import_path": "llmserve:build_openai_app", "args": {"llm_configs": models}}
    return {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [application]}


@pytest.fixture(scope="module")
def running(example_model_paths, tmp_path_factory):
    folder = tmp_path_factory.mktemp("surface")
    port = free_port()
    scripted = str(make_scripted_model(REPO / "models" / "scripted"))
    vlm = str(make_tiny_vlm(REPO / "models" / "tiny-vlm"))
    (folder / "config.yaml").write_text(yaml.safe_dump(surface_config(example_model_paths, scripted, vlm, port)))
    log_path = folder / "llmserve.log"
    process, log = start([str(BIN / "llmserve"), "run", "config.yaml"], folder, log_path)
    try:
        output = wait_for_line(log_path, "ready in", process)
        yield f"http://127.0.0.1:{port}", output
    finally:
        code = stop(process)
        log.close()
    assert code == 0 and "shutting down" in Path(log_path).read_text()


@pytest.fixture(scope="module")
def base_url(running):
    return running[0]


def test_progress_names_each_model_and_the_url(running):
    base_url, output = running
    assert f"{base_url}/v1" in output
    assert "LLMServer:smollm2" in output and "LLMServer:minilm" in output


def test_the_chat_model_answers_a_real_question(base_url):
    """The README's examples: chat (curl) and the Responses API (Python), greedy."""
    sdk = surface.client(base_url)
    question = "What is the capital of France?"
    answer = sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    assert "Paris" in sdk.responses.create(model="smollm2", input=question, max_output_tokens=24, temperature=0).output_text


def test_related_sentences_embed_closer_than_unrelated_ones(base_url):
    vectors = [item.embedding for item in surface.client(base_url).embeddings.create(model="minilm", input=[*surface.RELATED, surface.UNRELATED]).data]
    assert surface.cosine(vectors[0], vectors[1]) > surface.cosine(vectors[0], vectors[2]) + 0.3


def test_every_endpoint_through_the_front_door(base_url):
    surface.check_every_endpoint(base_url, chat_model="smollm2", embed_model="minilm", cross_encoder="cross-encoder", speech_model="whisper")


def test_front_door_streams_with_usage_and_keeps_connections_across_models(base_url):
    chunks = list(
        surface.client(base_url).chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Count to ten."}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    with httpx.Client(base_url=base_url, timeout=60, limits=httpx.Limits(max_connections=1)) as http:
        completion = http.post("/v1/completions", json={"model": "smollm2", "prompt": "a", "max_tokens": 2})
        embedding = http.post("/v1/embeddings", json={"model": "minilm", "input": "a"})
        tokens = http.post("/tokenize", json={"model": "cross-encoder", "prompt": "a"})
        unknown = http.post("/v1/completions", json={"model": "nope", "prompt": "a"})
        not_json = http.post("/v1/completions", content=b"{oops", headers={"x-request-id": "bad-1"})
    assert completion.status_code == 200 and completion.json()["model"] == "smollm2"
    assert embedding.status_code == 200 and embedding.json()["model"] == "minilm"
    assert tokens.status_code == 200 and tokens.json()["count"] > 0
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert not_json.status_code == 400 and not_json.headers["x-request-id"] == "bad-1"


def test_sampling_options(base_url):
    surface.check_sampling_options(base_url, "smollm2")


def test_structured_outputs(base_url):
    surface.check_structured_outputs(base_url, "smollm2")


def test_the_documented_json_mode_clients(base_url):
    surface.check_seed_structured_output(base_url, "smollm2")


def test_reasoning_is_parsed_and_named_both_ways(base_url):
    surface.check_reasoning(base_url, "scripted", reasoning=REASONING, answer=ANSWER)


def test_tool_calls_auto_required_and_named(base_url):
    surface.check_tool_calls(base_url, "scripted", expected_call=TOOL_CALL)


def test_langchain_chat_and_embeddings(base_url):
    surface.check_langchain(base_url, "smollm2", "minilm")


def test_openai_agents_sdk_runs_a_tool_call_round_trip(base_url):
    surface.check_agents_sdk_tool_round_trip(base_url, "scripted", expected_city=TOOL_CALL["arguments"]["city"], final_answer=ANSWER)


@pytest.fixture(scope="module")
def red_png_url(tmp_path_factory):
    """A red PNG on a local HTTP server, for image_url parts vLLM fetches itself."""
    import base64
    import functools
    import http.server
    import threading

    folder = tmp_path_factory.mktemp("images")
    (folder / "red.png").write_bytes(base64.b64decode(surface.png_data_url("red").split(",", 1)[1]))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/red.png"
    server.shutdown()


def test_vision_with_data_and_http_image_urls(base_url, red_png_url):
    surface.check_vision(base_url, "vlm", red_png_url=red_png_url)


# The fast models: SmolLM2 generates a token in tens of milliseconds here, and a generated
# request may ask for its whole context.
FUZZED_MODELS = ["scripted", "minilm", "cross-encoder", "whisper", "vlm"]


def replicas_by_model(base_url):
    """Which replica answers each model: a replica that restarted answers from a new address."""
    return {
        model: requests.post(base_url + "/tokenize", json={"model": model, "prompt": "hi"}, timeout=60).headers["x-llmserve-replica"]
        for model in FUZZED_MODELS
    }


def test_fuzzing_from_the_openapi_schema_finds_no_5xx(base_url, request):
    """Schemathesis from /openapi.json: no 5xx, every 4xx in the OpenAI envelope, no replica restarted."""
    before = replicas_by_model(base_url)
    examples = request.config.getoption("--fuzz-examples")
    report = fuzz(base_url, models=FUZZED_MODELS, examples_per_operation=examples)
    print(f"fuzz: {report.requests} requests, answers by status {sorted(report.by_status.items())}")
    assert report.requests >= 25 * examples  # ~18 operations, valid and invalid requests each
    assert not report.failures, "\n".join(report.failures[:20])
    assert report.by_status.get(200, 0) > 0  # some generated requests were valid and served
    assert replicas_by_model(base_url) == before


def test_hundreds_of_stalled_connections_cost_nothing_and_are_let_go(base_url):
    """Slowloris: 200 connections sending half a request head, 200 sending nothing."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    cost = stalled_connections(host, int(port), model="scripted", count=400)
    print(cost)
    assert cost["latency_during_ms"] <= 2 * cost["latency_before_ms"] + 20, cost
    assert cost["ingress_rss_during_mb"] - cost["ingress_rss_before_mb"] < 64, cost
    assert cost["heads_answered_408"] == 200, cost  # each got its 408 (HEAD_TIMEOUT_S), none was held
    assert cost["seconds_until_every_head_got_408"] < 15 + 10, cost


def test_hostile_requests_get_a_clear_4xx_and_the_app_keeps_serving(base_url):
    """Raw bytes over sockets (tests/e2e/hostile.py): each request gets the status it must, never a 5xx or a hang."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    answers = [(case, status) for case, status in send_corpus(host, int(port), model="scripted", context_length=TEST_ENGINE_KWARGS["max_model_len"])]
    wrong = [f"{case.name}: {status} (expected {case.expected})" for case, status in answers if status != case.expected]
    assert not wrong, wrong
    assert len(answers) >= 25
    assert requests.post(base_url + "/v1/completions", json={"model": "scripted", "prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200


def test_metrics_count_each_answer_with_its_tokens_and_times_beside_the_engines(base_url):
    """/metrics on the app's port: the answers of the model replicas (handed the client's socket)
    and of the ingress (unknown model), the tokens usage reports, and vLLM's engine series."""
    sdk = surface.client(base_url)
    ours = {"model": "smollm2", "adapter": ""}
    before = scrape.settled(base_url)
    usages = [sdk.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0).usage for _ in range(2)]
    stream = sdk.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello"}], max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    usages += [chunk.usage for chunk in stream if chunk.usage]
    assert requests.post(base_url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30).status_code == 404

    def delta(samples, name, **labels):
        return scrape.total(samples, name, **labels) - scrape.total(before, name, **labels)

    wanted = {
        ("ray_llmserve_requests_total", "completions", "200"): 2,
        ("ray_llmserve_requests_total", "chat", "200"): 1,
    }
    after = scrape.wait_until(
        base_url,
        lambda samples: all(delta(samples, name, **ours, endpoint=endpoint, status=status) >= n for (name, endpoint, status), n in wanted.items())
        and delta(samples, "ray_llmserve_completion_tokens_total", **ours) >= sum(u.completion_tokens for u in usages)
        and delta(samples, "ray_llmserve_requests_total", model="", endpoint="completions", status="404") >= 1,
    )
    for (name, endpoint, status), n in wanted.items():
        assert delta(after, name, **ours, endpoint=endpoint, status=status) == n, (endpoint, status)
    assert delta(after, "ray_llmserve_requests_total", model="", endpoint="completions", status="404") == 1
    assert delta(after, "ray_llmserve_prompt_tokens_total", **ours) == sum(u.prompt_tokens for u in usages)
    assert delta(after, "ray_llmserve_completion_tokens_total", **ours) == sum(u.completion_tokens for u in usages)
    assert delta(after, "ray_llmserve_time_to_first_token_seconds_count", **ours, endpoint="chat") == 1
    assert 0 < delta(after, "ray_llmserve_time_to_first_token_seconds_sum", **ours, endpoint="chat") < 30
    assert delta(after, "ray_llmserve_inter_token_latency_seconds_count", **ours, endpoint="chat") >= 1
    assert delta(after, "ray_llmserve_request_duration_seconds_count", **ours, endpoint="completions") == 2
    engine_series = {name for name in scrape.families(after) if name.startswith("ray_vllm_")}
    assert {"ray_vllm_time_to_first_token_seconds_count", "ray_vllm_num_requests_running"} <= engine_series, sorted(engine_series)[:20]

