"""Adaptive coalescing: nothing lost or reordered, first event immediate, errors kept in place."""

import asyncio
import time

import pytest

from llmserve.coalesce import coalesced


async def ticking(events, gap=0.002, fail_after=None):
    for index, event in enumerate(events):
        if fail_after is not None and index == fail_after:
            raise RuntimeError("boom")
        yield event
        await asyncio.sleep(gap)


async def collect(source, window):
    return [item async for item in coalesced(source, window)]


def test_no_window_keeps_every_event_in_order():
    events = [f"e{index};" for index in range(20)]
    merged = asyncio.run(collect(ticking(events), lambda: 0.0))
    assert "".join(merged) == "".join(events)


def test_window_merges_events_and_keeps_order():
    events = [f"e{index};" for index in range(40)]
    merged = asyncio.run(collect(ticking(events, gap=0.001), lambda: 0.02))
    assert "".join(merged) == "".join(events)
    assert merged[0] == "e0;"  # the first event never waits
    assert len(merged) < len(events) / 3


def test_first_event_is_not_delayed():
    async def first_arrival():
        started = time.monotonic()
        async for _ in coalesced(ticking(["a", "b"], gap=0.5), lambda: 1.0):
            return time.monotonic() - started

    assert asyncio.run(first_arrival()) < 0.2


def test_error_arrives_after_the_events_before_it():
    async def run():
        received = []
        with pytest.raises(RuntimeError, match="boom"):
            async for item in coalesced(ticking(["a", "b", "c"], fail_after=2), lambda: 0.01):
                received.append(item)
        return "".join(received)

    assert asyncio.run(run()) == "ab"


def test_closing_early_stops_the_source():
    stopped = asyncio.Event()

    async def endless():
        try:
            while True:
                yield "x"
                await asyncio.sleep(0.001)
        finally:
            stopped.set()

    async def run():
        stream = coalesced(endless(), lambda: 0.0)
        await anext(stream)
        await stream.aclose()
        await asyncio.wait_for(stopped.wait(), 1)
        return stopped.is_set()

    assert asyncio.run(run())
