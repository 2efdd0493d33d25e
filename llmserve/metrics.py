"""What clients see, measured by the process that makes each answer, as Prometheus series.

Every process of the app records with Ray's metrics (``ray.util.metrics``);
Ray's metrics agent on each node exports them, naming each series with Ray's
``ray_`` prefix (``llmserve_requests_total`` leaves as
``ray_llmserve_requests_total``). ``/metrics`` on the app's own port serves
the same text, gathered from every node's agent with vLLM's engine series
(``ray_vllm_*``, from ``log_engine_metrics``; Ray writes vLLM's ``vllm:`` as ``vllm_``), so one dashboard reads either.
Every series is described in docs/metrics.md.

An answer is counted once, where it was made: by the model replica that wrote
it (whichever way its bytes went to the client), or by the ingress for the
answers it makes itself (unknown model, a full queue, a malformed request).
A model replica measures from when the ingress got the request (it says so in
``x-llmserve-arrived``), so the time a request waited in the ingress's queue
is in its time to first token, as its client saw it.

Outside Ray (unit tests, a notebook with a fake engine) the values are kept in
this process, for ``recorded``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time
from dataclasses import dataclass
from typing import Any, Optional

from llmserve.migration import CONTINUES_HEADER, StreamCut
from llmserve import access_log
from llmserve.responses import REPLICA_HEADER, REQUEST_ID_HEADER

# Set by an ingress on what it sends to a model replica: the Unix time it got the request.
ARRIVED_HEADER = "x-llmserve-arrived"
PREFIX = "llmserve_"

# Seconds: first-token and whole-request times of small and large models, CPU to GPU.
_LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120]
_GAP_BUCKETS_S = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5]


@dataclass(frozen=True)
class Series:
    """One series family: what it counts, its tags, and (for a histogram) its buckets."""

    kind: str  # "counter", "histogram" or "gauge"
    name: str  # without Ray's ray_ prefix
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()


REQUESTS = Series("counter", "requests", "Answers by HTTP status, counted where they were made.", ("model", "adapter", "endpoint", "status"))
TIME_TO_FIRST_TOKEN = Series(
    "histogram", "time_to_first_token_seconds", "From the ingress getting a streamed request to its first event written.",
    ("model", "adapter", "endpoint"), tuple(_LATENCY_BUCKETS_S),
)  # fmt: skip
INTER_TOKEN_LATENCY = Series(
    "histogram", "inter_token_latency_seconds", "Between two writes of a stream, per token the later write carries.",
    ("model", "adapter", "endpoint"), tuple(_GAP_BUCKETS_S),
)  # fmt: skip
REQUEST_DURATION = Series(
    "histogram", "request_duration_seconds", "From the ingress getting a request to the last byte of its answer written.",
    ("model", "adapter", "endpoint"), tuple(_LATENCY_BUCKETS_S),
)  # fmt: skip
PROMPT_TOKENS = Series("counter", "prompt_tokens", "Prompt tokens of the requests the engines ran.", ("model", "adapter"))
COMPLETION_TOKENS = Series("counter", "completion_tokens", "Tokens the engines generated.", ("model", "adapter"))
QUEUED = Series("gauge", "requests_queued", "Requests waiting in an ingress's queue for a place on a replica.", ("model", "replica"))
REJECTIONS = Series("counter", "rejections", "Requests refused because the model's queue was full (429).", ("model",))
RETRIES = Series("counter", "retries", "Requests sent to another replica before anything was written (their replica declined or was gone).", ("model",))
MIGRATIONS = Series("counter", "migrations", "Streams continued on another replica after theirs died mid-stream.", ("model",))
# The labels of an answer to a request nobody could read, or not for a model.
UNKNOWN_REQUEST = {"model": "", "adapter": "", "endpoint": ""}
ALL_SERIES = (REQUESTS, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, REQUEST_DURATION, PROMPT_TOKENS, COMPLETION_TOKENS, QUEUED, REJECTIONS, RETRIES, MIGRATIONS)


_ray_metrics: dict[str, Any] = {}
# Outside Ray: (series name, its tags in order) -> a counter's sum, a gauge's value, a histogram's observations.
_recorded: dict[tuple[str, tuple[str, ...]], Any] = {}


def record(series: Series, value: float, **tags: str) -> None:
    """Count, observe or set ``value`` of ``series`` with ``tags`` (every one of its tags)."""
    metric = _ray_metric(series)
    if metric is None:
        _record_here(series, value, tags)
    elif series.kind == "counter":
        metric.inc(value, tags)
    elif series.kind == "histogram":
        metric.observe(value, tags)
    else:
        metric.set(value, tags)


def recorded(series: Series, **tags: str) -> Any:
    """What this process recorded outside Ray for ``series`` with ``tags``: a counter's sum,
    a gauge's value, a histogram's observations (for tests)."""
    return _recorded.get((series.name, tuple(tags[key] for key in series.tags)), [] if series.kind == "histogram" else 0)


def _ray_metric(series: Series) -> Any:
    metric = _ray_metrics.get(series.name)
    if metric is None:
        import ray

        if not ray.is_initialized():
            return None
        from ray.util import metrics

        name = PREFIX + series.name
        if series.kind == "counter":
            metric = metrics.Counter(name, series.description, tag_keys=series.tags)
        elif series.kind == "histogram":
            metric = metrics.Histogram(name, series.description, boundaries=list(series.buckets), tag_keys=series.tags)
        else:
            metric = metrics.Gauge(name, series.description, tag_keys=series.tags)
        _ray_metrics[series.name] = metric
    return metric


def _record_here(series: Series, value: float, tags: dict[str, str]) -> None:
    key = (series.name, tuple(tags[name] for name in series.tags))
    if series.kind == "counter":
        _recorded[key] = _recorded.get(key, 0) + value
    elif series.kind == "histogram":
        _recorded.setdefault(key, []).append(value)
    else:
        _recorded[key] = value


_ARRIVED, _CONTINUES, _REPLICA = ARRIVED_HEADER.encode(), CONTINUES_HEADER.encode(), REPLICA_HEADER.encode()
_REQUEST_ID = REQUEST_ID_HEADER.encode()
_answer: contextvars.ContextVar[Optional["Answer"]] = contextvars.ContextVar("llmserve_answer", default=None)


class Answer:
    """One API answer this process is making: what it is for, when it was written, its tokens."""

    __slots__ = ("endpoint", "model", "adapter", "arrived", "continues", "status", "failed_status", "request_id", "relayed", "streaming", "first_write", "last_write", "tokens_written", "prompt_tokens", "completion_tokens")

    def __init__(self, endpoint: str, arrived: float, continues: bool):
        self.endpoint = endpoint
        self.model = ""  # unknown until the body is parsed (a request it could not parse has none)
        self.adapter = ""  # the base model's requests have none
        self.arrived = arrived
        self.continues = continues  # the rest of a stream begun at another replica
        self.status: Optional[int] = None
        self.failed_status: Optional[int] = None  # a stream that ended with an error event: that error's status
        self.request_id: Optional[str] = None
        self.relayed = False  # the answer came from a model replica, which counted it
        self.streaming = False
        self.first_write: Optional[float] = None
        self.last_write = 0.0
        self.tokens_written = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def started(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        for name, value in headers:
            name = name.lower()
            if name == _REPLICA:
                self.relayed = True
            elif name == _REQUEST_ID:
                self.request_id = value.decode("latin-1")
            elif name == b"content-type":
                self.streaming = value.startswith(b"text/event-stream")

    def wrote(self, now: float) -> None:
        """A write of the answer's body; a stream's writes are its tokens as its client gets them."""
        if not self.streaming or self.relayed:
            return
        carried = self.completion_tokens - self.tokens_written
        self.tokens_written = self.completion_tokens
        if self.first_write is None:
            self.first_write = now
            if not self.continues:  # (a continuation's first write is not its request's first token)
                ttft = self._ttft()
                record(TIME_TO_FIRST_TOKEN, ttft, **self._labels())
                _recent_ttfts.append((now, ttft))
        elif carried:
            record(INTER_TOKEN_LATENCY, (now - self.last_write) / carried, **self._labels())
        self.last_write = now

    def ended(self, moved: bool) -> None:
        """The answer is written (or cut; ``moved``: it goes on at another replica)."""
        if self.relayed:
            return
        labels = self._labels()
        if self.prompt_tokens and not self.continues:  # (a continuation's prompt is its stream's prompt and output)
            record(PROMPT_TOKENS, self.prompt_tokens, model=self.model, adapter=self.adapter)
        if self.completion_tokens:
            record(COMPLETION_TOKENS, self.completion_tokens, model=self.model, adapter=self.adapter)
        if self.status is None:
            return
        status = self.failed_status or self.status
        duration = max(0.0, time.time() - self.arrived)
        access_log.write(
            request_id=self.request_id, **labels, status=status, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, ttft_s=self._ttft(), duration_s=duration, migrated=moved,
        )  # fmt: skip
        if not moved:
            record(REQUESTS, 1, **labels, status=str(status))
            record(REQUEST_DURATION, duration, **labels)

    def _ttft(self) -> Optional[float]:
        if not self.streaming or self.continues or self.first_write is None:
            return None
        return max(0.0, self.first_write - self.arrived)

    def _labels(self) -> dict[str, str]:
        return {"model": self.model, "adapter": self.adapter, "endpoint": self.endpoint}


# This process's latest first-token times (Unix time written, seconds), for the autoscaling policy.
_recent_ttfts: "collections.deque[tuple[float, float]]" = collections.deque(maxlen=4096)


def recent_ttft_quantile(quantile: float, window_s: float) -> Optional[float]:
    """The ``quantile`` of this process's times to first token over the last ``window_s``; None without any."""
    since = time.time() - window_s
    recent = sorted(ttft for written, ttft in _recent_ttfts if written >= since)
    if not recent:
        return None
    return recent[min(len(recent) - 1, int(quantile * len(recent)))]


