"""The older ``ray.serve.llm.configs`` import path, kept as an alias."""

from llmserve.config import CloudMirrorConfig, DeploymentConfig, LLMConfig, LoraConfig, ModelLoadingConfig

__all__ = ["CloudMirrorConfig", "DeploymentConfig", "LLMConfig", "LoraConfig", "ModelLoadingConfig"]
