"""The bounded spin-wait plugin, on vLLM's own SpinCondition."""

import math
import time

import pytest
import zmq
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

from llmserve import vllm_engine, vllm_spin_wait


@pytest.fixture
def reader(monkeypatch, tmp_path):
    """A SpinCondition reader with the spin bounded at 2 ms; naps are recorded, not slept."""
    # Put the class back as it was after the test.
    monkeypatch.setattr(SpinCondition, "wait", SpinCondition.wait)
    monkeypatch.setattr(SpinCondition, "record_read", SpinCondition.record_read)
    naps: list[float] = []
    monkeypatch.setattr(vllm_spin_wait, "_nap", naps.append)
    assert vllm_spin_wait.apply(0.002)
    assert not vllm_spin_wait.apply(0.002), "applying twice must not wrap the wrapper"
    context = zmq.Context()
    condition = SpinCondition(is_reader=True, context=context, notify_address=f"ipc://{tmp_path}/notify")
    condition.naps = naps
    yield condition
    context.destroy(linger=0)


def test_a_reader_spins_within_the_budget_then_naps_until_it_reads(reader):
    reader.record_read()  # just read: vLLM's busy window, where it would spin
    reader.wait()
    assert reader.naps == []
    time.sleep(0.003)  # this wait has now lasted past the 2 ms budget
    reader.wait()
    reader.wait()
    assert reader.naps == [vllm_spin_wait.NAP_S, vllm_spin_wait.NAP_S]
    reader.record_read()  # the next wait starts with a spin again
    reader.wait()
    assert len(reader.naps) == 2


def test_an_idle_reader_still_waits_for_vllms_notification(reader):
    reader.last_read = time.monotonic() - 10  # past the busy window: vLLM polls its notify socket
    began = time.monotonic()
    reader.wait(timeout_ms=50)
    assert reader.naps == []
    assert time.monotonic() - began >= 0.04


def test_without_a_budget_vllm_is_left_as_it_is(monkeypatch):
    monkeypatch.delenv(vllm_spin_wait.SPIN_ENV, raising=False)
    assert vllm_spin_wait.spin_budget_from_env() == math.inf
    assert not vllm_spin_wait.apply(math.inf)
    assert not getattr(SpinCondition.wait, "llmserve_bounded", False)


@pytest.mark.parametrize("text, budget", [("0.001", 0.001), ("0", 0.0), ("soon", math.inf), ("-1", math.inf), ("inf", math.inf)])
def test_the_budget_comes_from_the_environment(monkeypatch, text, budget):
    monkeypatch.setenv(vllm_spin_wait.SPIN_ENV, text)
    assert vllm_spin_wait.spin_budget_from_env() == budget


@pytest.mark.parametrize("accelerator, expected", [(False, str(vllm_spin_wait.CPU_DEFAULT_SPIN_S)), (True, None)])
def test_the_engine_bounds_its_spin_on_cpu_only(monkeypatch, accelerator, expected):
    monkeypatch.delenv(vllm_spin_wait.SPIN_ENV, raising=False)
    monkeypatch.setattr(vllm_engine, "has_accelerator", lambda: accelerator)
    vllm_engine._bound_engine_spin_waits()
    assert vllm_engine.os.environ.get(vllm_spin_wait.SPIN_ENV) == expected


def test_a_users_own_budget_wins(monkeypatch):
    monkeypatch.setenv(vllm_spin_wait.SPIN_ENV, "inf")
    monkeypatch.setattr(vllm_engine, "has_accelerator", lambda: False)
    vllm_engine._bound_engine_spin_waits()
    assert vllm_engine.os.environ[vllm_spin_wait.SPIN_ENV] == "inf"
