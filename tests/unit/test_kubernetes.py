"""The RayService manifests under examples/kubernetes/: their serveConfigV2 goes through what
`serve deploy` (and KubeRay, which posts the same config) does with it: Serve's deploy schema,
then the controller's build of each application from its import_path and args."""

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

MANIFESTS = sorted((REPO / "examples" / "kubernetes").glob("ray-service.*.yaml"))


def serve_config(manifest: Path) -> dict:
    service = yaml.safe_load(manifest.read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == __import__("ray").__version__
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_there_is_a_cpu_and_a_gpu_manifest():
    assert [manifest.name for manifest in MANIFESTS] == ["ray-service.cpu.yaml", "ray-service.gpu.yaml"]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.stem)
def test_serve_config_v2_builds_as_serve_deploy_would(manifest, monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setattr("llmserve.placement.gpus_present", lambda: "gpu" in manifest.stem)
    schema = ServeDeploySchema.model_validate(serve_config(manifest))
    (application,) = schema.applications
    assert application.import_path == "llmserve:build_openai_app"
    app = call_user_app_builder_with_args_if_necessary(import_attr(application.import_path), application.args)
    built = build_app(app, name=application.name, route_prefix=application.route_prefix)
    names = sorted(deployment.name for deployment in built.deployments)
    (model,) = application.args["llm_configs"]
    assert names == ["LLMServer:" + model["model_loading_config"]["model_id"], "OpenAiIngress"]
    server = next(deployment for deployment in built.deployments if deployment.name.startswith("LLMServer"))
    scaling = server._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 64)
    if "gpu" in manifest.stem:
        assert server.ray_actor_options["num_gpus"] == 1 and server.ray_actor_options["accelerator_type"] == "L4"
        assert scaling.policy.policy_function == "llmserve.autoscaling:TtftPolicy"
