"""Faults that lose nothing that can be saved, on the paths users run, real engine:
`llmserve run` and Ray's `serve run config.yaml` (where the ingress takes Serve's port,
serve_port.py, and Serve's proxy gets the connections while no ingress replica runs).

Each command serves a tiny model on two replicas, its LoRA adapters on a
local moto S3. Each test kills one process with SIGKILL while 16 streams run
and short requests keep coming (``chaos.under_fault``), then waits until the
app is whole again. `make chaos` runs this module and prints the table.

When a model replica or its engine dies, its streams go on at the other
replica (``llmserve/migration.py``): every stream completes with the text of
a run without the fault (greedy decoding), and the table counts as migrated
those begun by the replica that died.
"""

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import requests
import yaml

from llmserve.relay import LEASE_LINGER_S
from llmserve.tiny_model import make_tiny_adapter
from tests.conftest import TEST_ENGINE_KWARGS
from tests.e2e import chaos, scrape
from tests.e2e.conftest import FRONTS, free_port, local_s3, serving, wait_for_http, wait_for_line

MODEL = "tiny"
DEPLOYMENT = f"LLMServer:{MODEL}"
STREAM = {
    "model": MODEL, "prompt": "Once upon a time", "max_tokens": 160, "min_tokens": 160, "temperature": 0,
    "stream_options": {"include_usage": True},
}  # fmt: skip
# A chat stream too: continued as completions of its prompt's token ids, shaped as chat chunks.
# (Its prompt is one whose greedy text the tiny model keeps under any batching.)
CHAT_STREAM = {
    "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 120, "min_tokens": 120,
    "temperature": 0, "stream_options": {"include_usage": True},
}  # fmt: skip
PROBE = {"model": MODEL, "prompt": "The weather", "max_tokens": 8, "temperature": 0}
# vLLM runs float32 models in bfloat16 on x86 CPUs, where a random model's greedy choice flips
# on rounding: a continuation's prefill rounds otherwise than the decode steps it replaces (and
# so does another batch). In float32 a stream continued at any token keeps its text.
# Room for the prefix-affinity test's system prompts of ~600 tokens.
ENGINE_KWARGS = {**TEST_ENGINE_KWARGS, "dtype": "float32", "max_model_len": 1024}
# Streams and probes the app must never leave hanging, whatever is killed.
TALLIES: list[chaos.Tally] = []
# A replica must be back within its start time plus this (Serve sees a dead process at once).
# It restarts under the test's load, which the first start had not: on two cores that took
# up to 1.3x as long (49 s against a 39 s start, serve run front).
RECOVERY_SLACK_S = 10.0
RESTART_UNDER_LOAD = 1.5


def back_in_time(tally: chaos.Tally, app: dict) -> bool:
    return tally.recovered_s is not None and tally.recovered_s <= app["start_s"] * RESTART_UNDER_LOAD + RECOVERY_SLACK_S


PADDING_BYTES = 192 * 1024 * 1024  # makes the "big" adapter's download last long enough to be killed in


@pytest.fixture(scope="module")
def s3(tiny_model_paths, tmp_path_factory):
    """Adapters "small" and "big" (the same weights; big carries a large extra file) and
    "other" (other weights) on moto."""
    folder = tmp_path_factory.mktemp("fault-adapters")
    adapter = make_tiny_adapter(tiny_model_paths["tiny-a"], folder / "small", seed=11)
    other = make_tiny_adapter(tiny_model_paths["tiny-a"], folder / "other", seed=12)
    with local_s3() as (credentials, client):
        client.create_bucket(Bucket="adapters")
        for file in adapter.iterdir():
            for name in ("small", "big"):
                client.upload_file(str(file), "adapters", f"{MODEL}/{name}/{file.name}")
        for file in other.iterdir():
            client.upload_file(str(file), "adapters", f"{MODEL}/other/{file.name}")
        client.put_object(Bucket="adapters", Key=f"{MODEL}/big/padding.bin", Body=b"\0" * PADDING_BYTES)
        yield credentials


