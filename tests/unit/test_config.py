"""LLMConfig, the builder's argument checks and Serve options, without Ray running."""

import pytest
import yaml
from pydantic import ValidationError

from llmserve import LLMConfig, build_openai_app
from llmserve.builder import LLMServingArgs
from llmserve.errors import ConfigError


def config(**overrides):
    return LLMConfig(model_loading_config={"model_id": "m"}, **overrides)


def test_model_source_defaults_to_model_id():
    assert config().model_loading_config.model_source == "m"


def test_unknown_top_level_key_is_named():
    with pytest.raises(ValidationError, match="model_laoding_config|engine_kwarg"):
        LLMConfig(model_loading_config={"model_id": "m"}, engine_kwarg={})


def test_unknown_deployment_option_is_named():
    with pytest.raises(ValidationError, match="num_replica"):
        config(deployment_config={"num_replica": 2})


def test_unknown_engine_kwarg_fails_at_config_time():
    with pytest.raises(ValidationError, match="max_model_length"):
        config(engine_kwargs={"max_model_length": 10})


def test_engine_kwargs_are_checked_from_a_per_version_cache_without_importing_vllm(tmp_path):
    import json
    import subprocess
    import sys

    from llmserve.engine import _installed_vllm_version

    cache = tmp_path / "llmserve" / f"vllm-{_installed_vllm_version()}-engine-kwargs.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps(["max_model_len"]))
    script = (
        "import sys\n"
        "from llmserve import LLMConfig\n"
        "LLMConfig(model_loading_config={'model_id': 'm'}, engine_kwargs={'max_model_len': 8})\n"
        "try:\n"
        "    LLMConfig(model_loading_config={'model_id': 'm'}, engine_kwargs={'enforce_eager': True})\n"
        "except ValueError as exc:\n"
        "    print('rejected' if 'enforce_eager' in str(exc) else 'wrong error')\n"
        "print('vllm imported' if 'vllm' in sys.modules else 'vllm not imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert result.stdout.split() == ["rejected", "vllm", "not", "imported"], result.stderr


def test_engine_and_frontend_kwargs_are_accepted():
    accepted = config(engine_kwargs={"max_model_len": 128, "enforce_eager": True, "chat_template": None})
    assert accepted.engine_kwargs["max_model_len"] == 128


def test_engine_kwargs_cannot_override_the_model():
    with pytest.raises(ValidationError, match="model_loading_config"):
        config(engine_kwargs={"model": "other"})


def test_num_replicas_auto_and_bucket_source():
    parsed = LLMConfig(
        model_loading_config={"model_id": "m", "model_source": {"bucket_uri": "s3://bucket/m/"}},
        deployment_config={"num_replicas": "auto"},
    )
    assert parsed.model_loading_config.model_source.bucket_uri == "s3://bucket/m"
    with pytest.raises(ValidationError, match="bucket_uri"):
        LLMConfig(model_loading_config={"model_id": "m", "model_source": {"bucket_uri": "http://x"}})


def test_num_replicas_auto_gets_llm_defaults_that_serve_accepts(monkeypatch):
    from ray.serve.config import AutoscalingConfig

    monkeypatch.setattr("llmserve.placement.gpus_present", lambda: False)
    options = config(deployment_config={"num_replicas": "auto", "max_ongoing_requests": 32, "autoscaling_config": {"max_replicas": 8}}).get_serve_options()
    assert "num_replicas" not in options
    scaling = AutoscalingConfig(**options["autoscaling_config"])
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 8, 8)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (15.0, 300.0)
    assert "autoscaling_config" not in config(deployment_config={"num_replicas": 2}).get_serve_options()


def test_model_id_with_colon_is_rejected():
    with pytest.raises(ValidationError, match="adapter"):
        LLMConfig(model_loading_config={"model_id": "base:lora"})


def test_lora_config_is_validated():
    assert config(lora_config={"dynamic_lora_loading_path": "s3://b/loras/"}).lora_config.dynamic_lora_loading_path == "s3://b/loras"
    with pytest.raises(ValidationError):
        config(lora_config={"max_num_adapters_per_replica": 0})