def answering(model: str, adapter: Optional[str]) -> None:
    """The answer being made in this context is for ``model`` (and its ``adapter``)."""
    answer = _answer.get()
    if answer is not None:
        answer.model, answer.adapter = model, adapter or ""


def failed_mid_stream(status: int) -> None:
    """The stream being written in this context ends with an error event of ``status``."""
    answer = _answer.get()
    if answer is not None:
        answer.failed_status = status


def engine_tokens(prompt: int, completion: int) -> None:
    """The engine took ``prompt`` more prompt tokens and made ``completion`` more for the answer
    being made in this context."""
    answer = _answer.get()
    if answer is not None:
        answer.prompt_tokens += prompt
        answer.completion_tokens += completion


class AnswerMetrics:
    """ASGI middleware: measures each API answer the app makes (not those it relays from a
    model replica: the replica counted them)."""

    def __init__(self, app: Any, endpoints: dict[str, str]):
        self._app = app
        self._endpoints = endpoints  # API path -> endpoint name

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        endpoint = self._endpoints.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self._app(scope, receive, send)
        arrived, continues = time.time(), False
        for name, value in scope.get("headers", ()):
            if name == _ARRIVED:
                arrived = _unix_time(value, arrived)
            elif name == _CONTINUES:
                continues = True
        answer = Answer(endpoint, arrived, continues)
        token = _answer.set(answer)

        async def measured(message: dict) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                answer.started(message["status"], message.get("headers", ()))
            elif kind == "http.response.body" and message.get("body"):
                answer.wrote(time.time())
            await send(message)

        moved = False
        try:
            await self._app(scope, receive, measured)
        except StreamCut:
            moved = True
            raise
        finally:
            _answer.reset(token)
            answer.ended(moved)


