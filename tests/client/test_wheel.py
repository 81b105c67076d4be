"""The package as users get it: the wheel, installed alone into a fresh virtual environment,
is a thin client (grpcio, protobuf, numpy; no torch) whose CLI runs a job on a real server."""

import glob
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args, **kw):
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{args}\n{out.stdout}\n{out.stderr}"
    return out


def test_the_wheel_installs_a_thin_client_that_runs_a_job(server, tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
        str(ROOT))  # fmt: skip
    (wheel,) = glob.glob(str(tmp_path / "dist" / "gradserve-*.whl"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel)

    installed = run(str(python), "-m", "pip", "list", "--format=freeze").stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert {"gradserve", "grpcio", "protobuf", "numpy"} <= names
    assert not names & {"torch", "triton"}
    site = Path(run(str(python), "-c", "import gradserve.client as c; print(c.__file__)").stdout)
    for package in ("client", "v1"):
        assert (site.parent.parent / package / "py.typed").is_file()

    env = {**os.environ, "GRADSERVE_ADDRESS": server.address}
    client = str(venv / "bin" / "gradserve-client")
    run(client, "example", str(tmp_path / "jobs"), env=env)
    (job,) = glob.glob(str(tmp_path / "jobs" / "notebook-*.safetensors"))
    out = run(client, "compute", job, str(tmp_path / "grads.safetensors"), env=env)
    assert ": loss [" in out.stdout and (tmp_path / "grads.safetensors").is_file()
