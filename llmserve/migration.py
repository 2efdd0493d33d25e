"""Streams that outlive their replica: what the client got is resubmitted elsewhere and the stream goes on.

On the default path (``llmserve run``: the front door hands the client's
socket to a replica on its node, ``handoff.py``) a stream can survive the
death of the replica writing it, or of that replica's engine:

1. With the socket, the front door passes the write end of a pipe and asks
   for progress (``PROGRESS_HEADER``). Before each write to the client the
   replica appends one line to the pipe: the write's size and the token ids of
   the events in it. vLLM puts those ids in the events (``return_token_ids``);
   the replica takes them out again, so the client gets the same bytes as
   without them. The first line also holds the prompt's token ids and the
   request that would continue the stream.
2. The front door reads none of this while the stream goes well. When the
   answer is cut short (the replica died; or its engine did, and the replica
   stopped writing instead of sending an error event), it counts the bytes
   that went into the client's socket since it handed it over (TCP's
   acknowledged bytes plus those still queued, both the kernel's): the lines
   whose writes add up to exactly that many bytes are what the client has.
3. It sends another replica a completions request whose prompt is the
   first prompt's token ids followed by the tokens the client has, for the
   tokens still due (``CONTINUES_HEADER``). That replica writes the rest of
   the stream to the same socket: no new head, and events in the first
   stream's shape (its id, creation time and object; usage counted from the
   first prompt). A stream migrates at most ``max_stream_migrations`` times
   (a deployment option; 1 unless set).

For greedy decoding the client's text and usage equal a run without the
fault: the resubmitted prompt is the same token ids, not re-tokenized text.
Streams this cannot continue exactly end with an error event as before:
more than one choice, logprobs, tools, structured output, a reasoning
parser, output-dependent penalties, or writes the pipe did not describe
(a write cut in the middle, a pipe that filled up).

Example::

    marks = StreamMarks.for_request("completions", body, continues=None, context_length=512)  # replica
    marked = marks.mark(events_text)  # text for the client, a line for the pipe
    resume = Resume.after_cut(Delivered.of(pipe_lines, bytes_written), resume, limit=1)  # front door
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

# Front door to replica: report each write's tokens on the pipe handed over with the socket.
PROGRESS_HEADER = "x-llmserve-progress"
# Front door to replica: this request continues a stream another replica began (JSON: ``Continued``).
CONTINUES_HEADER = "x-llmserve-continues"
# A stream is continued on another replica at most this many times unless its deployment
# says otherwise (``max_stream_migrations``): a request that kills every engine it runs on
# should not take more than two replicas with it.
DEFAULT_MAX_MIGRATIONS = 1
# vLLM's completions default when a request names no max_tokens.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Request fields a continued stream reproduces exactly (besides the prompt and the lengths).
_SAMPLING_FIELDS = {
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
    "repetition_penalty", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "user", "stream_options", "priority",
}  # fmt: skip
_LENGTH_FIELDS = {"max_tokens", "min_tokens"}
_RESUMABLE_FIELDS = {
    "completions": _SAMPLING_FIELDS | _LENGTH_FIELDS | {"model", "prompt", "stream", "request_id", "n", "echo", "logprobs"},
    "chat": _SAMPLING_FIELDS
    | _LENGTH_FIELDS
    | {
        "model", "messages", "stream", "request_id", "n", "logprobs", "max_completion_tokens", "chat_template",
        "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "add_special_tokens",
    },
}  # fmt: skip
# Penalties on what the stream already generated: in a continuation those tokens are prompt.
_OUTPUT_PENALTIES = ("presence_penalty", "frequency_penalty")

_TOKEN_IDS = re.compile(r'"token_ids":\[([0-9,]*)\]')
_PROMPT_TOKEN_IDS = re.compile(r'"prompt_token_ids":\[([0-9,]*)\]')
_STREAM_ID = re.compile(r'"id":"([^"]*)","object":"([^"]*)","created":([0-9]+)')
_FINISHED = re.compile(r'"finish_reason":"')
# An event whose text is not empty. vLLM sends tokens with no text while it holds their text
# back: a character whose UTF-8 bytes are split over tokens, or what may be a stop string.
# A continuation resumes after the last token whose text went out, so nothing held back is
# lost; and its prompt then never ends in the middle of a character, where vLLM's detokenizer
# would put the whole prompt's text in its first event (seen with vLLM 0.32).
_SOME_TEXT = re.compile(r'"(?:text|content)":"[^"]')


class StreamCut(Exception):
    """The replica stops writing a stream another replica will continue (its engine died)."""


def resumable(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether a stream of this request can be continued exactly from its token ids."""
    fields = _RESUMABLE_FIELDS.get(endpoint)
    if fields is None or not body.get("stream") or not set(body) <= fields | set(_OUTPUT_PENALTIES):
        return False
    if any(body.get(penalty) for penalty in _OUTPUT_PENALTIES) or body.get("n", 1) != 1 or body.get("echo"):
        return False
    if endpoint == "completions":
        prompt = body.get("prompt")
        single = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        return single and body.get("logprobs") is None
    return not body.get("logprobs")