def _unix_time(value: bytes, default: float) -> float:
    try:
        return float(value)
    except ValueError:
        return default


# What /metrics shows of each node's Ray metrics export: ours and vLLM's engine series.
_SHOWN_PREFIXES = ("ray_" + PREFIX, "ray_vllm_")
_AGENT_TIMEOUT_S = 5.0


async def exposition() -> str:
    """The Prometheus text of /metrics: this app's series from every live node's Ray metrics
    agent (outside Ray: what this process recorded, under the same names)."""
    import ray

    if not ray.is_initialized():
        return _recorded_here_as_text()
    import aiohttp

    nodes = [node for node in ray.nodes() if node.get("Alive") and node.get("MetricsExportPort", 0) > 0]
    urls = [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics" for node in nodes]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_AGENT_TIMEOUT_S)) as session:

        async def fetch(url: str) -> str:
            try:
                async with session.get(url) as response:
                    return await response.text()
            except (OSError, aiohttp.ClientError, TimeoutError):
                return ""  # a node going away: the others still count

        texts = await asyncio.gather(*(fetch(url) for url in urls))
    return merged_families(texts, _SHOWN_PREFIXES)


def merged_families(texts: list[str], prefixes: tuple[str, ...]) -> str:
    """The families named with one of ``prefixes`` in several Prometheus texts, each family once
    (its HELP and TYPE, then the samples of every text)."""
    families: dict[str, list[str]] = {}
    heads: dict[str, list[str]] = {}
    for text in texts:
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if family.startswith(prefixes):
                    kept = heads.setdefault(family, [])
                    if len(kept) < 2 and line not in kept:
                        kept.append(line)
                    families.setdefault(family, [])
            elif line and not line.startswith("#") and family is not None and family in families:
                families[family].append(line)
    return "".join("\n".join(heads[name] + samples) + "\n" for name, samples in families.items())


def _recorded_here_as_text() -> str:
    lines = []
    for series in ALL_SERIES:
        name = "ray_" + PREFIX + series.name + ("_total" if series.kind == "counter" else "")
        kept = [(tags, value) for (family, tags), value in _recorded.items() if family == series.name]
        if not kept:
            continue
        lines += [f"# HELP {name} {series.description}", f"# TYPE {name} {series.kind}"]
        for tags, value in kept:
            labels = ",".join(f'{key}="{_escaped(tag)}"' for key, tag in zip(series.tags, tags))
            if series.kind == "histogram":
                for bound in (*series.buckets, float("inf")):
                    le = "+Inf" if bound == float("inf") else repr(float(bound))
                    lines.append(f'{name}_bucket{{{labels},le="{le}"}} {sum(1 for v in value if v <= bound)}')
                lines += [f"{name}_count{{{labels}}} {len(value)}", f"{name}_sum{{{labels}}} {sum(value)}"]
            else:
                lines.append(f"{name}{{{labels}}} {value}")
    return "\n".join(lines) + "\n" if lines else ""


def _escaped(tag: str) -> str:
    return tag.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
