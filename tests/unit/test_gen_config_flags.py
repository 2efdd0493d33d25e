"""`llmserve gen-config` from flags (`--yes`): the files it writes load as the configs they describe.

The interactive path, in a real terminal and served on the real engine: tests/e2e/test_gen_config.py.
"""

import subprocess
import sys

import pytest
import yaml

from llmserve import LLMConfig
from llmserve.cli import main as llmserve
from llmserve.gen_config import main as gen_config


def written(tmp_path):
    (serve_file,) = tmp_path.glob("serve_*.yaml")
    serve = yaml.safe_load(serve_file.read_text())
    (model_path,) = serve["applications"][0]["args"]["llm_configs"]
    return serve, LLMConfig.from_file(tmp_path / model_path), tmp_path / model_path


def test_flags_alone_write_a_model_and_a_serve_config_that_load(tmp_path, capsys):
    flags = ["--model-source", "s3://weights/qwen", "--model-id", "qwen", "--accelerator-type", "L4", "--tensor-parallel-size", "2",
             "--lora-path", "s3://weights/qwen-adapters", "--max-num-adapters", "4", "--min-replicas", "0", "--max-replicas", "3"]
    assert llmserve(["gen-config", *flags, "--output-dir", str(tmp_path), "--yes"]) == 0
    serve, config, model_path = written(tmp_path)
    assert model_path.name == "qwen.yaml" and model_path.parent.name == "model_config"
    assert serve["applications"][0]["import_path"] == "llmserve:build_openai_app"
    assert config.model_loading_config.model_source.bucket_uri == "s3://weights/qwen"
    assert (config.accelerator_type, config.engine_kwargs) == ("L4", {"tensor_parallel_size": 2})
    assert config.lora_config.dynamic_lora_loading_path == "s3://weights/qwen-adapters"
    assert config.lora_config.max_num_adapters_per_replica == 4
    assert config.deployment_config.autoscaling_config == {"min_replicas": 0, "max_replicas": 3}
    assert "llmserve run " in capsys.readouterr().out


def test_defaults_fill_what_no_flag_gives_and_a_token_goes_to_the_replicas(tmp_path):
    assert gen_config(["--model-source", "meta-llama/Llama-3.2-1B-Instruct", "--hf-token", "hf_secret", "--output-dir", str(tmp_path), "-y"]) == 0
    _, config, model_path = written(tmp_path)
    assert config.model_id == "Llama-3.2-1B-Instruct" and model_path.name == "Llama-3.2-1B-Instruct.yaml"
    assert config.runtime_env == {"env_vars": {"HF_TOKEN": "hf_secret"}}
    assert config.deployment_config.num_replicas == 1 and config.deployment_config.autoscaling_config is None
    assert config.accelerator_type is None and config.lora_config is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--yes"], "--yes needs --model-source"),
        (["--model-source", "./no-such-folder", "--yes"], "--model-source: './no-such-folder' is no folder here"),
        (["--model-source", "org/model", "--model-id", "a:b", "--yes"], "--model-id: model_id 'a:b' contains ':'"),
        (["--model-source", "org/model", "--tensor-parallel-size", "0", "--yes"], "--tensor-parallel-size: 0 is below 1"),
        (["--model-source", "org/model", "--min-replicas", "2", "--max-replicas", "1", "--yes"], "--max-replicas: 1 is below 2"),
    ],
)
def test_a_bad_flag_writes_nothing_and_says_why(tmp_path, capsys, flags, message):
    assert gen_config([*flags, "--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_seeds_module_command_works(tmp_path):
    command = [sys.executable, "-m", "llmserve.gen_config", "--model-source", "org/model", "--output-dir", str(tmp_path), "--yes"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert written(tmp_path)[1].model_id == "model"
