"""NaN in one sample's inputs: that model's loss and gradients are NaN, that sample's own
results are NaN and its other samples' are not, and every other model's results are exact,
on the triton engine as in the float64 oracle (jobs accept NaN with allow_non_finite).

On a GPU this checks the kernels' NaN handling: relu, for one, keeps NaN there only because
it asks for it (the GPU's plain max returns 0; under the interpreter numpy's max keeps NaN
anyway). tf32 and float32 as three tf32 products are left out: their operand rounding turns
the GPU's canonical NaN (0x7FFFFFFF) into -0 (triton_common.round_to_tf32), so NaN does not
survive a tf32 layer there.
"""

import pytest
import torch

from gradserve.kernels import triton_engine
from tests.jobs import ensemble_job, random_job
from tests.oracle import assert_close_per_model, engine_tensors, oracle_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRECISIONS = [p for p in ("float32", "float16", "bfloat16") if p in triton_engine.precisions()]
SIZES, M, N, BAD_MODEL, BAD_SAMPLE = (5, 13, 7, 3), 3, 37, 1, 4


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("hidden", ["relu", "tanh"])
def test_nan_stays_in_its_model_and_sample(precision, hidden):
    tensors = random_job(SIZES, M, N, seed=11)
    tensors["inputs"][BAD_MODEL, BAD_SAMPLE, 2] = float("nan")
    job = ensemble_job(tensors, SIZES, hidden=hidden, precision=precision)
    got = engine_tensors(triton_engine.run(job, DEVICE))
    ref = oracle_for(SIZES, tensors, hidden=hidden)

    assert torch.isnan(got["loss"][BAD_MODEL])
    for name in ref.grads:
        assert torch.isnan(got[name][BAD_MODEL]).any(), name
    others = [s for s in range(N) if s != BAD_SAMPLE]
    for name in ("per_sample_loss", "inputs.grad", "outputs"):  # per sample
        bad = got[name][BAD_MODEL]
        assert torch.isnan(bad[BAD_SAMPLE]).all(), name
        assert torch.isfinite(bad[others]).all(), name
    good = [k for k in range(M) if k != BAD_MODEL]
    expected = {
        "loss": ref.loss,
        "inputs.grad": ref.input_grads,
        "per_sample_loss": ref.per_sample_loss,
        "outputs": ref.outputs,
        **ref.grads,
    }
    for name, value in expected.items():
        assert_close_per_model(name, got[name][good], value[good], precision)
