"""The worker-fork plugin, on vLLM's own multiprocess executor module."""

import os
import types

import pytest
from vllm.v1.executor import multiproc_executor

from llmserve import vllm_engine, vllm_worker_fork

# Set at run time, after import: only a forked child sees the parent's value.
_state_of_the_parent = {"marker": None}


def _report(queue) -> None:
    import torch

    queue.put((_state_of_the_parent["marker"], os.sched_getaffinity(0), torch.get_num_threads()))


@pytest.fixture
def patched(monkeypatch):
    """vLLM's executor patched, put back after the test."""
    executor = multiproc_executor.MultiprocExecutor
    monkeypatch.setattr(executor, "_init_executor", executor._init_executor)
    monkeypatch.setattr(multiproc_executor, "get_mp_context", multiproc_executor.get_mp_context)
    assert vllm_worker_fork.apply()
    assert not vllm_worker_fork.apply(), "applying twice must not wrap the wrapper"


def test_a_worker_started_while_forking_inherits_the_engine_core_and_binds_itself(patched, monkeypatch):
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # what vLLM's CPU platform sets
    monkeypatch.setattr(vllm_worker_fork, "_forking", True)  # as inside the executor's start
    cpu = max(os.sched_getaffinity(0))
    # What vLLM's OpenMP set-up puts in the environment around a worker's start.
    monkeypatch.setenv("OMP_PLACES", f"{{{cpu}}}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    context = multiproc_executor.get_mp_context()
    assert context.get_start_method() == "fork"
    monkeypatch.setitem(_state_of_the_parent, "marker", "set after import")
    queue = context.Queue()
    worker = context.Process(target=_report, args=(queue,))
    worker.start()
    assert queue.get(timeout=30) == ("set after import", {cpu}, 1)
    worker.join(timeout=30)
    assert worker.exitcode == 0


def test_outside_the_executors_start_vllms_context_is_kept(patched, monkeypatch):
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    assert multiproc_executor.get_mp_context().get_start_method() == "spawn"


@pytest.mark.parametrize(
    "cpu_lists, binding_off, fork",
    [([[1]], False, True), ([[0], [1]], False, True), ([[0, 1]], False, False), ([], False, False), ([], True, True)],
)
def test_workers_are_forked_only_where_their_binding_is_redone_exactly(cpu_lists, binding_off, fork):
    assert vllm_worker_fork.binding_redone_exactly(cpu_lists, binding_off) is fork


@pytest.mark.parametrize(
    "environ, cpu",
    [
        ({"OMP_PLACES": "{3}", "OMP_PROC_BIND": "true"}, 3),
        ({"GOMP_CPU_AFFINITY": "5"}, 5),
        ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[7]"}, 7),
        ({"OMP_NUM_THREADS": "1"}, None),
    ],
)
def test_the_bound_cpu_is_read_from_vllms_openmp_environment(environ, cpu):
    assert vllm_worker_fork.bound_cpu_from_env(environ) == cpu


def test_a_binding_to_several_cpus_is_refused():
    with pytest.raises(ValueError):
        vllm_worker_fork.bound_cpu_from_env({"OMP_PLACES": "{0,1}"})


def test_without_the_variable_vllm_is_left_as_it_is(monkeypatch):
    executor = multiproc_executor.MultiprocExecutor
    monkeypatch.setattr(executor, "_init_executor", executor._init_executor)
    monkeypatch.delenv(vllm_worker_fork.FORK_ENV, raising=False)
    vllm_worker_fork.register()
    assert not getattr(executor._init_executor, "llmserve_fork", False)


@pytest.mark.parametrize(
    "accelerator, numa_bind, expected",
    [(False, False, "1"), (True, False, None), (False, True, None)],
)
def test_the_engine_forks_its_workers_on_cpu_without_numa_binding(monkeypatch, accelerator, numa_bind, expected):
    monkeypatch.delenv(vllm_worker_fork.FORK_ENV, raising=False)
    monkeypatch.setattr(vllm_engine, "has_accelerator", lambda: accelerator)
    config = types.SimpleNamespace(parallel_config=types.SimpleNamespace(numa_bind=numa_bind))
    vllm_engine._fork_engine_workers(config)
    assert vllm_engine.os.environ.get(vllm_worker_fork.FORK_ENV) == expected
