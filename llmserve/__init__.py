"""llmserve: many LLMs behind one OpenAI-compatible endpoint, on Ray Serve and vLLM.

Example::

    from ray import serve
    from llmserve import LLMConfig, build_openai_app

    config = LLMConfig(model_loading_config={"model_id": "qwen", "model_source": "Qwen/Qwen2.5-0.5B-Instruct"})
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=True)
"""

from llmserve.builder import LLMServingArgs, build_openai_app
from llmserve.config import CloudMirrorConfig, DeploymentConfig, LLMConfig, LoraConfig, ModelLoadingConfig
from llmserve.ingress import OpenAiIngress
from llmserve.server import LLMServer

__all__ = [
    "CloudMirrorConfig",
    "DeploymentConfig",
    "LLMConfig",
    "LLMServer",
    "LLMServingArgs",
    "LoraConfig",
    "ModelLoadingConfig",
    "OpenAiIngress",
    "build_openai_app",
]
