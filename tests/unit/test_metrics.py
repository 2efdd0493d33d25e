"""Serve-layer metrics in-process (no Ray: values kept in this process): each answer is
counted once, by what made it, labelled by model, adapter and endpoint."""

from llmserve import metrics
from llmserve.metrics import COMPLETION_TOKENS, INTER_TOKEN_LATENCY, PROMPT_TOKENS, REQUESTS, TIME_TO_FIRST_TOKEN
from tests.unit.test_ingress import call, chat, make_app


def count(**labels):
    return metrics.recorded(REQUESTS, **labels)


def test_answers_are_counted_by_model_endpoint_and_status_with_their_tokens_and_times():
    app = make_app("gamma")
    labels = {"model": "gamma", "adapter": "", "endpoint": "chat"}
    before = count(**labels, status="200"), metrics.recorded(PROMPT_TOKENS, model="gamma", adapter=""), len(metrics.recorded(TIME_TO_FIRST_TOKEN, **labels))
    assert call(app, "POST", "/v1/chat/completions", json=chat("one two three", model="gamma")).status_code == 200
    streamed = call(app, "POST", "/v1/chat/completions", json=chat("four five six seven", model="gamma", stream=True))
    assert streamed.status_code == 200
    assert count(**labels, status="200") == before[0] + 2
    assert metrics.recorded(PROMPT_TOKENS, model="gamma", adapter="") == before[1] + 3 + 4  # (a fake word is a token)
    assert metrics.recorded(COMPLETION_TOKENS, model="gamma", adapter="") >= 3 + 4
    ttfts = metrics.recorded(TIME_TO_FIRST_TOKEN, **labels)
    assert len(ttfts) == before[2] + 1 and 0 <= ttfts[-1] < 5  # only the stream has a first token
    assert metrics.recorded(INTER_TOKEN_LATENCY, **labels)


def test_refusals_are_counted_with_what_is_known_of_the_request():
    app = make_app("delta")
    unknown = {"model": "", "adapter": "", "endpoint": "chat"}
    before_404, before_400 = count(**unknown, status="404"), count(model="delta", adapter="", endpoint="completions", status="400")
    assert call(app, "POST", "/v1/chat/completions", json=chat("hi", model="nope")).status_code == 404
    assert call(app, "POST", "/v1/completions", json={"model": "delta", "prompt": "fail:client"}).status_code == 400
    assert count(**unknown, status="404") == before_404 + 1
    assert count(model="delta", adapter="", endpoint="completions", status="400") == before_400 + 1


def test_an_answer_relayed_from_a_model_replica_is_left_to_the_replica():
    answer = metrics.Answer("chat", arrived=0.0, continues=False)
    answer.started(200, [(b"content-type", b"text/event-stream"), (b"x-llmserve-replica", b"LLMServer:m#1")])
    answer.model = "relayed-model"
    answer.wrote(1.0)
    answer.ended(moved=False)
    assert count(model="relayed-model", adapter="", endpoint="chat", status="200") == 0
    assert metrics.recorded(TIME_TO_FIRST_TOKEN, model="relayed-model", adapter="", endpoint="chat") == []


def test_metrics_are_served_as_prometheus_text_without_a_key():
    app = make_app("epsilon")
    call(app, "POST", "/v1/completions", json={"model": "epsilon", "prompt": "a b"})
    response = call(app, "GET", "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert 'ray_llmserve_requests_total{model="epsilon",adapter="",endpoint="completions",status="200"}' in response.text
    assert "# TYPE ray_llmserve_request_duration_seconds histogram" in response.text
    assert 'ray_llmserve_request_duration_seconds_bucket{model="epsilon",adapter="",endpoint="completions",le="+Inf"} 1' in response.text


def test_families_from_several_nodes_are_merged_and_others_left_out():
    node_a = "# HELP ray_llmserve_requests_total Answers.\n# TYPE ray_llmserve_requests_total counter\nray_llmserve_requests_total{model=\"m\"} 2\n# HELP ray_other x\n# TYPE ray_other gauge\nray_other 1\n"
    node_b = "# HELP ray_llmserve_requests_total Answers.\n# TYPE ray_llmserve_requests_total counter\nray_llmserve_requests_total{model=\"n\"} 3\n# HELP ray_vllm_num_requests_running r\n# TYPE ray_vllm_num_requests_running gauge\nray_vllm_num_requests_running{engine=\"0\"} 1\n"
    text = metrics.merged_families([node_a, node_b], ("ray_llmserve_", "ray_vllm_"))
    lines = text.splitlines()
    assert lines.count("# TYPE ray_llmserve_requests_total counter") == 1
    assert 'ray_llmserve_requests_total{model="m"} 2' in lines and 'ray_llmserve_requests_total{model="n"} 3' in lines
    assert 'ray_vllm_num_requests_running{engine="0"} 1' in lines
    assert "ray_other 1" not in text


def test_a_stream_that_ends_with_an_error_event_is_counted_with_the_errors_status():
    app = make_app("theta")
    labels = {"model": "theta", "adapter": "", "endpoint": "completions"}
    before_500, before_200 = count(**labels, status="500"), count(**labels, status="200")
    response = call(app, "POST", "/v1/completions", json={"model": "theta", "prompt": "ok fail:event more", "stream": True})
    assert response.status_code == 200 and '"error"' in response.text
    assert (count(**labels, status="500"), count(**labels, status="200")) == (before_500 + 1, before_200)
