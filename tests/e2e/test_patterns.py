"""The bind pattern and the older API names serve requests on real Ray Serve + vLLM."""

from ray import serve

from tests.e2e.conftest import ask, tiny_config, wait_for_http


def test_bind_pattern_and_legacy_names(serve_port, tiny_model_paths):
    from llmserve import LLMConfig
    from llmserve.builders import build_openai_app as legacy_builder
    from llmserve.configs import LLMConfig as LegacyConfig
    from llmserve.deployment import LLMServer
    from llmserve.deployments import LLMRouter, VLLMService
    from llmserve.ingress import OpenAiIngress

    assert LegacyConfig is LLMConfig and VLLMService is LLMServer and LLMRouter is OpenAiIngress
    assert legacy_builder.__module__ == "llmserve.builder"

    current = tiny_config("bound", tiny_model_paths["tiny-a"])
    deployment = LLMServer.as_deployment(current.get_serve_options(name_prefix="vLLM:")).bind(current)
    serve.run(OpenAiIngress.as_deployment().bind([deployment]), name="bind", route_prefix="/bind")

    legacy = tiny_config("legacy", tiny_model_paths["tiny-b"])
    legacy_deployment = VLLMService.as_deployment().bind(legacy)
    serve.run(LLMRouter.as_deployment({"name": "LegacyRouter"}).bind([legacy_deployment]), name="legacy", route_prefix="/legacy")

    base = f"http://127.0.0.1:{serve_port}"
    for prefix, model in (("/bind", "bound"), ("/legacy", "legacy")):
        wait_for_http(base + prefix + "/v1/models")
        answer = ask(base + prefix, model)
        assert answer.model == model and answer.choices[0].message.content is not None
    serve.delete("bind")
    serve.delete("legacy")
