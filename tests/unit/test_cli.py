"""The CLI's quick paths: help without heavy imports, config handling."""

import subprocess
import sys
import time

from llmserve.cli import _single_model_config, build_applications


def test_help_is_fast_and_imports_neither_vllm_nor_ray():
    code = "import sys; from llmserve.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('vllm' in sys.modules, 'ray' in sys.modules)"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert time.monotonic() - started < 5.0  # well under a second when the machine is idle
    assert result.stdout.strip().endswith("False False")
    assert "run" in result.stdout


def test_single_model_config_builds_one_app():
    config = _single_model_config("/models/my-model/", None)
    assert config["applications"][0]["args"]["llm_configs"][0]["model_loading_config"]["model_id"] == "my-model"
    [(application, app)] = build_applications(config, base_dir=None)
    assert application["route_prefix"] == "/"
    assert app is not None


def test_api_keys_from_the_command_line_join_the_apps_own():
    from llmserve.cli import _parser

    args = _parser().parse_args(["run", "--model", "/m/x", "--api-key", "k1", "--api-key", "k2"])
    config = _single_model_config("/m/x", None)
    config["applications"][0]["args"]["api_keys"] = ["k0"]
    [(_, app)] = build_applications(config, base_dir=None, api_keys=args.api_key)
    assert app._bound_deployment.init_kwargs["api_keys"] == ["k0", "k1", "k2"]
