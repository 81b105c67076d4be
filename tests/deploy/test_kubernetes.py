"""The Kubernetes manifests parse and carry the GPU request, gRPC probes, headless Service."""

import pathlib

import yaml

MANIFEST = pathlib.Path(__file__).parents[2] / "deploy" / "kubernetes" / "gradserve.yaml"


def documents():
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def test_deployment_requests_a_gpu_and_probes_grpc_health():
    deployment = documents()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GRADSERVE_MAX_CONNECTION_AGE_S"] == "300"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["GRADSERVE_DRAIN_GRACE_S"])


def test_deployment_environment_is_a_valid_server_configuration():
    from gradserve.server.config import parse_config

    deployment = documents()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    parse_config([], environ={e["name"]: e["value"] for e in container["env"]})


def test_service_is_headless_for_client_side_round_robin():
    service = documents()["Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in service["spec"]["ports"]} == {50051, 9100}
