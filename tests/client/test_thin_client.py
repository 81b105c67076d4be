"""The base install is a thin client: it imports and runs a job with torch and triton absent."""

import subprocess
import sys
import textwrap


def test_client_runs_a_job_without_torch_or_triton(server):
    script = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "triton"):
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        import numpy as np
        from gradserve.client import GradientClient

        rng = np.random.default_rng(0)
        params = {{
            "layers.0.weight": rng.standard_normal((3, 4, 2)),
            "layers.0.bias": rng.standard_normal((3, 4)),
            "layers.1.weight": rng.standard_normal((3, 1, 4)),
            "layers.1.bias": rng.standard_normal((3, 1)),
        }}
        with GradientClient("{server.address}") as client:
            r = client.compute(params, rng.standard_normal((6, 2)), rng.standard_normal((6, 1)))
        assert r.loss.shape == (3,) and r.gradients["layers.0.weight"].shape == (3, 4, 2)
        assert not any(m.split(".")[0] in ("torch", "triton") for m in sys.modules)
        print("thin client ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "thin client ok" in out.stdout
