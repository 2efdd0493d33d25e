"""The older ``ray.serve.llm.builders`` import path, kept as an alias."""

from llmserve.builder import build_openai_app

__all__ = ["build_openai_app"]