@pytest.fixture(scope="module", params=FRONTS)
def app(request, tiny_model_paths, s3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    cache = folder / "cache"
    port = free_port()
    model = {
        "model_loading_config": {"model_id": MODEL, "model_source": tiny_model_paths["tiny-a"]},
        "engine_kwargs": ENGINE_KWARGS,
        "deployment_config": {"num_replicas": 2},
        "lora_config": {"dynamic_lora_loading_path": f"s3://adapters/{MODEL}", "max_num_adapters_per_replica": 2},
        "runtime_env": {"env_vars": {**s3, "XDG_CACHE_HOME": str(cache)}},
    }
    application = {"name": "llm_app", "route_prefix": "/", "import_path": "llmserve:build_openai_app", "args": {"llm_configs": [model]}}
    (folder / "config.yaml").write_text(yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": port}, "applications": [application]}))
    log_path = folder / "run.log"
    TALLIES.clear()
    began = time.monotonic()
    base_url = f"http://127.0.0.1:{port}"
    with serving(request.param, folder, log_path) as process:
        if request.param == "llmserve run":
            output = wait_for_line(log_path, "ready in", process)
            started_s = float(re.search(r"ready in ([\d.]+)s", output).group(1))
        else:  # (Ray's CLI prints no status of ours: Serve's controller says when both replicas run)
            wait_for_http(base_url + "/v1/models", process=process, timeout=600)
            deadline = time.monotonic() + 300
            while len(chaos.running_replicas("llm_app", DEPLOYMENT)) < 2 and time.monotonic() < deadline:
                time.sleep(2)
            started_s = time.monotonic() - began  # (Ray's start included: a bound, not a measure)
        try:
            yield {"url": base_url, "pid": process.pid, "log": log_path, "start_s": started_s, "cache": cache, "front": request.param}
        finally:
            print(f"\nfaults under {request.param}:\n" + chaos.table(TALLIES))


def replicas_back(app) -> Callable[[], bool]:
    """Whether the model's two replicas run again after a fault that starts now: `llmserve
    run` prints it as a status line; under `serve run`, Serve's controller is asked."""
    if app["front"] == "llmserve run":
        return chaos.status_line_after(app["log"], len(Path(app["log"]).read_text()), rf"LLMServer:{MODEL}: healthy \(2 running\)")
    return chaos.replicas_replaced("llm_app", DEPLOYMENT, 2)


@pytest.fixture(scope="module")
def expected(app):
    """The answers without a fault."""
    return {
        "streams": [chaos.expected(app["url"], STREAM), chaos.expected(app["url"], CHAT_STREAM)],
        "probe": chaos.whole(app["url"], PROBE)[1],
        "small": chaos.whole(app["url"], {**PROBE, "model": f"{MODEL}:small"})[1],
        "other": chaos.whole(app["url"], {**PROBE, "model": f"{MODEL}:other"})[1],
    }


def test_mixed_concurrent_requests_for_the_base_and_its_adapters_each_get_their_own_text(app, expected):
    """LoRA batches on the default path: base and two adapters at once, over both replicas."""
    import openai
    from concurrent.futures import ThreadPoolExecutor

    wanted = {MODEL: expected["probe"], f"{MODEL}:small": expected["small"], f"{MODEL}:other": expected["other"]}
    assert len(set(wanted.values())) == 3, wanted  # each adapter changes the answer
    client = openai.OpenAI(base_url=app["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    models = list(wanted) * 8

    def ask(model):
        return client.completions.create(model=model, prompt=PROBE["prompt"], max_tokens=PROBE["max_tokens"], temperature=0).choices[0].text

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(ask, models))
    wrong = [(model, answer) for model, answer in zip(models, answers) if answer != wanted[model]]
    assert not wrong, f"{len(wrong)} of 24 answers were another model's: {wrong[:3]}"


def test_requests_that_share_a_long_prefix_run_on_one_replica_and_reuse_its_cache(app):
    """Prefix affinity on the default path (affinity.py): four system prompts of ~1,100
    characters, each asked five times with another question, run each on one replica, and
    the engines' own prefix cache finds most of their tokens. After the second round the
    ingress's open leases have ended, so later requests get their replica from Serve's
    router (LeaseRouter), asked for by name."""
    systems = [f"Team {n}. " + f"You are the assistant of team {n}; answer in one word, never more. " * 16 for n in range(4)]
    before = scrape.settled(app["url"])
    replicas = {n: set() for n in range(len(systems))}

    def ask(n, round_number):
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "system", "content": systems[n]}, {"role": "user", "content": f"Q{round_number}?"}]}
        answer = requests.post(app["url"] + "/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        return n, answer.headers["x-llmserve-replica"]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        # Short prompts have no affinity: Serve places their leases, so the ingress knows both replicas.
        list(pool.map(lambda _: chaos.whole(app["url"], PROBE), range(8)))
        for round_number in range(5):
            if round_number == 2:
                time.sleep(LEASE_LINGER_S + 0.5)
            # The four at once: new prefixes spread by load, known ones stay.
            for n, replica in pool.map(ask, range(len(systems)), [round_number] * len(systems)):
                replicas[n].add(replica)
    assert all(len(names) == 1 for names in replicas.values()), f"a prefix's requests ran on several replicas: {replicas}"
    assert len(set().union(*replicas.values())) == 2, f"the prefixes did not spread over both replicas: {replicas}"

    def delta(samples, name):
        return scrape.total(samples, name) - scrape.total(before, name)

    # (The engines' counters reach /metrics an export interval late: counted once they stop moving.)
    after = scrape.settled(app["url"], ("ray_vllm_prefix_cache_",))
    queries, hits = delta(after, "ray_vllm_prefix_cache_queries_total"), delta(after, "ray_vllm_prefix_cache_hits_total")
    print(f"\nprefix affinity: replicas per prefix {replicas}; engine prefix cache {hits:.0f} of {queries:.0f} prompt tokens hit")
    # 16 of the 20 requests repeat a prefix of four of their five or six 128-token blocks
    # (~65% of their tokens at most); spread by load alone, a quarter of those would land
    # where it was never computed (~50%).
    assert queries > 0 and hits / queries > 0.55, f"prefix cache hits {hits} of {queries} tokens"


def run_fault(app, expected, fault, title, model_replicas=False, kinds=None):
    """Kill a process titled ``title`` under load (streams of ``kinds``, or the expected ones):
    for a model replica or its engine core, that of the replica most streams began on. The
    tally, once both ``model_replicas`` run again (else: once another process of that title
    runs and the app answers /health)."""
    killed = []

    def victim(began_on):
        candidates = chaos.processes(app["pid"], title)
        busiest = Counter(name for name in began_on if name).most_common(1)
        if busiest and "OpenAiIngress" not in title:  # a model replica or its engine core
            replica = chaos.replica_process(app["pid"], busiest[0][0])
            assert replica is not None, f"no process for replica {busiest[0][0]}"
            candidates = [p for p in candidates if p.pid == replica.pid or p in replica.children(recursive=True)]
        killed.append(candidates[0])
        chaos.kill(candidates[0])

    def replaced() -> bool:
        if not [p for p in chaos.processes(app["pid"], title) if p.pid != killed[0].pid]:
            return False
        try:
            return requests.get(app["url"] + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    tally = chaos.under_fault(
        fault,
        app["url"],
        kinds or expected["streams"],
        inject=victim,
        recovered=replicas_back(app) if model_replicas else replaced,
        probe=chaos.Expected(PROBE, expected["probe"], None),
    )
    TALLIES.append(tally)
    print(f"\n{fault}: {tally.counts}, migrated {tally.migrated}, service back {tally.service_back_s}, recovered {tally.recovered_s}, {tally.details[:5]}")
    return tally


def test_engine_core_killed(app, expected):
    tally = run_fault(app, expected, "engine core", "VLLM::EngineCore", model_replicas=True)
    assert tally.counts["hung"] == 0 and tally.counts["broken"] == 0, tally.details
    # Every stream completes with its whole text, those of the dead engine's replica at the other one.
    assert tally.streams_completed == 16, (tally.counts, tally.details)
    assert tally.migrated >= 1, "no stream was on the replica whose engine died"
    assert tally.service_back_s is not None and tally.service_back_s < 5
    assert back_in_time(tally, app), (tally.recovered_s, app["start_s"])


def test_model_replica_killed(app, expected):
    tally = run_fault(app, expected, "model replica", f"ray::ServeReplica:llm_app:{DEPLOYMENT}", model_replicas=True)
    assert tally.counts["hung"] == 0 and tally.counts["broken"] == 0, tally.details
    assert tally.streams_completed == 16, (tally.counts, tally.details)
    assert tally.migrated >= 1, "no stream was on the killed replica"
    assert tally.service_back_s is not None and tally.service_back_s < 5
    assert back_in_time(tally, app), (tally.recovered_s, app["start_s"])


def test_a_stream_that_cannot_move_ends_with_one_error_event_when_its_engine_dies(app):
    """A stream with logprobs cannot be continued elsewhere (its logprobs would be another
    engine's): when its engine dies, the client gets one error event with the request id,
    then [DONE], at once; meanwhile the other replica serves new requests."""
    recovered = replicas_back(app)
    engines = {name: chaos.engine_core_of(replica) for name, replica in chaos.replica_processes(app["pid"]).items() if "LLMServer" in name}
    assert len(engines) == 2, engines
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "min_tokens": 480, "temperature": 0, "logprobs": 1, "stream": True}
    with requests.post(app["url"] + "/v1/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        request_id = response.headers["x-request-id"]
        killed_at = time.monotonic()
        chaos.kill(engines[response.headers["x-llmserve-replica"]])
        events = [line for line in response.iter_lines() if line.startswith(b"data: ")]
        ended_s = time.monotonic() - killed_at
    errors = [json.loads(event[len(b"data: ") :])["error"] for event in events if event.startswith(b'data: {"error"')]
    assert len(errors) == 1, events[-3:]
    assert events[-2].startswith(b'data: {"error"') and events[-1] == b"data: [DONE]", events[-3:]
    assert errors[0]["type"] and errors[0]["message"], errors[0]
    assert request_id in errors[0]["message"], (request_id, errors[0])
    assert ended_s < 10, ended_s
    # The other replica serves while this one is replaced.
    assert chaos.whole(app["url"], PROBE)[0] == "completed"
    deadline = time.monotonic() + app["start_s"] + 60
    while not recovered() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert recovered()


def test_ingress_killed(app, expected):
    # (Serve may replace it between two of `llmserve run`'s status polls: no status line then.)
    tally = run_fault(app, expected, "ingress", "ray::ServeReplica:llm_app:OpenAiIngress")
    assert tally.counts["hung"] == 0, tally.details
    # The replicas write the streams to their clients themselves: they outlive the ingress.
    streams_completed = tally.counts["completed"]
    assert streams_completed >= 16, tally.details
    # At most the one request the front door was reading when it died is cut.
    assert tally.counts["broken"] <= 1, tally.details
    assert tally.recovered_s is not None and tally.service_back_s is not None
    # The dead ingress's leases end (Ray would keep them open): Serve counts no phantom load.
    deadline = time.monotonic() + 30
    while sum(chaos.ongoing_requests().values()) and time.monotonic() < deadline:
        time.sleep(2)
    assert sum(chaos.ongoing_requests().values()) == 0, (chaos.ongoing_requests(), chaos.lease_owners())


def test_replica_killed_while_downloading_an_adapter(app, expected):
    """The download a killed replica left half done is never used; the request is served elsewhere."""
    cache = Path(app["cache"])
    recovered = replicas_back(app)
    asked = time.monotonic()
    result = {}

    def ask_big():
        result["answer"] = chaos.whole(app["url"], {**PROBE, "model": f"{MODEL}:big"})

    import threading

    asking = threading.Thread(target=ask_big)
    asking.start()
    partial = None
    while partial is None and time.monotonic() - asked < 60:
        partial = next(iter(cache.glob("llmserve/adapters/*/.partial+*")), None)  # (storage.FolderMirror's layout)
        time.sleep(0.05)
    assert partial is not None, "no download of the big adapter started"
    downloading = [p for p in chaos.processes(app["pid"], f"ray::ServeReplica:llm_app:LLMServer:{MODEL}") if _has_open_file_under(p, partial)]
    victim = downloading[0] if downloading else chaos.processes(app["pid"], f"ray::ServeReplica:llm_app:LLMServer:{MODEL}")[0]
    killed_at = time.monotonic()
    chaos.kill(victim)
    asking.join(timeout=chaos.CLIENT_TIMEOUT_S + 10)
    outcome, text = result["answer"]
    tally = chaos.Tally("during adapter download")
    tally.add("completed" if outcome == "completed" and text == expected["small"] else "broken" if outcome == "completed" else outcome, text)
    tally.service_back_s = time.monotonic() - killed_at if outcome == "completed" else None
    while not recovered() and time.monotonic() - killed_at < 300:
        time.sleep(0.5)
    tally.recovered_s = time.monotonic() - killed_at if recovered() else None
    TALLIES.append(tally)
    assert outcome == "completed" and text == expected["small"], (outcome, text)
    finished = next(path.parent for path in cache.glob("llmserve/adapters/*/current/padding.bin"))
    assert (finished / "padding.bin").stat().st_size == PADDING_BYTES
    assert json.loads((finished / "adapter_config.json").read_text())["r"] == 8
    assert tally.recovered_s is not None
    # The partial folder is gone once the next download of it starts; nothing else is left.
    assert not list(cache.glob("llmserve/adapters/*/.partial+*"))


def _has_open_file_under(process, folder) -> bool:
    try:
        return any(str(folder) in opened.path for opened in process.open_files())
    except Exception:
        return False


def test_the_app_serves_normally_after_every_fault(app, expected):
    assert chaos.whole(app["url"], PROBE) == ("completed", expected["probe"])
    for kind in expected["streams"]:
        assert chaos.stream(app["url"], kind.body) == ("completed", kind.text)
    assert requests.get(app["url"] + "/health", timeout=10).status_code == 200
    # What the counters say of the faults above, beside what the clients saw (docs/metrics.md:
    # the migrations counter was not seen to rise once; this line is where to look).
    samples = scrape.scrape(app["url"])
    print(
        f"\ncounters after the faults: migrations {scrape.total(samples, 'ray_llmserve_migrations_total')}, "
        f"retries {scrape.total(samples, 'ray_llmserve_retries_total')}; streams the clients saw migrate: {sum(t.migrated for t in TALLIES)}"
    )
