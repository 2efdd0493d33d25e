"""A corpus of hostile requests, sent as raw bytes over a socket, and what each must get.

The same corpus can be sent to any OpenAI server (llmserve, `vllm serve`): each
entry is the bytes of one request on a fresh connection; the answer's status
is read from the status line. ``expected`` is the status llmserve must give.
No entry may get a 5xx or no answer within the timeout.

Example::

    for case, status in send_corpus("127.0.0.1", 8000, model="tiny"):
        print(case.name, status, case.expected)
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Iterator, Optional

TIMEOUT_S = 30


@dataclass(frozen=True)
class Hostile:
    name: str
    raw: bytes
    expected: int


def _post(path: str, body: bytes, *, content_type: bytes = b"application/json", extra: bytes = b"") -> bytes:
    head = b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n" % (
        path.encode(),
        content_type,
        len(body),
        extra,
    )
    return head + body


def _chat(model: str, **fields) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def corpus(model: str, context_length: int) -> list[Hostile]:
    """Hostile requests for a server that serves the generating model ``model``."""
    deep = b"[" * 5000 + b"]" * 5000
    chat_path = "/v1/chat/completions"
    return [
        Hostile("broken JSON", _post(chat_path, b'{"model": '), 400),
        Hostile("a JSON array, not an object", _post(chat_path, b"[1, 2]"), 400),
        Hostile("an empty body", _post(chat_path, b""), 400),
        Hostile("a body that is not UTF-8", _post(chat_path, b'{"model": "\xff\xfe"}'), 400),
        Hostile("`model` a number", _post(chat_path, b'{"model": 7, "messages": []}'), 400),
        Hostile("an unknown model", _post(chat_path, _chat("no-such-model")), 404),
        Hostile("`messages` a string", _post(chat_path, json.dumps({"model": model, "messages": "hi"}).encode()), 400),
        Hostile("a negative max_tokens", _post(chat_path, _chat(model, max_tokens=-1)), 400),
        Hostile("max_tokens past the context", _post(chat_path, _chat(model, max_tokens=10**12)), 400),
        Hostile("temperature a word", _post(chat_path, _chat(model, temperature="hot")), 400),
        Hostile("`stream` a word", _post(chat_path, _chat(model, stream="maybe")), 400),
        Hostile("top_logprobs absurd", _post(chat_path, _chat(model, logprobs=True, top_logprobs=10**6)), 400),
        Hostile("an invalid JSON schema", _post(chat_path, _chat(model, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}})), 400),
        Hostile("tools not a list", _post(chat_path, _chat(model, tools="get_weather")), 400),
        Hostile("JSON nested 5,000 deep", _post(chat_path, b'{"model": "%s", "messages": %s}' % (model.encode(), deep)), 400),
        Hostile("a non-ASCII request_id", _post(chat_path, _chat(model, request_id="\udc80é\x00")), 400),
        Hostile("a prompt past the context length", _post("/v1/completions", json.dumps({"model": model, "prompt": "hi " * (context_length * 2)}).encode()), 400),
        Hostile("token ids past the vocabulary", _post("/v1/completions", json.dumps({"model": model, "prompt": [10**12], "max_tokens": 1}).encode()), 400),
        Hostile("a NUL in the prompt", _post("/v1/completions", json.dumps({"model": model, "prompt": "a\x00b", "max_tokens": 1}).encode()), 200),
        Hostile("a form without a boundary", _post("/v1/audio/transcriptions", b"--x\r\n", content_type=b"multipart/form-data"), 400),
        Hostile("an unknown path", _post("/v1/nothing-here", b"{}"), 404),
        Hostile("GET on a POST route", b"GET /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", 405),
        Hostile("not HTTP at all", b"HELLO THERE\r\n\r\n", 400),
        Hostile("a Content-Length that is not a number", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: lots\r\n\r\n", 400),
        Hostile("broken chunked framing", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", 400),
        Hostile("two gigabytes declared, none sent", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2147483648\r\n\r\n", 413),
        Hostile("200 headers", b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(200)) + b"\r\n", 431),
        Hostile("a 100 KiB header", b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100 * 1024 + b"\r\n\r\n", 431),
    ]


def send(host: str, port: int, raw: bytes) -> Optional[int]:
    """The status of the answer to ``raw`` on a fresh connection; None if none came in time."""
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass  # the server may refuse before reading everything; its answer still counts
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (socket.timeout, OSError):
            return None
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def send_corpus(host: str, port: int, *, model: str, context_length: int) -> Iterator[tuple[Hostile, Optional[int]]]:
    for case in corpus(model, context_length):
        yield case, send(host, port, case.raw)


def stalled_connections(host: str, port: int, *, model: str, count: int = 400, head_timeout_s: float = 15.0) -> dict:
    """Open ``count`` connections that stall (half send part of a head and stop, half send
    nothing) and measure what they cost: the median latency of a small request before
    and while they are open, the ingress's memory, and how long until every stalled head
    got its 408."""
    import statistics
    import time

    import psutil

    def latency_ms() -> float:
        body = json.dumps({"model": model, "prompt": "hi"}).encode()
        samples = []
        for _ in range(7):
            started = time.monotonic()
            assert send(host, port, _post("/tokenize", body)) == 200
            samples.append((time.monotonic() - started) * 1000)
        return statistics.median(samples)

    def ingress_rss_mb() -> float:
        found = [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith("ray::ServeReplica:") and "OpenAiIngress" in " ".join(p.info["cmdline"] or [])]
        return sum(p.memory_info().rss for p in found) / 2**20

    before_ms, before_rss = latency_ms(), ingress_rss_mb()
    stalled = []
    for index in range(count):
        sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
        if index % 2 == 0:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
        stalled.append(sock)
    opened = time.monotonic()
    during_ms, during_rss = latency_ms(), ingress_rss_mb()
    timed_out = 0
    for sock in stalled[::2]:
        sock.settimeout(max(1.0, head_timeout_s + 10 - (time.monotonic() - opened)))
        try:
            if sock.recv(64).startswith(b"HTTP/1.1 408"):
                timed_out += 1
        except OSError:
            pass
    all_answered_s = time.monotonic() - opened
    for sock in stalled:
        sock.close()
    return {
        "stalled": count,
        "latency_before_ms": before_ms,
        "latency_during_ms": during_ms,
        "ingress_rss_before_mb": before_rss,
        "ingress_rss_during_mb": during_rss,
        "heads_answered_408": timed_out,
        "seconds_until_every_head_got_408": all_answered_s,
    }
