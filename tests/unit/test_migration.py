"""Streams continued on another replica (llmserve/migration.py): marks, accounting, continuation.

The events are vLLM 0.32's own, as a tiny model streamed them with and without
`return_token_ids`; the real-engine proof is tests/e2e/test_faults.py.
"""

import json

from llmserve.migration import Continued, Delivered, Resume, StreamMarks, resumable

COMPLETION_EVENTS = [
    'data: {"id":"cmpl-1","object":"text_completion","created":17,"model":"tiny","choices":[{"index":0,"text":" a","logprobs":null,'
    '"finish_reason":null,"stop_reason":null,"prompt_token_ids":[272,81,84],"token_ids":[1698]}]}\n\n',
    'data: {"id":"cmpl-1","object":"text_completion","created":17,"model":"tiny","choices":[{"index":0,"text":" b","logprobs":null,'
    '"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":[780]}]}\n\n',
    'data: {"id":"cmpl-1","object":"text_completion","created":17,"model":"tiny","choices":[{"index":0,"text":" c","logprobs":null,'
    '"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":[1821]}]}\n\n',
    'data: {"id":"cmpl-1","object":"text_completion","created":17,"model":"tiny","choices":[],'
    '"usage":{"prompt_tokens":3,"total_tokens":6,"completion_tokens":3}}\n\n',
    "data: [DONE]\n\n",
]
BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True, "request_id": "r"}


def marks_for(body=BODY, endpoint="completions", continues=None):
    return StreamMarks.for_request(endpoint, body, continues=continues, context_length=512)


def test_the_client_gets_the_bytes_it_would_get_without_token_ids_and_the_pipe_gets_the_ids():
    marks = marks_for()
    assert marks.engine_body()["return_token_ids"] is True
    marked = [marks.mark(event) for event in COMPLETION_EVENTS]
    texts = "".join(m.text for m in marked)
    assert '"prompt_token_ids":null,"token_ids":null' in texts and "[272" not in texts and "1698" not in texts
    first = json.loads(marked[0].mark)
    assert first["t"] == [1698] and first["p"] == [272, 81, 84]
    assert first["s"] == {"id": "cmpl-1", "object": "text_completion", "created": 17}
    assert "prompt" not in first["r"]  # the front door puts the token ids there
    assert first["r"]["max_tokens"] == 3 and "return_token_ids" not in first["r"] and "request_id" not in first["r"]
    assert json.loads(marked[1].mark) == {"t": [780]}
    assert json.loads(marked[2].mark) == {"t": [1821], "f": 1}  # a finish reason went out


def test_coalesced_events_in_one_write_are_marked_together():
    marks = marks_for()
    marked = marks.mark("".join(COMPLETION_EVENTS[:3]))
    assert json.loads(marked.mark)["t"] == [1698, 780, 1821]
    assert marked.text.count("data: ") == 3


def test_an_error_event_is_held_back_for_the_server_to_decide():
    marks = marks_for()
    marked = marks.mark(COMPLETION_EVENTS[0] + 'data: {"error": {"message": "engine dead"}}\n\ndata: [DONE]\n\n')
    assert marked.text.count("data: ") == 1 and "error" not in marked.text
    assert marks.error_tail.startswith('data: {"error"') and "[DONE]" in marks.error_tail


def test_only_streams_that_can_be_continued_exactly_are_marked():
    assert resumable("completions", BODY)
    assert resumable("chat", {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}})
    assert not resumable("completions", {**BODY, "stream": False})
    assert not resumable("completions", {**BODY, "n": 2})
    assert not resumable("completions", {**BODY, "logprobs": 2})
    assert not resumable("completions", {**BODY, "prompt": ["two", "prompts"]})
    assert not resumable("completions", {**BODY, "presence_penalty": 0.5})
    assert resumable("completions", {**BODY, "presence_penalty": 0})
    assert not resumable("completions", {**BODY, "return_token_ids": True})  # the client wants the ids
    assert not resumable("chat", {"model": "m", "messages": [], "stream": True, "tools": []})
    assert not resumable("chat", {"model": "m", "messages": [], "stream": True, "response_format": {"type": "json_object"}})
    assert not resumable("embeddings", {"model": "m", "input": "x", "stream": True})
    # An engine that cannot continue streams (no context length to give) gets no marks.
    assert StreamMarks.for_request("completions", BODY, continues=None, context_length=None) is None


def marked_events(events, body=BODY):
    """The events of one stream as its replica marks them."""
    marks = marks_for(body)
    return [marks.mark(event) for event in events]


def lines_for(marked, sizes):
    return b"".join(b"%d %s\n" % (size, m.mark) for size, m in zip(sizes, marked))


def test_the_bytes_that_went_out_say_which_tokens_the_client_has():
    marked = marked_events(COMPLETION_EVENTS[:2])
    lines = lines_for(marked, [300, 120])
    assert Delivered.of(lines, 420).tokens == [1698, 780]
    assert Delivered.of(lines, 420).exact
    # Killed between describing the second write and making it: the client has the first.
    only_first = Delivered.of(lines, 300)
    assert only_first.exact and only_first.tokens == [1698] and only_first.first["p"] == [272, 81, 84]
    # Killed in the middle of a write: what the client has is not known to the token.
    assert not Delivered.of(lines, 350).exact
    # More bytes than the lines describe (the pipe filled up): not known either.
    assert not Delivered.of(lines, 600).exact
    assert not Delivered.of(lines[:-3], 420).exact  # the last line was cut


