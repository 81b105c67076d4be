"""docker-compose.yml, checked by a real compose implementation (Debian's docker-compose,
installed by the test command): no Docker engine is needed for `config`."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).parents[2]
PROFILES = ["--profile", "cpu", "--profile", "replicas", "--profile", "monitoring"]


@pytest.fixture(scope="module")
def compose() -> dict:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed (scripts/test.sh installs it)")
    out = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), *PROFILES, "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_gpu_service_reserves_one_nvidia_gpu(compose):
    for name in ("gradserve", "gradserve-replica"):
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in compose["services"]["gradserve-cpu"]


@pytest.mark.parametrize("name", ["gradserve", "gradserve-cpu", "gradserve-replica"])
def test_healthcheck_uses_the_images_health_client(compose, name):
    test = compose["services"][name]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "gradserve-client" and test[-1] == "health"
    assert "127.0.0.1:50051" in test


@pytest.mark.parametrize("name", ["gradserve", "gradserve-cpu"])
def test_ports_and_environment_match_the_readme(compose, name):
    service = compose["services"][name]
    published = {
        (p["target"], int(p["published"]))
        if isinstance(p, dict)
        else tuple(int(x) for x in p.split(":"))
        for p in service["ports"]
    }
    assert published == {(50051, 50051), (9100, 9100)}
    env = service["environment"]
    assert env["GRADSERVE_HOST"] == "0.0.0.0" and env["GRADSERVE_PORT"] == "50051"
    assert env["GRADSERVE_METRICS_PORT"] == "9100"
    readme = (ROOT / "README.md").read_text()
    for variable in env:
        flag = "--" + variable.removeprefix("GRADSERVE_").lower().replace("_", "-")
        assert flag in readme, f"{variable} is not documented in the README"
    assert service["restart"] == "unless-stopped"


def test_every_services_environment_is_a_valid_server_configuration(compose):
    """The server would start with what each service sets (its flag checks refuse bad
    values at start, which in a container means a restart loop)."""
    from gradserve.server.config import parse_config

    for service in compose["services"].values():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        if any(k.startswith("GRADSERVE_") for k in env):
            parse_config([], environ=env)  # SystemExit on a value the server refuses


def test_load_balancer_uses_the_tested_nginx_template(compose):
    from tests.server.test_load_balancer import TEMPLATE

    lb = compose["services"]["lb"]
    mounts = [v["source"] if isinstance(v, dict) else v.split(":")[0] for v in lb["volumes"]]
    assert pathlib.Path(mounts[0]).resolve() == TEMPLATE.resolve()
    assert lb["depends_on"]["gradserve-replica"]["condition"] == "service_healthy"


def test_nginx_accepts_the_template_as_compose_renders_it(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    template = (ROOT / "deploy/nginx/gradserve.conf.template").read_text()
    # As the lb service's envsubst renders it, with a resolvable stand-in for the replicas.
    conf = (
        template.replace("${UPSTREAM_SERVERS}", "server 127.0.0.1:50051;")
        .replace("${LISTEN}", "0.0.0.0:8080")
        .replace("${RUNTIME_DIR}", str(tmp_path))
    )
    (tmp_path / "nginx.conf").write_text(conf)
    out = subprocess.run(
        [nginx, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def test_the_gpu_server_keeps_its_kernel_cache_in_a_volume_of_its_own(compose):
    """Compiled kernels survive a restart; replicas do not share (and prune) one cache."""
    import re

    dockerfile = (ROOT / "Dockerfile").read_text()
    gpu_stage = dockerfile[dockerfile.index("AS gpu") :]
    cache_dir = re.search(r"ENV TRITON_CACHE_DIR=(\S+)", gpu_stage)[1]
    assert 'mkdir -p "${TRITON_CACHE_DIR}"' in gpu_stage and "chown -R gradserve" in gpu_stage

    def named_volumes(service: str) -> dict[str, str]:  # volume -> mount point
        found = {}
        for v in compose["services"][service]["volumes"]:
            if isinstance(v, dict):  # long syntax (compose v2)
                source, target, named = v["source"], v["target"], v["type"] == "volume"
            else:  # "source:target[:mode]" (compose v1)
                source, target = v.split(":")[:2]
                named = not source.startswith(("/", "."))
            if named:
                found[source] = target
        return found

    mounts = named_volumes("gradserve")
    assert list(mounts) == ["kernel-cache"] and "kernel-cache" in compose["volumes"]
    assert cache_dir.startswith(mounts["kernel-cache"] + "/")
    assert named_volumes("gradserve-replica") == {}


def test_the_gpu_image_installs_the_torch_the_kernels_were_timed_with():
    """The GPU image's torch (and with it the triton it pins) is the one of the latest GPU
    benchmark run, so that the image runs the kernels as checked and timed on the card."""
    import re

    dockerfile = (ROOT / "Dockerfile").read_text()
    gpu_stage = dockerfile[dockerfile.index("AS gpu") :]
    version = re.search(r'ARG GPU_TORCH_SPEC="torch==([0-9.]+)"', gpu_stage)[1]
    cuda = re.search(
        r"ARG GPU_TORCH_INDEX_URL=https://download.pytorch.org/whl/(cu\d+)", gpu_stage
    )[1]
    results = (ROOT / "bench" / "results" / "kernels_gpu_h100.md").read_text()
    latest = results[results.index("## Latest run") :].split("\n## ")[0]
    assert f"torch {version}+{cuda}" in " ".join(latest.split())
