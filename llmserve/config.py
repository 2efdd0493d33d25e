"""What a user writes to describe a served model: ``LLMConfig`` and its parts.

Everything here is plain pydantic (``extra="forbid"``, so a typo is an error
that names the key) and cheap to import: no Ray, no vLLM. The one check that
needs vLLM, that ``engine_kwargs`` are arguments vLLM knows, asks the engine
module lazily and is skipped where vLLM is not installed (an ingress-only node).

Example::

    config = LLMConfig(
        model_loading_config={"model_id": "qwen-0.5b", "model_source": "Qwen/Qwen2.5-0.5B-Instruct"},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
        engine_kwargs={"max_model_len": 4096},
    )
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator


logger = logging.getLogger(__name__)

# ray.serve.llm's documentation tells users to pick a model's task with
# `engine_kwargs: {task: embed}`; vLLM replaced `task` with `runner` (what the
# engine runs) and `convert` (how a model is adapted to it), and 0.32 rejects it.
_TASK_AS_RUNNER: dict[str, dict[str, str]] = {
    "auto": {},
    "generate": {"runner": "generate"},
    "transcription": {"runner": "generate"},
    "embed": {"runner": "pooling"},
    "embedding": {"runner": "pooling"},
    "reward": {"runner": "pooling"},
    "classify": {"runner": "pooling", "convert": "classify"},
    "score": {"runner": "pooling", "convert": "classify"},
}
_warned_about_task = False


def _task_as_runner(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``engine_kwargs`` with the old ``task`` key written as vLLM's ``runner``/``convert``."""
    global _warned_about_task
    if "task" not in engine_kwargs:
        return engine_kwargs
    kwargs = dict(engine_kwargs)
    task = kwargs.pop("task")
    if task not in _TASK_AS_RUNNER:
        raise ValueError(f"engine_kwargs.task {task!r} is not one of {sorted(_TASK_AS_RUNNER)}; vLLM now calls it `runner`")
    replacement = _TASK_AS_RUNNER[task]
    for key, value in replacement.items():
        kwargs.setdefault(key, value)
    if not _warned_about_task:
        _warned_about_task = True
        logger.warning("engine_kwargs.task=%r is served as %s: vLLM has no `task` argument any more", task, replacement or "vLLM's defaults")
    return kwargs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CloudMirrorConfig(_Strict):
    """Model weights kept in object storage instead of on a hub."""

    bucket_uri: str = Field(description="Where the model folder lives, e.g. `s3://bucket/models/llama`.")

    @field_validator("bucket_uri")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not re.match(r"^(s3|gs|abfss|azure)://", value):
            raise ValueError(f"bucket_uri must start with s3://, gs://, abfss:// or azure://, got {value!r}")
        return value.rstrip("/")


