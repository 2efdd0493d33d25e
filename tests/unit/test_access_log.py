"""The access log in-process (fake engine, no Ray): one line per answer, as text or JSON lines."""

import json

import pytest

from llmserve import access_log
from tests.unit.test_ingress import call, chat, make_app


@pytest.fixture
def log_file(tmp_path, monkeypatch):
    path = tmp_path / "access.log"
    monkeypatch.setenv(access_log.PATH_ENV, str(path))
    return path


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_each_answer_is_one_json_line_with_its_tokens_times_and_ids(log_file, monkeypatch):
    monkeypatch.setenv(access_log.FORMAT_ENV, "json")
    app = make_app("zeta")
    streamed = call(app, "POST", "/v1/chat/completions", json=chat("one two three", model="zeta", stream=True), headers={"x-request-id": "stream-1"})
    assert streamed.status_code == 200
    assert call(app, "POST", "/v1/chat/completions", json=chat("hi", model="nope")).status_code == 404
    first, second = [json.loads(line) for line in lines(log_file)]
    assert list(first) == list(access_log.FIELDS)
    assert (first["request_id"], first["model"], first["adapter"], first["endpoint"], first["status"]) == ("stream-1", "zeta", "", "chat", 200)
    assert first["prompt_tokens"] == 3 and first["completion_tokens"] > 0
    assert 0 <= first["ttft_s"] <= first["duration_s"] < 5 and first["migrated"] is False
    assert first["replica"].startswith("pid")  # outside Serve; a replica's own name inside it
    assert (second["status"], second["model"], second["ttft_s"]) == (404, "", None)  # an answer without a stream has no first token
    assert second["request_id"]  # the id the ingress gave it


def test_text_lines_are_key_value_pairs_quoting_what_needs_it(log_file):
    app = make_app("eta")
    assert call(app, "POST", "/v1/completions", json={"model": "eta", "prompt": "a b"}, headers={"x-request-id": "two words"}).status_code == 200
    (line,) = lines(log_file)
    stamp, rest = line.split(" ", 1)
    assert stamp.endswith("Z") and "T" in stamp
    assert rest.startswith('request_id="two words" model=eta adapter="" endpoint=completions status=200 prompt_tokens=2 ')
    assert " ttft_s=- " in rest and rest.endswith(" migrated=false")
