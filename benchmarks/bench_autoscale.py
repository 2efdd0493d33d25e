"""Autoscaling policies on one burst, in one run: Serve's stock settings, llmserve's defaults, TtftPolicy.

Each arm serves the tiny model under `llmserve run` with min 1 / max 2 replicas and the
same upscale delay (5 s), then takes the same burst: 8 clients streaming chats back to
back for --burst-s seconds. Printed per arm: when the second replica first answered
(seconds into the burst; "never" when it did not within the burst), and TTFT p50/p90
over the burst, with p90's ratio to Serve's stock arm, measured in the same run.

- serve-stock: Serve's default policy at Serve's own target, 2 requests per replica;
- llm-defaults: Serve's default policy at llmserve's target (max_ongoing_requests / 4 = 64);
- ttft-policy: llmserve.autoscaling:TtftPolicy with ttft_target_s (--ttft-target-s);
- ttft-tight: the same with a quarter of that target, one the machine cannot meet.

On a 2-core machine both replicas share the same cores, so a second replica adds no
compute: read the TTFT columns as what the policy's choice cost, not as a speed-up.

Usage: python benchmarks/bench_autoscale.py [--burst-s 120] [--ttft-target-s 0.1] [--arms serve-stock,ttft-tight]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmserve.tiny_model import make_tiny_model  # noqa: E402
from tests.e2e.conftest import stop, wait_for_line  # noqa: E402
from tests.e2e.test_autoscaling import start_app, stream_once  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 8


def arms(ttft_target_s: float) -> dict[str, dict]:
    common = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 5, "downscale_delay_s": 600}
    policy = {"policy_function": "llmserve.autoscaling:TtftPolicy", "policy_kwargs": {"ttft_target_s": ttft_target_s}}
    return {
        "serve-stock": {**common, "target_ongoing_requests": 2},
        "llm-defaults": common,
        "ttft-policy": {**common, "policy": policy},
        # A target this machine cannot meet: the policy must add the replica.
        "ttft-tight": {**common, "policy": {**policy, "policy_kwargs": {"ttft_target_s": ttft_target_s / 4}}},
    }


def burst(url: str, seconds: float) -> list[tuple]:
    answers, started = [], time.monotonic()

    def client():
        while time.monotonic() - started < seconds:
            answers.append(stream_once(url, started))

    workers = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return answers


def run_arm(name: str, scaling: dict, model: str, burst_s: float) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-autoscale-{name}-"))
    url, process, log = start_app(workdir, {"tiny-a": model}, scaling)
    try:
        wait_for_line(workdir / "run.log", "ready in", process, timeout=900)
        for _ in range(3):
            stream_once(url, time.monotonic())  # warm up
        answers = burst(url, burst_s)
    finally:
        stop(process)
        log.close()
    first_replica = answers[0][2]
    second = [a[0] for a in answers if a[2] and a[2] != first_replica and a[3] == 200]
    ttfts = sorted(a[1] for a in answers if a[1] is not None)
    return {
        "second_at_s": min(second) if second else None,
        "p50": ttfts[len(ttfts) // 2], "p90": ttfts[int(len(ttfts) * 0.9)],
        "streams": len(answers), "failed": sum(1 for a in answers if a[3] != 200 or not a[4]),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst-s", type=float, default=120)
    parser.add_argument("--ttft-target-s", type=float, default=0.1)
    parser.add_argument("--arms", help="comma-separated arms to run (default: all); serve-stock is the ratio's base")
    args = parser.parse_args()
    model = str(make_tiny_model(REPO / "models" / "tiny-llama-seed0", seed=0))
    chosen = args.arms.split(",") if args.arms else list(arms(args.ttft_target_s))
    results = {name: run_arm(name, scaling, model, args.burst_s) for name, scaling in arms(args.ttft_target_s).items() if name in chosen}
    base = results["serve-stock"]["p90"] if "serve-stock" in results else float("nan")
    print(f"\n{CLIENTS} streaming clients for {args.burst_s:.0f}s; min 1 / max 2 replicas, upscale_delay_s 5")
    print(f"{'arm':<14}{'2nd replica at':>16}{'TTFT p50':>10}{'TTFT p90':>10}{'p90 / stock':>13}{'streams':>9}{'failed':>8}")
    for name, r in results.items():
        second = f"{r['second_at_s']:.0f} s" if r["second_at_s"] is not None else "never"
        ratio = f"{r['p90'] / base:.2f}x" if base == base else "-"  # (NaN: no stock arm in this run)
        print(f"{name:<14}{second:>16}{r['p50']:>9.3f}s{r['p90']:>9.3f}s{ratio:>13}{r['streams']:>9}{r['failed']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
