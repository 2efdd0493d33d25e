"""Faults injected into a running `llmserve run`, and what its clients saw.

``under_fault`` starts streams and keeps sending short requests while one
process of the app is killed with SIGKILL, then sorts every answer:

- completed: the whole answer, equal to the same request's answer without a fault;
  of those, migrated: streams begun by a replica that was gone after the fault (the
  stream went on at another replica, ``llmserve/migration.py``);
- failed cleanly: an HTTP error in the OpenAI envelope, or a stream that ends with
  an error event and ``[DONE]``, or a connection refused before anything was sent
  (nothing listened for a moment: the client can retry);
- broken: cut without an error, or a wrong text (must be 0 where the app could know);
- hung: no end within the clients' timeout (must always be 0).

Processes are found among the descendants of the `llmserve run` process by the
titles Ray and vLLM give them, so nothing outside the app is touched.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil
import requests

CLIENT_TIMEOUT_S = 120.0
OUTCOMES = ("completed", "failed cleanly", "broken", "hung")


@dataclass
class Tally:
    fault: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    details: list[str] = field(default_factory=list)
    migrated: int = 0  # streams that completed after the kill, begun by a replica that died
    streams_completed: int = 0
    service_back_s: Optional[float] = None  # until a request sent after the kill was answered
    recovered_s: Optional[float] = None  # every replica running again

    def add(self, outcome: str, detail: str = "") -> None:
        self.counts[outcome] += 1
        if outcome in ("broken", "hung") and detail:
            self.details.append(detail)

    @property
    def sent(self) -> int:
        return sum(self.counts.values())

    def row(self) -> str:
        cells = [self.fault, str(self.sent), str(self.counts["completed"]), str(self.migrated)]
        cells += [str(self.counts[o]) for o in OUTCOMES[1:]]
        cells += [_seconds(self.service_back_s), _seconds(self.recovered_s)]
        return " | ".join(cells)


def table(tallies: list[Tally]) -> str:
    head = "fault | sent | completed | migrated | " + " | ".join(OUTCOMES[1:]) + " | service back (s) | all replicas back (s)"
    return "\n".join([head, "|".join(["---"] * (len(OUTCOMES) + 5))] + [t.row() for t in tallies])


def _seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def stream(base_url: str, body: dict, seen: Optional[dict] = None, began_on: Optional[list] = None) -> tuple[str, str]:
    """One streamed completion, or chat completion for a body with `messages`: (outcome,
    the text or what went wrong). ``seen`` gets the replica that began it, the stream's ids
    and its usage (with ``include_usage``)."""
    text, saw_error = [], False
    seen = {} if seen is None else seen
    seen["ids"] = set()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    try:
        with requests.post(base_url + path, json={**body, "stream": True}, stream=True, timeout=CLIENT_TIMEOUT_S) as response:
            seen["replica"] = response.headers.get("x-llmserve-replica")
            if began_on is not None:
                began_on.append(seen["replica"])
            if response.status_code != 200:
                return _http_error(response)
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: ") :]
                if data == b"[DONE]":
                    return ("failed cleanly", "error event") if saw_error else ("completed", "".join(text))
                event = json.loads(data)
                if "error" in event:
                    saw_error = True
                else:
                    for choice in event.get("choices", []):
                        text.append(choice["text"] if "text" in choice else choice["delta"].get("content") or "")
                    seen["ids"].add(event.get("id"))
                    seen["usage"] = event.get("usage") or seen.get("usage")
        return "broken", f"stream cut after {len(text)} pieces without an error event"
    except requests.ConnectionError as exc:
        return _connection_error(exc, bool(text))
    except requests.Timeout:
        return "hung", "no end within the timeout"
    except requests.exceptions.ChunkedEncodingError:
        return "broken", f"stream cut mid-chunk after {len(text)} pieces"


def whole(base_url: str, body: dict) -> tuple[str, str]:  # (completions only)
    """One whole completion: (outcome, the text or what went wrong)."""
    try:
        response = requests.post(base_url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)
    except requests.ConnectionError as exc:
        return _connection_error(exc, False)
    except requests.Timeout:
        return "hung", "no answer within the timeout"
    if response.status_code != 200:
        return _http_error(response)
    return "completed", response.json()["choices"][0]["text"]


def _http_error(response) -> tuple[str, str]:
    try:
        envelope = response.json()["error"]
        return "failed cleanly", f"{response.status_code} {envelope.get('code')}"
    except Exception:
        return "broken", f"{response.status_code} without the error envelope: {response.text[:200]!r}"


def _connection_error(exc: Exception, started: bool) -> tuple[str, str]:
    if not started and "refused" in str(exc).lower():
        return "failed cleanly", "connection refused"
    return "broken", f"connection error: {exc!r}"[:300]


def processes(root_pid: int, title: str) -> list[psutil.Process]:
    """The app's processes whose title starts with ``title`` (e.g. ``VLLM::EngineCore``)."""
    return [process for process in psutil.Process(root_pid).children(recursive=True) if _titled(process, title)]


