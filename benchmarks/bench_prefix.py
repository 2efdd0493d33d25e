"""Placement policies on a shared-prefix workload, in one run: prefix affinity, Serve's power of two, round robin.

Each arm serves SmolLM2-135M-Instruct under `llmserve run` on two replicas whose KV
caches each hold about half of the workload's prefixes, with the placement policy set
in the model's `request_router_config.request_router_kwargs.policy`, then runs two
workloads with `vllm bench serve` at a fixed request rate:

- shared: vLLM's prefix_repetition dataset, 16 prefixes of 1,000 random tokens, each
  followed by a 32-token question, 16 output tokens (the same prompts in every arm: same seed);
- unshared: the random dataset, 1,032-token prompts with nothing in common, to show a
  workload without shared prefixes does not get slower.

Printed per arm and workload: TTFT mean and P90 (and their ratio to the power-of-two
arm's), output tokens/s, and the engines' own prefix-cache hit rate (vLLM's
prefix_cache_hits / prefix_cache_queries, read from llmserve's /metrics before and after).
The TTFT of every request of the shared workload, in the order sent, is drawn per policy
into benchmarks/results/bench-prefix-*/ttft.png.

On a 2-core machine both replicas share the same cores: a request's prefill competes
with the other replica's, so what placement saves is compute, not just waiting.

Usage: python benchmarks/bench_prefix.py [--rate 1.0] [--prompts 96] [--arms prefix,power_of_two]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e import scrape  # noqa: E402
from tests.e2e.conftest import BIN, free_port, start, stop, wait_for_line  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
MODEL_ID = "smollm2"
VLLM_CLI = [sys.executable, str(REPO / "benchmarks" / "vllm_cli.py")]
PREFIXES, PREFIX_TOKENS, QUESTION_TOKENS, OUTPUT_TOKENS = 16, 1000, 32, 16
# SmolLM2-135M keeps 23,040 bytes of KV per token (30 layers x 3 KV heads x 64 x 2 x bf16):
# 200 MB holds ~8,700 tokens, about half of the 16 prefixes.
KV_CACHE_BYTES = 200 * 1000**2
ARMS = ("prefix", "power_of_two", "round_robin")
HITS, QUERIES = "ray_vllm_prefix_cache_hits_total", "ray_vllm_prefix_cache_queries_total"


def start_app(policy: str, folder: Path) -> tuple[str, subprocess.Popen, object]:
    model = {
        "model_loading_config": {"model_id": MODEL_ID, "model_source": str(MODEL_DIR)},
        "engine_kwargs": {"max_model_len": 2048, "kv_cache_memory_bytes": KV_CACHE_BYTES, "enable_prefix_caching": True},
        "deployment_config": {"num_replicas": 2, "request_router_config": {"request_router_kwargs": {"policy": policy}}},
    }
    config = {"applications": [{"name": "llmserve", "route_prefix": "/", "import_path": "llmserve:build_openai_app", "args": {"llm_configs": [model]}}]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    process, log = start([str(BIN / "llmserve"), "run", "config.yaml", "--host", "127.0.0.1", "--port", str(port)], folder, folder / "run.log")
    wait_for_line(folder / "run.log", "ready in", process, timeout=900)
    return f"http://127.0.0.1:{port}", process, log


def warm(url: str) -> None:
    """Short prompts at once: Serve places their leases, so the ingress knows both replicas."""
    import requests
    from concurrent.futures import ThreadPoolExecutor

    def ask(_):
        return requests.post(url + "/v1/completions", json={"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4}, timeout=120).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(ask, range(16)))
    assert codes == [200] * 16, codes


def run_workload(url: str, workload: str, rate: float, prompts: int, result: Path, log) -> dict:
    if workload == "shared":
        dataset = [
            "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(PREFIX_TOKENS),
            "--prefix-repetition-suffix-len", str(QUESTION_TOKENS), "--prefix-repetition-num-prefixes", str(PREFIXES),
            "--prefix-repetition-output-len", str(OUTPUT_TOKENS),
        ]  # fmt: skip
    else:
        dataset = ["--dataset-name", "random", "--random-input-len", str(PREFIX_TOKENS + QUESTION_TOKENS), "--random-output-len", str(OUTPUT_TOKENS)]
    command = VLLM_CLI + [
        "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", MODEL_ID, "--tokenizer", str(MODEL_DIR),
        *dataset, "--num-prompts", str(prompts), "--request-rate", str(rate), "--ignore-eos", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,90,99",
        "--save-result", "--save-detailed", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]  # fmt: skip
    before = scrape.scrape(url)
    subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    # Replicas push their metrics every few seconds: wait until the engines' counters moved.
    after = scrape.wait_until(url, lambda samples: scrape.total(samples, QUERIES) > scrape.total(before, QUERIES), timeout_s=60)
    time.sleep(12)  # (and then one more export, so the last requests are in)
    after = scrape.scrape(url)
    summary = json.loads(result.read_text())
    queries = scrape.total(after, QUERIES) - scrape.total(before, QUERIES)
    hits = scrape.total(after, HITS) - scrape.total(before, HITS)
    summary["prefix_cache_hit_rate"] = hits / queries if queries else float("nan")
    return summary


def print_table(results: dict[str, dict[str, dict]]) -> None:
    print("\n| workload | policy | TTFT mean (s) | TTFT P90 (s) | mean / power_of_two | P90 / power_of_two | output tok/s | requests/s | prefix cache hits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in ("shared", "unshared"):
        base = results.get("power_of_two", {}).get(workload)
        for policy, by_workload in results.items():
            row = by_workload.get(workload)
            if row is None:
                continue
            mean, p90 = row["mean_ttft_ms"] / 1000, row["p90_ttft_ms"] / 1000
            ratio_mean = f"{row['mean_ttft_ms'] / base['mean_ttft_ms']:.2f}x" if base else "-"
            ratio_p90 = f"{row['p90_ttft_ms'] / base['p90_ttft_ms']:.2f}x" if base else "-"
            print(
                f"| {workload} | {policy} | {mean:.3f} | {p90:.3f} | {ratio_mean} | {ratio_p90} | {row['output_throughput']:.1f} "
                f"| {row['request_throughput']:.2f} | {row['prefix_cache_hit_rate']:.0%} |"
            )


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.5))
    for policy, by_workload in results.items():
        ttfts = by_workload.get("shared", {}).get("ttfts")
        if ttfts:
            axis.plot(range(len(ttfts)), ttfts, marker=".", linewidth=0.8, label=policy)
    axis.set_xlabel("request (in the order sent, same prompts for every policy)")
    axis.set_ylabel("TTFT (s)")
    axis.set_title(f"{PREFIXES} shared {PREFIX_TOKENS}-token prefixes, two replicas, each cache ~half of them")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second of the shared workload")
    parser.add_argument("--prompts", type=int, default=96, help="requests of the shared workload")
    parser.add_argument("--unshared-rate", type=float, default=0.5)
    parser.add_argument("--unshared-prompts", type=int, default=32, help="requests of the unshared workload (0: none)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated policies, of {ARMS}")
    args = parser.parse_args()
    if not MODEL_DIR.exists():
        subprocess.run([sys.executable, "-m", "llmserve.example_models", str(REPO / "models")], check=True)
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="bench-prefix-", dir=REPO / "benchmarks" / "results"))
    results: dict[str, dict[str, dict]] = {}
    for policy in args.arms.split(","):
        folder = out / policy
        folder.mkdir()
        url, process, log = start_app(policy, folder)
        try:
            warm(url)
            with open(folder / "bench.log", "w") as bench_log:
                results[policy] = {"shared": run_workload(url, "shared", args.rate, args.prompts, folder / "shared.json", bench_log)}
                if args.unshared_prompts:
                    results[policy]["unshared"] = run_workload(url, "unshared", args.unshared_rate, args.unshared_prompts, folder / "unshared.json", bench_log)
        finally:
            stop(process)
            log.close()
        print_table({policy: results[policy]})
    print_table(results)
    plot(results, out / "ttft.png")
    print(f"\nresults and plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
