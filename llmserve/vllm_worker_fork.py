"""Engine workers forked from the engine core, not spawned, loaded by vLLM itself.

vLLM starts three processes per engine: the API side (for llmserve, the
server replica), the engine core, and a worker that runs the model. On CPU
platforms it starts each child with ``spawn``, so each is a fresh interpreter
that imports vLLM, torch and transformers again: 8-10 s of CPU apiece on our
machines, one after the other, which is most of an engine's start-up besides
compiling the model (docs/data-path.md, "Start-up").

The engine core has imported everything its worker needs by the time it
starts it, and it is an ordinary process (not a Ray actor, no accelerator
context): vLLM forks workers from it on GPUs. This plugin makes the engine
core's executor fork its workers when ``LLMSERVE_FORK_ENGINE_WORKERS=1``; the
worker then starts with vLLM already imported.

Why vLLM spawns on CPU: it binds each worker's OpenMP threads to its cores
through environment variables (``OMP_PLACES``, ``GOMP_CPU_AFFINITY``,
``KMP_AFFINITY``, ``OMP_NUM_THREADS``) that the OpenMP runtime reads once, when
it loads, and a forked worker inherits a runtime loaded without them. So a
worker is forked only where its binding can be redone exactly after the fork:
each worker bound to a single CPU (the forked worker pins itself there and
sets one thread, which is what the runtime would have done), or binding off
(``VLLM_CPU_OMP_THREADS_BIND=nobind``). Anything else is spawned as vLLM does.
The libraries vLLM preloads on CPU (``LD_PRELOAD``: tcmalloc, Intel OpenMP) are
set while the replica makes vLLM's config, before the engine core starts, so
the engine core has them loaded and a worker forked from it has them too.
The engine core is always spawned: the replica that starts it is a Ray actor,
whose threads make forking it unsafe.

llmserve's engine sets the variable in its replica before vLLM starts its
processes, on CPU platforms only (``vllm_engine``); other vLLM processes of the
venv, such as a plain ``vllm serve``, leave it unset and are untouched.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import re
from typing import Any, Optional

# Under vLLM's logger, whose handler prints to the engine's log with the
# process's name and pid; an `llmserve` logger has no handler in these processes.
logger = logging.getLogger("vllm.llmserve.worker_fork")

FORK_ENV = "LLMSERVE_FORK_ENGINE_WORKERS"
# What a forked worker logs first; a spawned one never does, having none of its parent's state.
FORKED_WORKER_LOG = "llmserve: this worker was forked from the engine core"
# Where vLLM puts a worker's CPU list for each OpenMP runtime (ompmultiprocessing).
_BINDING_ENV = ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")

# True while a patched executor starts workers that it may fork.
_forking = False


def requested() -> bool:
    return os.environ.get(FORK_ENV, "").strip() == "1"


def binding_redone_exactly(cpu_lists: list[list[int]], binding_off: bool) -> bool:
    """Whether a forked worker can bind itself as vLLM's spawned one would be bound."""
    return binding_off or (bool(cpu_lists) and all(len(cpus) == 1 for cpus in cpu_lists))


def bound_cpu_from_env(environ: Any) -> Optional[int]:
    """The one CPU vLLM bound this worker to through the environment; None when unbound."""
    for name in _BINDING_ENV:
        value = environ.get(name, "")
        if name == "KMP_AFFINITY":
            value = value.partition("proclist=")[2]
        ids = re.findall(r"\d+", value)
        if ids:
            if len(ids) != 1:
                raise ValueError(f"{name}={environ[name]!r} binds more than one CPU")
            return int(ids[0])
    return None


def _bind_like_a_spawned_worker(process: Any) -> None:
    """Run by multiprocessing in each child forked from here, before the child's own code."""
    if not _forking:  # some other fork of this process, not one of our workers
        return
    try:
        cpu = bound_cpu_from_env(os.environ)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # threads started from now on inherit it
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
    except Exception:  # a worker left unbound is slower, not broken
        logger.exception("llmserve: could not bind the forked worker as vLLM would have")
        return
    logger.info("%s (pid %d, engine core pid %d, cpu %s)", FORKED_WORKER_LOG, os.getpid(), os.getppid(), cpu)


def _worker_cpu_lists(vllm_config: Any) -> tuple[list[list[int]], bool]:
    """Each local worker's CPU list as vLLM's OpenMP set-up will bind it, and whether binding is off."""
    from vllm.utils import ompmultiprocessing

    quiet = logging.getLogger(ompmultiprocessing.__name__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the executor logs the same binding itself just after
    try:
        manager = ompmultiprocessing.OMPProcessManager(vllm_config)
    finally:
        quiet.setLevel(level)
    return manager.cpu_lists, manager.skip_setup


def apply() -> bool:
    """Make vLLM's multiprocess executor fork its workers where it can; True when patched."""
    from vllm.platforms import current_platform
    from vllm.v1.executor import multiproc_executor

    executor_class = multiproc_executor.MultiprocExecutor
    if getattr(executor_class._init_executor, "llmserve_fork", False) or not current_platform.is_cpu():
        return False
    vllm_init_executor = executor_class._init_executor
    vllm_get_mp_context = multiproc_executor.get_mp_context

    def _init_executor(self: Any) -> None:
        global _forking
        cpu_lists, binding_off = _worker_cpu_lists(self.vllm_config)
        _forking = binding_redone_exactly(cpu_lists, binding_off)
        if not _forking:
            logger.info("llmserve: workers bound to several CPUs each (%s) are spawned, as vLLM does", cpu_lists)
        try:
            vllm_init_executor(self)
        finally:
            _forking = False

    def get_mp_context() -> Any:
        # vLLM's own call still runs: it logs and records why it would spawn.
        context = vllm_get_mp_context()
        return multiprocessing.get_context("fork") if _forking else context

    _init_executor.llmserve_fork = True  # type: ignore[attr-defined]
    executor_class._init_executor = _init_executor
    multiproc_executor.get_mp_context = get_mp_context
    # Run by multiprocessing in each child it forks from here (a spawned one has none).
    multiprocessing.util.register_after_fork(get_mp_context, _bind_like_a_spawned_worker)
    return True


def register() -> None:
    """vLLM's plugin hook: fork the engine's workers when llmserve's engine asked for it."""
    try:
        if requested() and apply():
            logger.info("llmserve: engine workers will be forked from this engine core where their binding allows")
    except Exception:  # a plugin must never stop the engine from starting
        logger.exception("llmserve: could not make vLLM fork its workers; they are spawned")