class ModelLoadingConfig(_Strict):
    """Which name clients use for a model, and where its weights come from."""

    model_id: str = Field(description="The name clients put in the request's `model` field.")
    model_source: Optional[Union[str, CloudMirrorConfig]] = Field(
        default=None,
        description="A Hugging Face id, a local path, or {bucket_uri: ...}; defaults to model_id.",
    )
    tokenizer_source: Optional[str] = Field(
        default=None, description="Where to load the tokenizer from when it is not beside the weights."
    )

    @field_validator("model_id")
    @classmethod
    def _usable_id(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model_id must not be empty: it is the name clients send as `model`")
        if ":" in value:
            raise ValueError(
                f"model_id {value!r} contains ':', which separates a base model from a LoRA adapter "
                "in requests (`base:adapter`); choose an id without ':'"
            )
        return value

    @model_validator(mode="after")
    def _source_defaults_to_id(self) -> "ModelLoadingConfig":
        if self.model_source is None:
            self.model_source = self.model_id
        return self


class LoraConfig(_Strict):
    """Serving LoRA adapters of the base model, picked per request as `base:adapter`."""

    dynamic_lora_loading_path: Optional[str] = Field(
        default=None,
        description="Folder holding one adapter per sub-folder: s3://, gs://, file:// or a local path.",
    )
    max_num_adapters_per_replica: PositiveInt = Field(
        default=16, description="How many adapters one replica keeps loaded (least recently used leave)."
    )
    download_timeout_s: Optional[float] = Field(
        default=30.0, gt=0, description="Seconds one adapter download may take; null for no limit."
    )
    max_download_tries: PositiveInt = Field(default=3, description="Attempts per adapter download, with backoff.")
    max_lora_rank: PositiveInt = Field(
        default=16,
        description="Largest adapter rank the engine makes room for (vLLM's max_lora_rank); "
        "a request for an adapter of higher rank is refused with a 400 naming this setting.",
    )

    @field_validator("dynamic_lora_loading_path")
    @classmethod
    def _strip_slash(cls, value: Optional[str]) -> Optional[str]:
        return value.rstrip("/") if value else value


class BackpressureConfig(_Strict):
    """What a request hears when the model's line is full (``max_queued_requests``)."""

    status_code: Literal[429, 503] = Field(default=429, description="429 (as OpenAI rate-limits) or 503.")
    retry_after_s: Optional[float] = Field(default=1.0, ge=0, description="Retry-After seconds; null for no header.")


class DeploymentConfig(_Strict):
    """Options handed to Ray Serve for the model's deployment (see Ray Serve's docs)."""

    name: Optional[str] = Field(default=None, description="Deployment name; defaults to the prefixed model_id.")
    num_replicas: Optional[Union[PositiveInt, Literal["auto"]]] = Field(
        default=None, description="Fixed replica count, or 'auto' for Serve's default autoscaling."
    )
    autoscaling_config: Optional[dict[str, Any]] = Field(
        default=None, description="Serve autoscaling: min_replicas, max_replicas, target_ongoing_requests, ..."
    )
    ray_actor_options: Optional[dict[str, Any]] = Field(
        default=None, description="Resources and options of each replica's actor (num_cpus, num_gpus, ...)."
    )
    max_ongoing_requests: Optional[PositiveInt] = Field(
        default=None, description="Requests one replica takes at once before Serve queues (default 256)."
    )
    max_queued_requests: Optional[int] = Field(
        default=None, description="Requests that may wait for a replica, per ingress replica; -1 (default) is unbounded."
    )
    backpressure_config: Optional[BackpressureConfig] = Field(
        default=None, description="The answer past max_queued_requests: a 429 with Retry-After: 1 unless set."
    )
    max_stream_migrations: Optional[NonNegativeInt] = Field(
        default=None,
        description="Times a stream whose replica or engine dies may go on at another replica under `llmserve run` "
        "(default 1; 0: such a stream ends with an error event).",
    )
    user_config: Optional[Any] = Field(default=None, description="Passed to Serve unchanged.")
    health_check_period_s: Optional[float] = Field(default=None, description="Seconds between health checks.")
    health_check_timeout_s: Optional[float] = Field(default=None, description="Seconds a health check may take.")
    graceful_shutdown_wait_loop_s: Optional[float] = Field(default=None, description="Serve's drain poll period.")
    graceful_shutdown_timeout_s: Optional[float] = Field(default=None, description="Seconds to drain before kill.")
    logging_config: Optional[dict[str, Any]] = Field(default=None, description="Serve logging configuration.")
    request_router_config: Optional[dict[str, Any]] = Field(
        default=None,
        description="Serve's request router options; request_router_kwargs.policy is the placement: prefix (default: "
        "the replica holding the prompt's prefix or adapter, unless much busier), least_loaded, power_of_two, round_robin.",
    )

    @field_validator("request_router_config")
    @classmethod
    def _known_policy(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        from llmserve.affinity import policy_of

        policy_of(value)
        return value

    def as_serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class LLMConfig(_Strict):
    """One served model: where it comes from, how vLLM runs it, how Serve scales it."""

    model_loading_config: ModelLoadingConfig = Field(description="Model id and weight source.")
    llm_engine: Literal["vLLM"] = Field(default="vLLM", description="The engine; vLLM is the one supported.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vLLM engine arguments (max_model_len, dtype, tensor_parallel_size, ...)."
    )
    deployment_config: DeploymentConfig = Field(
        default_factory=DeploymentConfig, description="Ray Serve options of the model's deployment."
    )
    accelerator_type: Optional[str] = Field(
        default=None, description="Ray accelerator type to schedule on (e.g. A10G, L4, H100); ignored without GPUs."
    )
    placement_group_config: Optional[dict[str, Any]] = Field(
        default=None,
        description="Placement group of each replica: {bundles: [...], strategy: PACK|SPREAD|...}.",
    )
    lora_config: Optional[LoraConfig] = Field(default=None, description="Multi-LoRA serving settings.")
    runtime_env: Optional[dict[str, Any]] = Field(
        default=None, description="Ray runtime_env of the replicas (env_vars such as HF_TOKEN, pip, ...)."
    )
    log_engine_metrics: bool = Field(default=True, description="Export vLLM's engine metrics to Prometheus.")
    experimental_configs: dict[str, Any] = Field(
        default_factory=dict, description="Accepted for compatibility with ray.serve.llm; unused keys are ignored."
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _engine_knows_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        from llmserve.engine import unknown_engine_kwargs

        value = _task_as_runner(value)
        for reserved in ("model", "served_model_name"):
            if reserved in value:
                raise ValueError(
                    f"engine_kwargs must not set {reserved!r}: it comes from model_loading_config"
                )
        unknown = unknown_engine_kwargs(value)
        if unknown:
            raise ValueError(
                f"engine_kwargs has keys vLLM does not accept: {sorted(unknown)}; "
                "see the vLLM engine arguments for the names it knows"
            )
        return value

    @property
    def model_id(self) -> str:
        return self.model_loading_config.model_id

    def get_serve_options(self, name_prefix: str = "LLMServer:") -> dict[str, Any]:
        """Ray Serve deployment options for this model, for ``LLMServer.as_deployment``."""
        from llmserve.placement import serve_options

        return serve_options(self, name_prefix=name_prefix)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "LLMConfig":
        """Read one model's YAML (or JSON) file."""
        with open(path) as handle:
            return cls.model_validate(yaml.safe_load(handle))
