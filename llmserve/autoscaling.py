"""Autoscaling for LLM replicas: defaults that fit them, and a policy that reads the engines.

Serve's defaults are made for small requests: a replica is full at 2 requests in
flight, a replica is added after 30 s of wanting one and removed after 600 s. An
LLM replica batches dozens of requests at once and takes a minute or more to
start. Where a model autoscales (``autoscaling_config`` given, or
``num_replicas: auto``), every field it leaves out gets ``LLM_DEFAULTS``:

- ``target_ongoing_requests``: a quarter of ``max_ongoing_requests`` (64 with the default 256);
- ``upscale_delay_s`` 15: start the next replica sooner, its start-up is long;
- ``downscale_delay_s`` 300: keep a replica through a lull rather than start it again;
- with ``num_replicas: auto``, ``min_replicas`` 1 and ``max_replicas`` 100 (Serve's).

``TtftPolicy`` (opt in with ``autoscaling_config.policy``) scales on what clients
feel and what the engines report, not only on requests in flight: each model
replica reports its p90 time to first token over the last 15 s, and its engine's
waiting requests and KV-cache use (``LLMServer.record_autoscaling_stats``).

- p90 TTFT above ``ttft_target_s`` on a replica, requests waiting in an engine, or a
  KV cache over ``kv_cache_high`` → one replica more (or as many as the TTFT excess asks);
- p90 TTFT under half the target (or no first token at all lately) → as many replicas
  as requests in flight need at ``target_ongoing_requests``, which lets it scale down;
- in between, as many as now.

Serve applies the delays, bounds and scaling factors of ``autoscaling_config`` around it.

Example::

    deployment_config:
      autoscaling_config:
        min_replicas: 1
        max_replicas: 4
        policy:
          policy_function: llmserve.autoscaling:TtftPolicy
          policy_kwargs: {ttft_target_s: 0.5}
"""

from __future__ import annotations

import math
from typing import Any, Optional

AUTO_MIN_REPLICAS, AUTO_MAX_REPLICAS = 1, 100
UPSCALE_DELAY_S = 15.0
DOWNSCALE_DELAY_S = 300.0
# The window each replica's TTFT quantile covers.
TTFT_WINDOW_S = 15.0
# What each model replica reports to the policy (LLMServer.record_autoscaling_stats).
TTFT_P90 = "ttft_p90_s"
ENGINE_WAITING = "engine_waiting"
KV_CACHE_USAGE = "kv_cache_usage"


def llm_autoscaling_config(given: Optional[dict[str, Any]], max_ongoing_requests: int, auto: bool) -> dict[str, Any]:
    """``given`` (a model's ``autoscaling_config``) with LLM defaults for what it leaves out."""
    config = dict(given or {})
    config.setdefault("target_ongoing_requests", max(1, max_ongoing_requests // 4))
    config.setdefault("upscale_delay_s", UPSCALE_DELAY_S)
    config.setdefault("downscale_delay_s", DOWNSCALE_DELAY_S)
    if auto:
        config.setdefault("min_replicas", AUTO_MIN_REPLICAS)
        config.setdefault("max_replicas", AUTO_MAX_REPLICAS)
    return config


class TtftPolicy:
    """Serve autoscaling policy on time to first token and engine load (see the module's docstring)."""

    def __init__(self, ttft_target_s: float = 1.0, kv_cache_high: float = 0.9):
        if ttft_target_s <= 0 or not 0 < kv_cache_high <= 1:
            raise ValueError("TtftPolicy needs ttft_target_s > 0 and 0 < kv_cache_high <= 1")
        self.ttft_target_s = ttft_target_s
        self.kv_cache_high = kv_cache_high

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        current = ctx.current_num_replicas
        if current == 0:
            return ctx.target_num_replicas, {}  # (Serve's wrapper starts one on the first request)
        reported = ctx.aggregated_metrics or {}
        worst_ttft = max(reported.get(TTFT_P90, {}).values(), default=0.0)
        waiting = sum(reported.get(ENGINE_WAITING, {}).values())
        kv_cache = max(reported.get(KV_CACHE_USAGE, {}).values(), default=0.0)
        return self.desired(current, worst_ttft, waiting, kv_cache, ctx.total_num_requests, ctx.config.get_target_ongoing_requests()), {}

    def desired(self, current: int, worst_ttft: float, waiting: float, kv_cache: float, in_flight: float, target_ongoing: float) -> float:
        """Replicas wanted, from the slowest replica's p90 TTFT (0 when none), the engines' waiting
        requests, the fullest KV cache, and Serve's requests in flight."""
        if worst_ttft > self.ttft_target_s or waiting >= 1 or kv_cache >= self.kv_cache_high:
            return max(current + 1, math.ceil(current * worst_ttft / self.ttft_target_s))
        if worst_ttft < self.ttft_target_s / 2:
            return min(current, max(1.0, in_flight / target_ongoing))
        return current
