"""The Dockerfile's install steps outside Docker: build the wheel, install it (with the
server extra) into a fresh virtual environment, start `gradserve-server` from there, away
from the repository, and run a job with that environment's `gradserve-client`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import zipfile

from tests.servers import run_server

ROOT = pathlib.Path(__file__).parents[2]


def run(*cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_wheel_installs_and_serves_from_a_fresh_environment(tmp_path):
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--quiet",
        "-w",
        str(tmp_path / "w"),
        str(ROOT),
    )
    (wheel,) = (tmp_path / "w").glob("gradserve-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    # CPU torch first, as scripts/setup.sh does, so the extra pulls no CUDA build.
    run(*pip, os.environ.get("GRADSERVE_CPU_TORCH_SPEC", "torch==2.13.0"))
    run(*pip, f"{wheel}[server]")

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
