"""Before its first CPU job, the torch engine calls every activation and loss on tiny
tensors (one thread): torch's threads cannot safely make the first call of some vectorised
math functions together (see torch_engine._prime_cpu_math)."""

import json
import subprocess
import sys
import textwrap

from gradserve.kernels.spec import ACTIVATIONS, LOSSES

# A fresh interpreter: the test process has long made its first calls.
PROBE = textwrap.dedent(
    """
    import json, torch
    from gradserve.kernels import torch_engine as te
    from tests.jobs import ensemble_job, random_job

    calls = []
    inner = te._run
    def spy(job, device):
        calls.append([job.num_models, job.mlp.hidden_activation.name,
                      job.mlp.output_activation.name, job.loss.name, job.precision])
        return inner(job, device)
    te._run = spy
    tensors = random_job((16, 32, 32, 1), 64, 128, shared_inputs=True, seed=3)
    te.run(ensemble_job(tensors, (16, 32, 32, 1), hidden="tanh"))
    te.run(ensemble_job(tensors, (16, 32, 32, 1), hidden="sigmoid"))
    print(json.dumps(calls))
    """
)


def test_first_cpu_job_is_preceded_by_tiny_calls_of_every_activation_and_loss():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    calls = json.loads(out)
    *priming, job_a, job_b = calls
    assert job_a[:2] == [64, "tanh"] and job_b[:2] == [64, "sigmoid"]  # primed only once
    assert all(models == 2 for models, *_ in priming)  # far below torch's parallel grain
    for precision in ("float32", "float64"):
        done = [c for c in priming if c[4] == precision]
        assert {c[1] for c in done} == set(ACTIVATIONS) == {c[2] for c in done}
        assert {c[3] for c in done} == set(LOSSES)
