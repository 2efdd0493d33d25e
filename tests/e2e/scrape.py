"""Reading an app's /metrics as Prometheus does (the prometheus_client parser)."""

from __future__ import annotations

import time
from typing import Callable

import requests
from prometheus_client.parser import text_string_to_metric_families

# Ray's export interval is 10 s: a value recorded now shows within two of them.
SHOWS_WITHIN_S = 45.0
EXPORT_INTERVAL_S = 10.0


def scrape(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of /metrics: (name, labels, value)."""
    response = requests.get(base_url + "/metrics", timeout=30)
    assert response.status_code == 200, response.text[:500]
    return [(sample.name, sample.labels, sample.value) for family in text_string_to_metric_families(response.text) for sample in family.samples]


def total(samples: list, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that have ``labels`` (over processes, nodes and other labels)."""
    return sum(value for sample_name, sample_labels, value in samples if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()))


def families(samples: list) -> set[str]:
    return {name for name, _, _ in samples}


def wait_until(base_url: str, holds: Callable[[list], bool], timeout_s: float = SHOWS_WITHIN_S) -> list:
    """Scrape until ``holds`` (given the samples) or the time is up; the last samples."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(base_url)
        if holds(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(2)


def settled(base_url: str, series: tuple[str, ...] = ("ray_llmserve_",)) -> list:
    """The samples once what was recorded before now has all reached /metrics (two scrapes an
    export interval apart agree on the series whose names begin with ``series``): a baseline
    later deltas can trust, or the final count of what was sent."""
    last = _ours(scrape(base_url), series)
    for _ in range(6):
        time.sleep(EXPORT_INTERVAL_S + 1)
        samples = scrape(base_url)
        if _ours(samples, series) == last:
            return samples
        last = _ours(samples, series)
    raise AssertionError(f"the series {series} kept changing with no requests sent")


def _ours(samples: list, series: tuple[str, ...]) -> dict:
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples if name.startswith(series) and not name.endswith("_queued")}
