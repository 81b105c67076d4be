"""The contract: generated modules are current, and buf lint accepts the .proto."""

import filecmp
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATED = ["gradserve_pb2.py", "gradserve_pb2.pyi", "gradserve_pb2_grpc.py"]


def test_generated_modules_match_the_proto(tmp_path):
    proto = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto)
    for name in GENERATED:
        (proto / "gradserve" / "v1" / name).unlink()
    subprocess.run(
        [
            "make",
            "-C",
            str(ROOT),
            "proto",
            f"PY={sys.executable}",
            f"PROTO_DIR={proto}",
            f"PROTO_FILES={proto}/gradserve/v1/gradserve.proto",
        ],
        check=True,
        capture_output=True,
    )
    stale = [
        n
        for n in GENERATED
        if not filecmp.cmp(
            proto / "gradserve/v1" / n, ROOT / "proto/gradserve/v1" / n, shallow=False
        )
    ]
    assert not stale, f"run `make proto`: {stale} are stale"


def test_buf_lint_passes():
    out = subprocess.run(
        ["npx", "--yes", "@bufbuild/buf", "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
