"""`llmserve gen-config` in a real terminal (pexpect): prompts with defaults, a wrong answer asked
again, a hidden token; then the files it wrote served by `llmserve run` on the real engine."""

import io
import os
import re
import sys

import pexpect
import pytest
import yaml

from tests.e2e.conftest import BIN, ask, free_port, start, stop, wait_for_line


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    import ray

    ray.shutdown()


def gen_config_terminal(cwd):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return pexpect.spawn(str(BIN / "llmserve"), ["gen-config"], cwd=str(cwd), env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))


def answer(terminal, prompt, reply):
    terminal.expect_exact(prompt)
    terminal.sendline(reply)


def test_prompts_write_configs_that_llmserve_run_serves(tiny_model_paths, tmp_path):
    terminal = gen_config_terminal(tmp_path)
    terminal.logfile_read = sys.stdout
    answer(terminal, "Model source: a Hugging Face id, a local folder, or s3://… / gs://… [Qwen/Qwen2.5-0.5B-Instruct]: ", tiny_model_paths["tiny-a"])
    answer(terminal, "Model id (what clients send as `model`) [tiny-llama-seed0]: ", "bad:id")
    answer(terminal, "contains ':'", "tiny-gen")
    # A local folder needs no Hugging Face token: the next question is the accelerator.
    answer(terminal, "Accelerator type (", "")
    answer(terminal, "Tensor parallel size (accelerators per replica) [1]: ", "two")
    answer(terminal, "'two' is not a whole number; try again", "1")
    answer(terminal, "LoRA adapters folder", "")
    answer(terminal, "Minimum replicas (0 lets the model scale to zero) [1]: ", "")
    answer(terminal, "Maximum replicas (above the minimum: autoscaling) [1]: ", "")
    terminal.expect(r"llmserve run (serve_\d+_\d+\.yaml)")
    serve_file = terminal.match.group(1)
    terminal.expect(pexpect.EOF)
    terminal.close()
    assert terminal.exitstatus == 0

    model = yaml.safe_load((tmp_path / "model_config" / "tiny-gen.yaml").read_text())
    assert model["model_loading_config"] == {"model_id": "tiny-gen", "model_source": tiny_model_paths["tiny-a"]}
    assert model["deployment_config"] == {"num_replicas": 1}
    port = free_port()
    process, log = start([str(BIN / "llmserve"), "run", serve_file, "--host", "127.0.0.1", "--port", str(port)], tmp_path, tmp_path / "run.log")
    try:
        wait_for_line(tmp_path / "run.log", "ready in", process)
        reply = ask(f"http://127.0.0.1:{port}", "tiny-gen")
        assert reply.model == "tiny-gen" and reply.usage.completion_tokens > 0
    finally:
        stop(process)
        log.close()


def test_a_gated_models_token_is_asked_without_echo_and_goes_to_runtime_env(tmp_path):
    terminal = gen_config_terminal(tmp_path)
    terminal.logfile_read = screen = io.StringIO()  # all the terminal showed
    answer(terminal, "[Qwen/Qwen2.5-0.5B-Instruct]: ", "meta-llama/Llama-3.2-1B-Instruct")
    answer(terminal, "[Llama-3.2-1B-Instruct]: ", "")
    answer(terminal, "Hugging Face token, for a gated model (Enter for none): ", "hf_not_shown")
    for prompt in ("Accelerator type", "Tensor parallel size", "LoRA adapters folder"):
        answer(terminal, prompt, "")
    answer(terminal, "Minimum replicas", "0")
    answer(terminal, "Maximum replicas (above the minimum: autoscaling) [1]: ", "2")
    terminal.expect(pexpect.EOF)
    terminal.close()
    shown = screen.getvalue()
    assert terminal.exitstatus == 0
    assert "hf_not_shown" not in shown and "meta-llama/Llama-3.2-1B-Instruct" in shown  # typed answers echo; the token does not
    model = yaml.safe_load((tmp_path / "model_config" / "Llama-3.2-1B-Instruct.yaml").read_text())
    assert model["runtime_env"] == {"env_vars": {"HF_TOKEN": "hf_not_shown"}}
    assert model["deployment_config"] == {"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}}
    assert re.search(r"serve run serve_\d+_\d+\.yaml", shown)
