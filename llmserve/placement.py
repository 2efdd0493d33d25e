"""Where a model's replicas run: Ray Serve options derived from an ``LLMConfig``,
and, inside a replica, which one this is (``replica_context``, ``replica_name``).

CPU-only defaults apply only when no accelerator is present, so a GPU user's
config means what it says: on GPUs each replica takes one GPU per engine worker
(tensor x pipeline parallel), in a placement group when there are several; on a
CPU-only cluster a replica takes one logical CPU and ``accelerator_type`` is
ignored with a warning (the examples of ray.serve.llm name GPUs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from llmserve.affinity import serve_router_config
from llmserve.autoscaling import llm_autoscaling_config
from llmserve.config import BackpressureConfig

if TYPE_CHECKING:
    from llmserve.config import LLMConfig

logger = logging.getLogger(__name__)

# vLLM batches hundreds of sequences per step; Serve's small default would
# queue requests in front of an idle engine.
DEFAULT_MAX_ONGOING_REQUESTS = 256


def gpus_present() -> bool:
    """Whether the cluster (or, before Ray starts, this machine) has GPUs."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return os.path.exists("/dev/nvidiactl")


def deployment_name(model_id: str, name_prefix: str) -> str:
    return f"{name_prefix}{model_id}".replace("/", "--")


def serve_options(config: "LLMConfig", *, name_prefix: str) -> dict[str, Any]:
    options = config.deployment_config.as_serve_options()
    options.setdefault("name", deployment_name(config.model_id, name_prefix))
    options.setdefault("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)
    # A full line answers as OpenAI answers a rate limit, so clients back off and
    # retry (Serve's default is a 503 without Retry-After).
    options["backpressure_config"] = (config.deployment_config.backpressure_config or BackpressureConfig()).model_dump()
    # The ingress bounds the line itself, exactly (``Admission``): Serve's count leaves
    # out requests it is offering to a replica, so in a burst it admits more or
    # fewer than the bound. Serve's own queue stays unbounded behind it.
    options.pop("max_queued_requests", None)
    options.pop("max_stream_migrations", None)  # the front door's to apply (migration.py)
    # Leases go where the ingress prefers (affinity.py): the prompt's cache, its adapter.
    options["request_router_config"] = serve_router_config(options.get("request_router_config"))
    auto = options.get("num_replicas") == "auto"
    if auto or options.get("autoscaling_config") is not None:
        options["autoscaling_config"] = llm_autoscaling_config(options.get("autoscaling_config"), options["max_ongoing_requests"], auto)
        options.pop("num_replicas", None)
    actor_options = dict(options.get("ray_actor_options") or {})
    if config.runtime_env:
        actor_options["runtime_env"] = {**config.runtime_env, **actor_options.get("runtime_env", {})}
    options.update(_resources(config, actor_options))
    return options


@dataclass(frozen=True)
class Admission:
    """How many requests one replica takes at once, how many may wait in line at each
    ingress replica (-1: no bound), and what a request past the line hears."""

    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    max_queued_requests: int = -1
    refusal_status: int = BackpressureConfig().status_code
    retry_after_s: Optional[float] = BackpressureConfig().retry_after_s

    @classmethod
    def of(cls, config: "LLMConfig", max_ongoing_requests: Optional[int] = None) -> "Admission":
        """The config's limits; ``max_ongoing_requests`` is Serve's, where a replica knows it."""
        deployment = config.deployment_config
        backpressure = deployment.backpressure_config or BackpressureConfig()
        queued = deployment.max_queued_requests
        return cls(
            max_ongoing_requests=max_ongoing_requests or deployment.max_ongoing_requests or DEFAULT_MAX_ONGOING_REQUESTS,
            max_queued_requests=-1 if queued is None else queued,
            refusal_status=backpressure.status_code,
            retry_after_s=backpressure.retry_after_s,
        )


def _resources(config: "LLMConfig", actor_options: dict[str, Any]) -> dict[str, Any]:
    if config.placement_group_config:
        return _placement_group(config.placement_group_config, actor_options)
    if not gpus_present():
        if config.accelerator_type:
            logger.warning(
                "accelerator_type %r ignored for %s: the cluster has no GPUs, it runs on CPU",
                config.accelerator_type,
                config.model_id,
            )
        actor_options.setdefault("num_cpus", 1)
        return {"ray_actor_options": actor_options}
    workers = int(config.engine_kwargs.get("tensor_parallel_size", 1)) * int(
        config.engine_kwargs.get("pipeline_parallel_size", 1)
    )
    if config.accelerator_type:
        actor_options.setdefault("accelerator_type", config.accelerator_type)
    if workers == 1:
        actor_options.setdefault("num_cpus", 1)
        actor_options.setdefault("num_gpus", 1)
        return {"ray_actor_options": actor_options}
    bundle = {"GPU": 1}
    if config.accelerator_type:
        bundle[f"accelerator_type:{config.accelerator_type}"] = 0.001
    bundles = [{"CPU": 1, **bundle}] + [dict(bundle) for _ in range(workers - 1)]
    return _placement_group({"bundles": bundles, "strategy": "PACK"}, actor_options)


def _placement_group(pg_config: dict[str, Any], actor_options: dict[str, Any]) -> dict[str, Any]:
    bundles = pg_config.get("bundles")
    if not bundles:
        raise ValueError("placement_group_config needs a non-empty `bundles` list, e.g. [{'CPU': 1, 'GPU': 1}]")
    # The replica actor itself lives in the first bundle.
    actor_options.pop("num_cpus", None)
    actor_options.pop("num_gpus", None)
    return {
        "ray_actor_options": actor_options,
        "placement_group_bundles": bundles,
        "placement_group_strategy": pg_config.get("strategy", "PACK"),
    }


def replica_context() -> Any:
    """Serve's context of the replica this code runs in; None outside Serve (tests, notebooks)."""
    try:
        from ray import serve

        return serve.get_replica_context()
    except Exception:
        return None


def replica_name(outside_serve: str) -> str:
    """Serve's name for this replica (deployment#id), as answers and metrics name it; outside
    Serve, ``outside_serve``."""
    context = replica_context()
    return f"{context.deployment}#{context.replica_id.unique_id}" if context is not None else outside_serve