def test_serve_options_on_cpu(monkeypatch):
    monkeypatch.setattr("llmserve.placement.gpus_present", lambda: False)
    options = config(
        accelerator_type="A10G",
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
        runtime_env={"env_vars": {"HF_TOKEN": "t"}},
    ).get_serve_options(name_prefix="vLLM:")
    assert options["name"] == "vLLM:m"
    assert options["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 2,  # the user's, and LLM defaults for what they left out
        "target_ongoing_requests": 64, "upscale_delay_s": 15.0, "downscale_delay_s": 300.0,
    }  # fmt: skip
    assert options["ray_actor_options"]["num_cpus"] == 1
    assert "accelerator_type" not in options["ray_actor_options"]
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": {"HF_TOKEN": "t"}}


def test_serve_options_on_gpu(monkeypatch):
    monkeypatch.setattr("llmserve.placement.gpus_present", lambda: True)
    single = config(accelerator_type="L4").get_serve_options()
    assert single["ray_actor_options"]["num_gpus"] == 1
    assert single["ray_actor_options"]["accelerator_type"] == "L4"
    sharded = config(engine_kwargs={"tensor_parallel_size": 2}).get_serve_options()
    assert len(sharded["placement_group_bundles"]) == 2
    assert all(bundle["GPU"] == 1 for bundle in sharded["placement_group_bundles"])


def test_duplicate_model_ids_are_rejected():
    with pytest.raises(ConfigError, match="twice"):
        build_openai_app({"llm_configs": [config(), config()]})


def test_empty_llm_configs_rejected():
    with pytest.raises(ValidationError, match="empty"):
        LLMServingArgs(llm_configs=[])


def test_yaml_paths_resolve_relative_to_base_dir(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.yaml").write_text(
        yaml.safe_dump({"model_loading_config": {"model_id": "a", "model_source": "../weights"}})
    )
    args = LLMServingArgs(llm_configs=["models/a.yaml", {"model_loading_config": {"model_id": "hub/b"}}])
    loaded = args.load_configs(base_dir=tmp_path)
    assert loaded[0].model_loading_config.model_source == str(tmp_path / "weights")
    assert loaded[1].model_loading_config.model_source == "hub/b"  # a hub id stays a hub id
    with pytest.raises(ConfigError, match="not found"):
        LLMServingArgs(llm_configs=["missing.yaml"]).load_configs(base_dir=tmp_path)


@pytest.mark.parametrize(
    "task, expected",
    [("embed", {"runner": "pooling"}), ("score", {"runner": "pooling", "convert": "classify"}), ("generate", {"runner": "generate"})],
)
def test_the_documented_task_kwarg_is_written_as_vllms_runner(task, expected, caplog):
    engine_kwargs = config(engine_kwargs={"task": task, "max_model_len": 64}).engine_kwargs
    assert engine_kwargs == {"max_model_len": 64, **expected}


def test_an_explicit_runner_wins_over_task_and_a_bad_task_is_named():
    assert config(engine_kwargs={"task": "embed", "runner": "generate"}).engine_kwargs == {"runner": "generate"}
    with pytest.raises(ValidationError, match="engine_kwargs.task 'embedz'"):
        config(engine_kwargs={"task": "embedz"})


def test_stream_migrations_are_the_ingress_s_to_bound_and_not_passed_to_serve(monkeypatch):
    monkeypatch.setattr("llmserve.placement.gpus_present", lambda: False)
    assert config().deployment_config.max_stream_migrations is None  # the default: 1
    bounded = config(deployment_config={"max_stream_migrations": 0})
    assert bounded.deployment_config.max_stream_migrations == 0
    assert "max_stream_migrations" not in bounded.get_serve_options(name_prefix="vLLM:")
    with pytest.raises(ValidationError):
        config(deployment_config={"max_stream_migrations": -1})
