"""The package as users get it, outside Docker: the wheel installed into a fresh virtual
environment. With the server extra (the CPU image's install steps): `gradserve-server`
started from there, away from the repository, and a job run with that environment's
`gradserve-client`. Alone (`pip install gradserve`): a thin client, without torch, whose
CLI runs a job on a real server."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from tests.servers import run_server

ROOT = pathlib.Path(__file__).parents[2]


def run(*cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT))
    (built,) = out.glob("gradserve-*.whl")
    return built


def fresh_venv(path: pathlib.Path) -> list[str]:
    """A virtual environment without the test's packages; its pip install command."""
    run(sys.executable, "-m", "venv", str(path))
    return [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet",
            "--disable-pip-version-check"]  # fmt: skip


def test_wheel_installs_and_serves_from_a_fresh_environment(wheel, tmp_path):
    venv = tmp_path / "venv"
    pip = fresh_venv(venv)
    # CPU torch first, as scripts/setup.sh does, so the extra pulls no CUDA build.
    run(*pip, os.environ.get("GRADSERVE_CPU_TORCH_SPEC", "torch==2.13.0"))
    run(*pip, f"{wheel}[server]")
    # The CPU image removes triton again (GPUs only): the server runs without it.
    run(str(venv / "bin" / "python"), "-m", "pip", "uninstall", "--yes", "--quiet", "triton")

    # Nothing of the repository on the path: a packaging mistake (a module left out of the
    # wheel, a wrong entry point) fails here.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    with run_server(
        program=[str(venv / "bin" / "gradserve-server")], env=env, cwd=str(work)
    ) as server:
        client = [str(venv / "bin" / "gradserve-client"), "--address", server.address]
        run(*client, "example", str(work), cwd=work, env=env)
        summary = json.loads(
            run(
                *client,
                "compute",
                str(work / "notebook-2-2-1.safetensors"),
                str(work / "out.safetensors"),
                "--json",
                cwd=work,
                env=env,
            )
        )
        assert run(*client, "health", cwd=work, env=env).strip() == "SERVING"
    assert summary["engine"] == "torch" and len(summary["loss"]) == 1
    assert (work / "out.safetensors").stat().st_size > 0
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for expected in (
        "gradserve/v1/gradserve_pb2.py",
        "gradserve/v1/gradserve.proto",
        "gradserve/v1/wire.py",
        "gradserve/kernels/triton_fused.py",
        "gradserve/server/app.py",
        "gradserve/client/_cli.py",
    ):
        assert expected in names
    # Only namespaced packages: nothing installs a top-level client, server, kernels, proto.
    assert {n.split("/")[0] for n in names if not n.startswith("gradserve-")} == {"gradserve"}


def test_the_base_install_is_a_thin_client_that_runs_a_job(wheel, server, tmp_path):
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    run(*fresh_venv(venv), str(wheel))
    installed = run(python, "-m", "pip", "list", "--format=freeze")
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert {"gradserve", "grpcio", "protobuf", "numpy"} <= names
    assert not names & {"torch", "triton"}
    # Type hints ship with the packages (PEP 561), for users' type checkers.
    where = run(python, "-c", "import gradserve.client as c; print(c.__path__[0])").strip()
    for package in ("client", "v1"):
        assert (pathlib.Path(where).parent / package / "py.typed").is_file()

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    client = [str(venv / "bin" / "gradserve-client"), "--address", server.address]
    run(*client, "example", str(tmp_path), env=env)
    job, out = tmp_path / "notebook-2-2-1.safetensors", tmp_path / "grads.safetensors"
    summary = json.loads(run(*client, "compute", str(job), str(out), "--json", env=env))
    assert len(summary["loss"]) == 1 and out.stat().st_size > 0
