"""``llmserve gen-config``: a model config and the Serve config that runs it, from prompts or flags.

Asks for what a model needs (its source and id, a Hugging Face token for gated
models, accelerator type, tensor parallelism, LoRA adapters, replicas), each with a
default, or takes the same as flags; ``--yes`` asks nothing. Writes
``model_config/<model_id>.yaml`` and ``serve_<timestamp>.yaml`` (as Ray's
``gen_config`` did), loads both back to check them, and prints the command that
serves them.

Examples::

    llmserve gen-config                      # prompts, in a terminal
    python -m llmserve.gen_config --model-source Qwen/Qwen2.5-0.5B-Instruct --yes
    llmserve gen-config --model-source s3://my-bucket/qwen --model-id qwen --max-replicas 4 --yes
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

DEFAULT_MODEL_SOURCE = "Qwen/Qwen2.5-0.5B-Instruct"
# Ray's names for common GPUs (what `accelerator_type` schedules on); others are accepted as typed.
COMMON_ACCELERATORS = ("L4", "A10G", "L40S", "A100-40G", "A100-80G", "H100", "H200", "T4")
HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class Invalid(ValueError):
    """An answer that cannot be used; the message says what would be."""


@dataclass(frozen=True)
class Question:
    name: str
    prompt: str
    parse: Callable[[str, dict[str, Any]], Any]
    default: Callable[[dict[str, Any]], str] = lambda _: ""
    asked: Callable[[dict[str, Any]], bool] = lambda _: True
    secret: bool = False


def _model_source(text: str, _: dict[str, Any]) -> Any:
    text = text.strip()
    if re.match(r"^(s3|gs)://", text):
        return {"bucket_uri": text.rstrip("/")}
    folder = Path(text).expanduser()
    if folder.is_dir():
        return str(folder.resolve())
    if text.startswith(("/", ".", "~")) or not HF_ID.fullmatch(text):
        raise Invalid(f"{text!r} is no folder here, nor a Hugging Face id (org/name) or an s3:// or gs:// URI")
    return text


def _model_id(text: str, _: dict[str, Any]) -> str:
    from llmserve.config import ModelLoadingConfig

    try:
        return ModelLoadingConfig(model_id=text.strip()).model_id
    except ValueError as exc:
        raise Invalid(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


def _default_model_id(answers: dict[str, Any]) -> str:
    source = answers["model_source"]
    return (source["bucket_uri"] if isinstance(source, dict) else source).rstrip("/").rsplit("/", 1)[-1]


def _is_hub_id(answers: dict[str, Any]) -> bool:
    source = answers["model_source"]
    return isinstance(source, str) and not Path(source).is_absolute()


def _optional(text: str, _: dict[str, Any]) -> Optional[str]:
    text = text.strip()
    return None if text.lower() in ("", "none", "cpu") else text


def _whole(least: Callable[[dict[str, Any]], int]) -> Callable[[str, dict[str, Any]], int]:
    def parse(text: str, answers: dict[str, Any]) -> int:
        floor = least(answers)
        try:
            value = int(text)
        except ValueError:
            raise Invalid(f"{text!r} is not a whole number") from None
        if value < floor:
            raise Invalid(f"{value} is below {floor}")
        return value

    return parse


def _lora_path(text: str, _: dict[str, Any]) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    if re.match(r"^(s3|gs|file)://", text):
        return text
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise Invalid(f"{text!r} is no folder here, nor an s3://, gs:// or file:// URI")
    return str(folder.resolve())


QUESTIONS = (
    Question("model_source", "Model source: a Hugging Face id, a local folder, or s3://… / gs://…", _model_source,
             default=lambda _: DEFAULT_MODEL_SOURCE),
    Question("model_id", "Model id (what clients send as `model`)", _model_id, default=_default_model_id),
    Question("hf_token", "Hugging Face token, for a gated model (Enter for none)", lambda text, _: text.strip() or None,
             asked=_is_hub_id, secret=True),
    Question("accelerator_type", f"Accelerator type ({', '.join(COMMON_ACCELERATORS)}, ...; none for any or CPU)", _optional,
             default=lambda _: "none"),
    Question("tensor_parallel_size", "Tensor parallel size (accelerators per replica)", _whole(lambda _: 1),
             default=lambda _: "1"),
    Question("lora_path", "LoRA adapters folder: s3://…, gs://… or a local folder (Enter for none)", _lora_path),
    Question("max_num_adapters", "LoRA adapters one replica keeps loaded", _whole(lambda _: 1),
             default=lambda _: "16", asked=lambda answers: answers.get("lora_path") is not None),
    Question("min_replicas", "Minimum replicas (0 lets the model scale to zero)", _whole(lambda _: 0),
             default=lambda _: "1"),
    Question("max_replicas", "Maximum replicas (above the minimum: autoscaling)",
             _whole(lambda answers: max(answers["min_replicas"], 1)),
             default=lambda answers: str(max(answers["min_replicas"], 1))),
)


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="llmserve gen-config",
        description="Write model_config/<model_id>.yaml and serve_<timestamp>.yaml; asks for what no flag gives.",
    )
    for question in QUESTIONS:
        cli.add_argument(f"--{question.name.replace('_', '-')}", dest=question.name, help=question.prompt)
    cli.add_argument("--output-dir", default=".", help="where to write the files (default: here)")
    cli.add_argument("--yes", "-y", action="store_true", help="ask nothing: take the defaults for what no flag gives")
    return cli


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    given = {question.name: getattr(args, question.name) for question in QUESTIONS}
    if args.yes and given["model_source"] is None:
        print("llmserve gen-config: --yes needs --model-source", file=sys.stderr)
        return 2
    try:
        answers = _answers(given, ask=not args.yes)
    except Invalid as exc:
        print(f"llmserve gen-config: {exc}", file=sys.stderr)
        return 2
    except (EOFError, KeyboardInterrupt):
        print("\nllmserve gen-config: stopped; nothing written", file=sys.stderr)
        return 1
    model_file, serve_file = write_configs(answers, Path(args.output_dir))
    shown = _shown(serve_file)
    print(f"Wrote {_shown(model_file)} and {shown}; both load.")
    print(f"Review them (vLLM's engine arguments go under engine_kwargs), then serve with:\n\n    llmserve run {shown}\n")
    print(f"or with Ray's CLI: serve run {shown}")
    return 0


def _answers(given: dict[str, Optional[str]], ask: bool) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for question in QUESTIONS:
        if not question.asked(answers) and given[question.name] is None:
            answers[question.name] = None
        elif given[question.name] is not None:
            answers[question.name] = _parsed(question, given[question.name], answers, f"--{question.name.replace('_', '-')}")
        elif not ask:
            answers[question.name] = question.parse(question.default(answers), answers)
        else:
            answers[question.name] = _asked(question, answers)
    return answers


def _parsed(question: Question, text: str, answers: dict[str, Any], where: str) -> Any:
    try:
        return question.parse(text, answers)
    except Invalid as exc:
        raise Invalid(f"{where}: {exc}") from None


def _asked(question: Question, answers: dict[str, Any]) -> Any:
    default = question.default(answers)
    prompt = f"{question.prompt} [{default}]: " if default else f"{question.prompt}: "
    while True:
        text = getpass.getpass(prompt) if question.secret else input(prompt)
        try:
            return question.parse(text.strip() or default, answers)
        except Invalid as exc:
            print(f"  {exc}; try again")


def llm_config(answers: dict[str, Any]) -> dict[str, Any]:
    """The model config the answers describe (a dict for LLMConfig, as written to YAML)."""
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": answers["model_id"], "model_source": answers["model_source"]},
        "engine_kwargs": {"tensor_parallel_size": answers["tensor_parallel_size"]},
    }
    if answers["accelerator_type"]:
        config["accelerator_type"] = answers["accelerator_type"]
    if answers["lora_path"]:
        config["lora_config"] = {
            "dynamic_lora_loading_path": answers["lora_path"],
            "max_num_adapters_per_replica": answers["max_num_adapters"],
        }
    low, high = answers["min_replicas"], answers["max_replicas"]
    config["deployment_config"] = (
        {"autoscaling_config": {"min_replicas": low, "max_replicas": high}} if high > low else {"num_replicas": low}
    )
    if answers["hf_token"]:
        # The replicas read it to download a gated model; keep this file out of version control.
        config["runtime_env"] = {"env_vars": {"HF_TOKEN": answers["hf_token"]}}
    return config


def write_configs(answers: dict[str, Any], output_dir: Path) -> tuple[Path, Path]:
    """Write both files under ``output_dir`` and load them back as ``llmserve run`` would."""
    import yaml

    from llmserve.cli import build_applications, load_serve_config
    from llmserve.config import LLMConfig

    model = llm_config(answers)
    LLMConfig.model_validate(model)
    model_file = output_dir / "model_config" / f"{answers['model_id'].replace('/', '--')}.yaml"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model_file.write_text(yaml.safe_dump(model, sort_keys=False))
    application = {
        "name": "llmserve",
        "route_prefix": "/",
        "import_path": "llmserve:build_openai_app",
        "args": {"llm_configs": [str(model_file.relative_to(output_dir))]},
    }
    serve_file = output_dir / f"serve_{time.strftime('%Y%m%d_%H%M%S')}.yaml"
    serve_file.write_text(yaml.safe_dump({"applications": [application]}, sort_keys=False))
    build_applications(load_serve_config(serve_file), serve_file.parent.resolve())
    return model_file, serve_file


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


if __name__ == "__main__":
    sys.exit(main())