def test_the_continuation_resubmits_the_prompt_and_the_tokens_sent_for_the_tokens_left():
    body = {**BODY, "max_tokens": 10, "min_tokens": 4, "stream_options": {"include_usage": True}}
    marked = marked_events(COMPLETION_EVENTS[:2], body)
    resume = Resume.after_cut(Delivered.of(lines_for(marked, [300, 120]), 420), None, limit=1)
    request = json.loads(resume.body())
    assert request["prompt"] == [272, 81, 84, 1698, 780]
    assert request["max_tokens"] == 8 and request["min_tokens"] == 2
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}
    assert resume.continued() == Continued("cmpl-1", 17, "text_completion", prompt_tokens=3, completion_tokens=2)
    assert Continued.from_header(resume.continued().header()) == resume.continued()


def test_a_stream_is_continued_at_most_limit_times_and_never_past_its_end():
    body = {**BODY, "max_tokens": 10}
    marked = marked_events(COMPLETION_EVENTS[:2], body)
    delivered = Delivered.of(lines_for(marked, [300, 120]), 420)
    resume = None
    for _ in range(3):
        resume = Resume.after_cut(delivered if resume is None else Delivered(exact=True), resume, limit=3)
        assert resume is not None
    assert Resume.after_cut(Delivered(exact=True), resume, limit=3) is None
    finished = marked_events(COMPLETION_EVENTS[:3], body)
    assert Resume.after_cut(Delivered.of(lines_for(finished, [300, 120, 120]), 540), None, limit=3) is None
    # Every token due went out (the finish chunk did not): nothing is left to continue.
    full = marked_events(COMPLETION_EVENTS[:2], {**BODY, "max_tokens": 2})
    assert Resume.after_cut(Delivered.of(lines_for(full, [300, 120]), 420), None, limit=3) is None


def test_a_continuation_speaks_as_the_first_stream_with_usage_counted_from_its_prompt():
    first = Continued("cmpl-1", 17, "text_completion", prompt_tokens=3, completion_tokens=2)
    body = {**BODY, "prompt": [272, 81, 84, 1698, 780], "max_tokens": 1}
    marks = marks_for(body, continues=first)
    new = [event.replace("cmpl-1", "cmpl-2").replace(":17,", ":99,") for event in COMPLETION_EVENTS[2:]]
    new[0] = new[0].replace('"prompt_token_ids":null', '"prompt_token_ids":[272,81,84,1698,780]')
    new[1] = new[1].replace('"prompt_tokens":3,"total_tokens":6,"completion_tokens":3', '"prompt_tokens":5,"total_tokens":6,"completion_tokens":1')
    marked = [marks.mark(event) for event in new]
    chunk = json.loads(marked[0].text[len("data: ") :])
    assert chunk["id"] == "cmpl-1" and chunk["created"] == 17
    assert chunk["choices"][0]["token_ids"] is None and chunk["choices"][0]["prompt_token_ids"] is None
    assert json.loads(marked[0].mark) == {"t": [1821], "f": 1}
    usage = json.loads(marked[1].text[len("data: ") :])["usage"]
    assert usage == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}
    assert marked[2].text == "data: [DONE]\n\n"


def test_a_chat_stream_continues_as_chat_chunks():
    first = Continued("chatcmpl-1", 17, "chat.completion.chunk", prompt_tokens=15, completion_tokens=2)
    marks = marks_for({**BODY, "prompt": [1, 2]}, continues=first)
    chunk = json.loads(marks.mark(COMPLETION_EVENTS[1]).text[len("data: ") :])
    assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == "chatcmpl-1"
    assert chunk["choices"] == [{"index": 0, "delta": {"content": " b"}, "logprobs": None, "finish_reason": None, "token_ids": None}]
    finish = json.loads(marks.mark(COMPLETION_EVENTS[2]).text[len("data: ") :])["choices"][0]
    assert finish["finish_reason"] == "length" and finish["stop_reason"] is None


def test_a_chat_stream_without_max_tokens_may_fill_the_context():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    event = COMPLETION_EVENTS[0].replace('"object":"text_completion"', '"object":"chat.completion.chunk"')
    assert json.loads(marks_for(chat, "chat").mark(event).mark)["r"]["max_tokens"] == 512 - 3


def test_the_deployment_s_bound_on_migrations_holds():
    body = {**BODY, "max_tokens": 10}
    delivered = Delivered.of(lines_for(marked_events(COMPLETION_EVENTS[:2], body), [300, 120]), 420)
    assert Resume.after_cut(delivered, None, limit=0) is None
    once = Resume.after_cut(delivered, None, limit=1)
    assert once is not None and Resume.after_cut(Delivered(exact=True), once, limit=1) is None


def test_tokens_whose_text_vllm_still_holds_back_are_generated_again_not_lost():
    """A character split over tokens (or a possible stop string) has no text yet: the
    continuation resumes before those tokens, so their text comes out once, from it."""
    held = COMPLETION_EVENTS[1].replace('"text":" b"', '"text":""')
    marked = marked_events([COMPLETION_EVENTS[0], held])
    assert json.loads(marked[1].mark) == {"t": [780], "w": 0}
    delivered = Delivered.of(lines_for(marked, [300, 120]), 420)
    assert delivered.exact and delivered.tokens == [1698]
    coalesced = marked_events(["".join([COMPLETION_EVENTS[0], held])])
    assert json.loads(coalesced[0].mark)["w"] == 1
    assert Delivered.of(lines_for(coalesced, [420]), 420).tokens == [1698]