def _titled(process: psutil.Process, title: str) -> bool:
    try:
        return " ".join(process.cmdline()).startswith(title) or process.name().startswith(title)
    except psutil.Error:
        return False


_ONGOING = """
import json, ray
ray.init(address="auto", namespace="serve", log_to_driver=False)
names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::") and "#LLMServer" in a["name"]]
print(json.dumps({name: ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote()) for name in names}))
"""

# Who holds each model replica's open leases (ReplicaDataPlane.leases_by_owner), and whether
# each ingress actor is alive: where a lease outlives its request, this says whose it is.
_LEASE_OWNERS = """
import json, ray
from ray.util.state import list_actors
ray.init(address="auto", namespace="serve", log_to_driver=False)
names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::") and "#LLMServer" in a["name"]]
held = lambda actor: dict(actor._replica_impl._user_callable_wrapper._callable._data_plane.leases_by_owner)
owners = {name: ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(held)) for name in names}
ingresses = {a.actor_id: a.state for a in list_actors(filters=[("class_name", "=", "ServeReplica:llm_app:OpenAiIngress")], limit=1000)}
print(json.dumps({"leases by owner": owners, "ingress actors": ingresses}))
"""


_REPLICA_PIDS = """
import json, os, ray
ray.init(address="auto", namespace="serve", log_to_driver=False)
names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::")]
print(json.dumps({name: ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda _: os.getpid())) for name in names}))
"""


def replica_process(root_pid: int, replica: str) -> Optional[psutil.Process]:
    """The process of model replica ``replica`` (as x-llmserve-replica names it: "LLMServer:tiny#id"),
    by the pid its actor (SERVE_REPLICA::<app>#<deployment>#<id>) reports."""
    return replica_processes(root_pid).get(replica)


def replica_processes(root_pid: int) -> dict[str, psutil.Process]:
    """Each replica's process, by the replica's name (as x-llmserve-replica names it)."""
    pids = {pid: name.split("#", 1)[1] for name, pid in _ray_json(_REPLICA_PIDS).items()}
    return {pids[p.pid]: p for p in processes(root_pid, "ray::ServeReplica:") if p.pid in pids}


def engine_core_of(replica: psutil.Process) -> psutil.Process:
    """The vLLM engine core process a model replica started."""
    cores = [p for p in replica.children(recursive=True) if _titled(p, "VLLM::EngineCore")]
    assert len(cores) == 1, cores
    return cores[0]


def live_replicas() -> set[str]:
    """The names of the app's model replicas now (as answers name them in x-llmserve-replica)."""
    return {name.split("#", 1)[1] for name in ongoing_requests()}


def ongoing_requests() -> dict[str, int]:
    """What Serve counts as ongoing on each model replica of the running app (its leases)."""
    return _ray_json(_ONGOING)


_SERVE_REPLICAS = """
import json, sys, ray
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
ray.init(address="auto", namespace="serve", log_to_driver=False)
controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
application = ray.get(controller.get_serve_instance_details.remote()).get("applications", {}).get(sys.argv[1], {})
deployment = application.get("deployments", {}).get(sys.argv[2], {})
print(json.dumps({r["replica_id"]: getattr(r["state"], "value", r["state"]) for r in deployment.get("replicas", [])}))
"""


def running_replicas(app_name: str, deployment: str) -> set[str]:
    """The ids of the deployment's replicas in Serve's RUNNING state, as its controller says
    (under `serve run`, which prints no status lines of ours)."""
    return {replica for replica, state in _ray_json(_SERVE_REPLICAS, app_name, deployment).items() if state == "RUNNING"}


