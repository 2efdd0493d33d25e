"""TtftPolicy's decisions from what replicas report, and the figures a replica reports (fake engine)."""

import asyncio
import collections
from types import SimpleNamespace

import pytest

from llmserve import autoscaling, metrics
from llmserve.autoscaling import TtftPolicy


def context(current, in_flight=0, target_ongoing=64, **reported):
    config = SimpleNamespace(get_target_ongoing_requests=lambda: target_ongoing)
    return SimpleNamespace(current_num_replicas=current, target_num_replicas=current, total_num_requests=in_flight,
                           aggregated_metrics=reported, config=config)  # fmt: skip


@pytest.mark.parametrize(
    "current, in_flight, reported, wanted",
    [
        (1, 8, {"ttft_p90_s": {"r1": 1.5}}, 2),  # slow first tokens: one more
        (2, 8, {"ttft_p90_s": {"r1": 0.2, "r2": 3.1}}, 7),  # the slowest replica sets how many: ceil(2 * 3.1)
        (1, 2, {"ttft_p90_s": {"r1": 0.1}, "engine_waiting": {"r1": 3.0}}, 2),  # the engine queues: one more
        (1, 2, {"kv_cache_usage": {"r1": 0.95}}, 2),  # its cache is full: one more
        (2, 8, {"ttft_p90_s": {"r1": 0.7, "r2": 0.6}}, 2),  # between half the target and the target: hold
        (3, 8, {"ttft_p90_s": {"r1": 0.1}}, 1),  # fast and light: what the requests in flight need
        (2, 0, {}, 1),  # idle (no first token lately): down to one
        (2, 200, {"ttft_p90_s": {"r1": 0.1}}, 2),  # fast but busy: no more than now, on TTFT alone
    ],
)
def test_decisions(current, in_flight, reported, wanted):
    desired, state = TtftPolicy(ttft_target_s=1.0)(context(current, in_flight, **reported))
    assert (desired, state) == (wanted, {})


def test_nonsense_settings_are_refused():
    with pytest.raises(ValueError, match="ttft_target_s"):
        TtftPolicy(ttft_target_s=0)


def test_a_replica_reports_its_recent_ttft_and_engine_load(monkeypatch):
    from llmserve.server import LLMServer
    from llmserve.testing import FakeEngine

    now = __import__("time").time()
    monkeypatch.setattr(metrics, "_recent_ttfts", collections.deque())  # (other tests' streams wrote theirs)
    metrics._recent_ttfts.extend([(now - 100, 9.0)] + [(now, value) for value in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)])
    server = asyncio.run(LLMServer.create({"model_loading_config": {"model_id": "scaled"}}, engine_cls=FakeEngine))
    reported = asyncio.run(server.record_autoscaling_stats())
    assert reported == {autoscaling.TTFT_P90: 1.0, autoscaling.ENGINE_WAITING: 0.0, autoscaling.KV_CACHE_USAGE: 0.0}  # the old 9 s is out of the window
