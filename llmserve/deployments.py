"""The older ``ray.serve.llm.deployments`` names: ``VLLMService`` and ``LLMRouter``."""

from llmserve.ingress import OpenAiIngress as LLMRouter
from llmserve.server import LLMServer as VLLMService

__all__ = ["LLMRouter", "VLLMService"]