def replicas_replaced(app_name: str, deployment: str, count: int) -> Callable[[], bool]:
    """Whether ``count`` replicas run again, not all of them those running now (before a fault)."""
    before = running_replicas(app_name, deployment)

    def back() -> bool:
        time.sleep(2)  # (each look starts a Ray driver: a replica starting meanwhile gets the cores)
        now = running_replicas(app_name, deployment)
        return len(now) == count and now != before

    return back


def lease_owners() -> dict:
    """Each model replica's open leases by the ingress actor holding them, and each ingress
    actor's state (ALIVE, DEAD)."""
    return _ray_json(_LEASE_OWNERS)


def _ray_json(script: str, *args: str) -> dict:
    """What ``script``, run as a driver of the app's Ray cluster, prints as JSON on its last line."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def kill(process: psutil.Process) -> None:
    process.send_signal(signal.SIGKILL)


@dataclass(frozen=True)
class Expected:
    """One kind of stream under fault, and its answer without one."""

    body: dict
    text: str
    usage: Optional[dict]


def expected(base_url: str, body: dict) -> Expected:
    """The stream's answer without a fault."""
    seen: dict = {}
    outcome, text = stream(base_url, body, seen)
    assert outcome == "completed", text
    return Expected(body, text, seen.get("usage"))


def under_fault(
    fault: str,
    base_url: str,
    kinds: list[Expected],
    inject: Callable[[list[str]], None],
    recovered: Callable[[], bool],
    probe: Expected,
    streams: int = 16,
    recovery_timeout_s: float = 300.0,
) -> Tally:
    """Kill something while ``streams`` streams (of ``kinds``, in turn) run and ``probe``
    requests keep coming; each stream must end with its kind's text and usage, under one id.
    ``inject`` gets the replicas the streams began on (one name per stream)."""
    tally = Tally(fault)
    lock = threading.Lock()
    killed_at: list[float] = []
    stop_probing = threading.Event()

    def judge(outcome: str, text: str, want: str, kind: str) -> None:
        if outcome == "completed" and text != want:
            outcome, text = "broken", f"{kind}: wrong text {text[:80]!r}"
        with lock:
            tally.add(outcome, f"{kind}: {text}")

    completed_on: list[str] = []

    began_on: list[str] = []

    def one_stream(index):
        kind = kinds[index % len(kinds)]
        seen: dict = {}
        outcome, text = stream(base_url, kind.body, seen, began_on)
        if outcome == "completed" and text == kind.text and (seen.get("usage") != kind.usage or len(seen["ids"]) != 1):
            outcome, text = "broken", f"usage {seen.get('usage')} (not {kind.usage}) or ids {seen['ids']}"
        judge(outcome, text, kind.text, "stream")
        if outcome == "completed" and text == kind.text and killed_at and time.monotonic() > killed_at[0]:
            with lock:
                completed_on.append(seen["replica"])  # (only those still running at the kill can migrate)
        if outcome == "completed" and text == kind.text:
            with lock:
                tally.streams_completed += 1

    def probing():
        while not stop_probing.is_set():
            sent_after_kill = bool(killed_at)
            outcome, text = whole(base_url, probe.body)
            if sent_after_kill and outcome == "completed" and tally.service_back_s is None:
                tally.service_back_s = time.monotonic() - killed_at[0]
            judge(outcome, text, probe.text, "request")
            time.sleep(0.25)

    with ThreadPoolExecutor(streams + 1) as pool:
        running = [pool.submit(one_stream, i) for i in range(streams)]
        prober = pool.submit(probing)
        deadline = time.monotonic() + 10
        while len(began_on) < streams and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # every stream is under way, none near its end
        killed_at.append(time.monotonic())
        try:
            inject(list(began_on))
            for future in running:
                future.result()
            deadline = killed_at[0] + recovery_timeout_s
            while time.monotonic() < deadline and not recovered():
                time.sleep(0.5)
            if recovered():
                tally.recovered_s = time.monotonic() - killed_at[0]
            while tally.service_back_s is None and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            stop_probing.set()  # (also when the injection failed: the pool waits for the prober)
        prober.result()
    if tally.recovered_s is not None:
        alive = live_replicas()
        tally.migrated = sum(1 for replica in completed_on if replica not in alive)
    return tally


def status_line_after(log_path: Path, offset: int, pattern: str) -> Callable[[], bool]:
    """Whether `llmserve run` printed a status line matching ``pattern`` past ``offset``."""
    compiled = re.compile(pattern)

    def seen() -> bool:
        return bool(compiled.search(Path(log_path).read_text()[offset:]))

    return seen
