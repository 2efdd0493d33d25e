"""``llmserve.deployment.LLMServer``: the import path ray.serve.llm users know."""

from llmserve.server import LLMServer

__all__ = ["LLMServer"]
