"""``build_openai_app``: many model configs in, one Ray Serve application out.

It takes what ``serve run config.yaml`` passes as ``args`` (``llm_configs`` as
objects, dicts or YAML paths) and binds one ``LLMServer`` deployment per model
behind one ``OpenAiIngress``.

Example::

    app = build_openai_app({"llm_configs": [config_a, "models/b.yaml"]})
    serve.run(app)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field, field_validator

from llmserve.config import LLMConfig, _Strict
from llmserve.errors import ConfigError
from llmserve.ingress import OpenAiIngress
from llmserve.server import LLMServer

DEPLOYMENT_NAME_PREFIX = "LLMServer:"


class LLMServingArgs(_Strict):
    """The arguments of ``build_openai_app``; what `args:` holds in a Serve config file."""

    llm_configs: list[Union[LLMConfig, str]] = Field(
        description="Model configs: LLMConfig objects or dicts, or paths of YAML files each holding one."
    )
    ingress_deployment_config: dict[str, Any] = Field(
        default_factory=dict, description="Ray Serve options of the ingress deployment."
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Keys clients must send as `Authorization: Bearer <key>` (as `vllm serve --api-key`); "
        "a secret belongs in the LLMSERVE_API_KEY environment variable instead.",
    )

    @field_validator("llm_configs")
    @classmethod
    def _at_least_one(cls, value: list) -> list:
        if not value:
            raise ValueError("llm_configs is empty: give at least one model")
        return value

    def load_configs(self, base_dir: Optional[Path] = None) -> list[LLMConfig]:
        configs = [_load(entry, base_dir) for entry in self.llm_configs]
        seen: set[str] = set()
        for config in configs:
            if config.model_id in seen:
                raise ConfigError(
                    f"model_id {config.model_id!r} is configured twice; each model needs its own id",
                    param="llm_configs",
                )
            seen.add(config.model_id)
        return configs


def _load(entry: Union[LLMConfig, str], base_dir: Optional[Path]) -> LLMConfig:
    if isinstance(entry, LLMConfig):
        return _with_absolute_source(entry, base_dir)
    path = _existing_path(entry, base_dir)
    if path is None:
        raise ConfigError(f"model config file {entry!r} not found (looked in {Path.cwd()})", param="llm_configs")
    return _with_absolute_source(LLMConfig.from_file(path), path.parent)


def _existing_path(name: str, base_dir: Optional[Path]) -> Optional[Path]:
    path = Path(os.path.expanduser(name))
    for candidate in ([base_dir / path] if base_dir and not path.is_absolute() else []) + [path]:
        if candidate.exists():
            return candidate.resolve()
    return None


def _with_absolute_source(config: LLMConfig, base_dir: Optional[Path]) -> LLMConfig:
    # Replicas do not run in the caller's working directory: a local model path
    # must be absolute before it leaves this process. Hub ids stay as they are.
    source = config.model_loading_config.model_source
    if not isinstance(source, str) or Path(source).is_absolute():
        return config
    path = _existing_path(source, base_dir)
    if path is None:
        return config
    loading = config.model_loading_config.model_copy(update={"model_source": str(path)})
    return config.model_copy(update={"model_loading_config": loading})


def build_openai_app(builder_config: Union[dict[str, Any], LLMServingArgs]):
    """One OpenAI-compatible Serve application over every model in ``llm_configs``.

    Relative YAML paths are looked up in the working directory. (Serve calls
    builders with exactly one argument; see ``build_openai_app_at`` for a base folder.)
    """
    return build_openai_app_at(builder_config, base_dir=None)


def build_openai_app_at(
    builder_config: Union[dict[str, Any], LLMServingArgs],
    *,
    base_dir: Optional[Path],
    front_door: Union[dict[str, Any], bool, None] = None,
):
    """``build_openai_app`` with relative paths looked up in ``base_dir`` first (a config file's
    folder), and optionally with the ingress listening on ``front_door`` (host, port) itself."""
    args = LLMServingArgs.model_validate(builder_config)
    configs = args.load_configs(base_dir)
    deployments = [LLMServer.as_deployment(config.get_serve_options(name_prefix=DEPLOYMENT_NAME_PREFIX)).bind(config) for config in configs]
    ingress = OpenAiIngress.as_deployment(args.ingress_deployment_config)
    options: dict[str, Any] = {"llm_configs": configs}
    if args.api_keys:
        options["api_keys"] = args.api_keys
    if front_door is not None:
        options["front_door"] = front_door
    return ingress.bind(deployments, **options)
