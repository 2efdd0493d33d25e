"""Bounded spin-waits in vLLM's engine processes, loaded by vLLM itself.

vLLM's engine core and its worker hand each step to each other through a
shared-memory queue. A reader that finds nothing there spins on
``sched_yield`` for up to a second after its last read, so an engine that is
generating keeps a core busy in the engine core (waiting for the worker's
step) besides the worker's own. On a machine with a core or two to spare that
buys a few microseconds a step; where the engine shares a small machine with
everything else, the spinning engine core shut every other task out of its
core: a kernel trace on our 2-core machine caught a client woken by its first
token waiting 213 ms to run, with kernel threads waiting alongside it, while
the engine core and the worker ran (docs/data-path.md, "The engine's
spin-waits").

This plugin bounds the spin: a reader still spins for the first
``LLMSERVE_ENGINE_SPIN_S`` seconds of a wait (1 ms by default on CPU, longer
than most hand-overs between steps), then naps ``NAP_S`` at a time, which gives
its core away for real. It only changes how a reader waits inside vLLM's busy
window; what it reads and when it falls back to vLLM's idle mode are vLLM's.

llmserve's engine sets the variable in its replica before vLLM starts its
processes, on CPU platforms only (``vllm_engine``); other vLLM processes of the
venv, such as a plain ``vllm serve``, leave it unset and are untouched.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

SPIN_ENV = "LLMSERVE_ENGINE_SPIN_S"
# Spin this long before the first nap: most hand-overs between the engine
# core and the worker within a step are shorter (measured, docs/data-path.md).
CPU_DEFAULT_SPIN_S = 0.001
# One nap; the kernel adds ~70-100 µs of timer latency on our VMs.
NAP_S = 0.0002

_nap = time.sleep  # a name tests can replace


def spin_budget_from_env() -> float:
    """The configured spin budget in seconds; ``inf`` (vLLM's own behaviour) when unset or invalid."""
    text = os.environ.get(SPIN_ENV, "").strip()
    if not text:
        return math.inf
    try:
        budget = float(text)
    except ValueError:
        logger.warning("llmserve: ignoring %s=%r (not a number of seconds)", SPIN_ENV, text)
        return math.inf
    return budget if budget >= 0 else math.inf


def apply(spin_budget_s: float, nap_s: float = NAP_S) -> bool:
    """Bound the spin of vLLM's shared-memory queue readers; True when patched."""
    if math.isinf(spin_budget_s):
        return False
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    if getattr(SpinCondition.wait, "llmserve_bounded", False):
        return False
    if not all(hasattr(SpinCondition, name) for name in ("wait", "record_read")):
        logger.warning("llmserve: vLLM's SpinCondition changed shape; its spin-waits are left as they are")
        return False
    original_wait, original_record_read = SpinCondition.wait, SpinCondition.record_read

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        now = time.monotonic()
        began = self.__dict__.get("_llmserve_wait_began")
        if began is None:
            self._llmserve_wait_began = began = now
        # vLLM spins (sched_yield) inside this window; past the budget we nap instead.
        if now <= self.last_read + self.busy_loop_s and now - began > spin_budget_s:
            _nap(nap_s)
            return
        original_wait(self, timeout_ms)

    def record_read(self: Any) -> None:
        self._llmserve_wait_began = None
        original_record_read(self)

    wait.llmserve_bounded = True  # type: ignore[attr-defined]
    SpinCondition.wait = wait
    SpinCondition.record_read = record_read
    return True


def register() -> None:
    """vLLM's plugin hook: bound the spin-waits when llmserve's engine asked for it."""
    try:
        budget = spin_budget_from_env()
        if apply(budget):
            logger.info("llmserve: engine queue readers spin %.1f ms, then nap %.1f ms at a time", budget * 1e3, NAP_S * 1e3)
    except Exception:  # a plugin must never stop the engine from starting
        logger.exception("llmserve: could not bound vLLM's spin-waits")