@dataclass(frozen=True)
class Continued:
    """The stream a continuation request goes on with: what its events must say."""

    id: str
    created: int
    object: str  # "text_completion" or "chat.completion.chunk"
    prompt_tokens: int  # of the first request's prompt
    completion_tokens: int  # the client already has

    def header(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_header(cls, value: str) -> "Continued":
        return cls(**json.loads(value))


@dataclass(frozen=True)
class Marked:
    """SSE text for the client, and the line its write adds to the pipe (``handoff._Answer``)."""

    text: str
    mark: bytes


class StreamMarks:
    """In the replica: the token ids of a stream's events, taken out of them for the front door."""

    def __init__(self, endpoint: str, body: dict[str, Any], context_length: int, continues: Optional[Continued]):
        self._endpoint = endpoint
        self._body = body
        self._context_length = context_length
        self._continues = continues
        self._first = continues is None  # the first write of a first stream says how to continue it
        self.error_tail: Optional[str] = None  # an error event came, and this is it with what followed

    @classmethod
    def for_request(
        cls, endpoint: str, body: dict[str, Any], *, continues: Optional[Continued], context_length: Optional[int]
    ) -> Optional["StreamMarks"]:
        """Marks for a stream the front door asked progress of; None where it cannot be continued
        (``context_length`` None: the engine cannot continue streams of this endpoint)."""
        if context_length is None or not resumable(endpoint, body):
            return None
        return cls(endpoint, body, context_length, continues)

    def engine_body(self) -> dict[str, Any]:
        """The request as the engine gets it: with the token ids of prompt and output in its events."""
        return {**self._body, "return_token_ids": True}

    def mark(self, text: str) -> Marked:
        """The events of one write as the client gets them, and its line for the pipe: the
        write's tokens (``t``), of which the first ``w`` (when not all) have their text in it."""
        tokens: list[int] = []
        shown_upto = 0
        shown: list[str] = []
        extra: dict[str, Any] = {}
        finished = False
        events = text.split("\n\n")
        for at, event in enumerate(events):
            if not event:
                continue
            if event.startswith('data: {"error"'):
                # The server decides: continue elsewhere (StreamCut) or send it on.
                self.error_tail = "\n\n".join(events[at:])
                break
            if self._continues is not None and event.startswith("data: {"):
                event = self._in_first_shape(event)
            if self._first and event.startswith("data: {"):
                self._first = False
                extra = self._resume_fields(event)
                event = _PROMPT_TOKEN_IDS.sub('"prompt_token_ids":null', event, count=1)
            event = _TOKEN_IDS.sub(lambda found: _collect(found, tokens), event)
            if _SOME_TEXT.search(event):
                shown_upto = len(tokens)
            finished = finished or bool(_FINISHED.search(event))
            shown.append(event + "\n\n")
        mark: dict[str, Any] = {"t": tokens, **extra}
        if shown_upto != len(tokens):
            mark["w"] = shown_upto
        if finished:
            mark["f"] = 1
        return Marked("".join(shown), json.dumps(mark, separators=(",", ":")).encode())

    def _resume_fields(self, event: str) -> dict[str, Any]:
        """What the front door needs to continue this stream: prompt ids, stream id, the request."""
        prompt = _PROMPT_TOKEN_IDS.search(event)
        identity = _STREAM_ID.search(event)
        if prompt is None or identity is None:
            return {"x": 1}  # not what vLLM sends with token ids: no continuation
        prompt_ids = [int(t) for t in prompt.group(1).split(",") if t]
        body = self._body
        if self._endpoint == "chat":
            limit = body.get("max_completion_tokens") or body.get("max_tokens") or self._context_length - len(prompt_ids)
        else:
            limit = body.get("max_tokens") or COMPLETIONS_DEFAULT_MAX_TOKENS
        request = {key: body[key] for key in _SAMPLING_FIELDS if key in body}
        request.update(model=body.get("model"), stream=True, max_tokens=limit)
        if body.get("min_tokens"):
            request["min_tokens"] = body["min_tokens"]
        stream = {"id": identity.group(1), "object": identity.group(2), "created": int(identity.group(3))}
        return {"p": prompt_ids, "r": request, "s": stream}

    def _in_first_shape(self, event: str) -> str:
        """A continuation's completions event as the first stream's: its id, object and usage."""
        chunk = json.loads(event[len("data: ") :])
        first = self._continues
        chunk.update(id=first.id, created=first.created)
        usage = chunk.get("usage")
        if usage:
            usage["prompt_tokens"] = first.prompt_tokens
            usage["completion_tokens"] = usage.get("completion_tokens", 0) + first.completion_tokens
        if first.object == "chat.completion.chunk":
            chunk["object"] = first.object
            chunk["choices"] = [_as_chat_choice(choice) for choice in chunk.get("choices", [])]
        else:
            for choice in chunk.get("choices", []):
                choice["prompt_token_ids"] = None  # the client has the first stream's (none, unasked)
        return "data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)


def _collect(found: re.Match, tokens: list[int]) -> str:
    tokens.extend(int(t) for t in found.group(1).split(",") if t)
    return '"token_ids":null'


def _as_chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A completions choice as vLLM's chat stream shapes one (plain content)."""
    shaped = {"index": choice.get("index", 0), "delta": {"content": choice.get("text", "")}, "logprobs": None}
    shaped["finish_reason"] = choice.get("finish_reason")
    if shaped["finish_reason"] is not None:
        shaped["stop_reason"] = choice.get("stop_reason")
    shaped["token_ids"] = choice.get("token_ids")
    return shaped


@dataclass
class Resume:
    """In the front door: one stream's way to go on elsewhere, and what its client has so far."""

    request: dict[str, Any]  # the continuation request, less its prompt and lengths
    prompt: list[int]
    stream: dict[str, Any]  # id, object, created of the client's stream
    generated: list[int] = field(default_factory=list)
    migrations: int = 0

    @classmethod
    def after_cut(cls, delivered: "Delivered", resume: Optional["Resume"], limit: int) -> Optional["Resume"]:
        """The stream to continue after a replica's writes stopped short; None when the
        client's part is not known exactly, nothing is left to generate, or the stream
        moved ``limit`` times already.

        ``resume`` is what an earlier replica of this stream left (None for the first one).
        """
        if resume is None and delivered.first is not None:
            resume = cls(delivered.first["r"], delivered.first["p"], delivered.first["s"])
        if not delivered.exact or resume is None or delivered.finished or resume.migrations >= limit:
            return None
        resumed = replace(resume, generated=resume.generated + delivered.tokens, migrations=resume.migrations + 1)
        return resumed if resumed.tokens_left() > 0 else None

    def tokens_left(self) -> int:
        return self.request["max_tokens"] - len(self.generated)

    def body(self) -> bytes:
        """The completions request that generates the rest of the stream."""
        request = {**self.request, "prompt": self.prompt + self.generated, "max_tokens": self.tokens_left()}
        if "min_tokens" in request:
            request["min_tokens"] = max(0, request["min_tokens"] - len(self.generated))
        return json.dumps(request, separators=(",", ":")).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The continuation request's own header (the first request's say it is JSON)."""
        return [(CONTINUES_HEADER.encode(), self.continued().header().encode())]

    def continued(self) -> Continued:
        return Continued(self.stream["id"], self.stream["created"], self.stream["object"], len(self.prompt), len(self.generated))


@dataclass
class Delivered:
    """What a client got of one replica's writes, from the pipe's lines and the bytes that went out."""

    exact: bool  # the lines account for exactly the bytes written
    tokens: list[int] = field(default_factory=list)  # those whose text went out (see _SOME_TEXT)
    finished: bool = False  # an event with a finish reason went out
    ended: bool = False  # the whole answer went out, to its last byte
    first: Optional[dict[str, Any]] = None  # the first stream's own line: prompt, request, id

    @classmethod
    def of(cls, lines: bytes, written: int) -> "Delivered":
        delivered = cls(exact=False)
        total = 0
        sent: list[int] = []  # every token the writes carried, text or not
        for line in lines.split(b"\n"):
            if total == written:
                delivered.exact = True
                break
            size, _, mark = line.partition(b" ")
            try:
                fields = json.loads(mark)
            except ValueError:
                break  # the lines ran out (or the last was cut) before the bytes did
            if not size.isdigit() or "x" in fields:
                break
            total += int(size)
            carried = fields.get("t", [])
            shown = fields.get("w", len(carried))
            if shown:
                delivered.tokens = sent + carried[:shown]
            sent += carried
            delivered.finished = delivered.finished or "f" in fields
            delivered.ended = delivered.ended or "e" in fields
            if "r" in fields:
                delivered.first = fields
        return delivered
