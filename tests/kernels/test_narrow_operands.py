"""bfloat16 and float16 jobs: operands rounded to that dtype, products accumulated and kept
in float32, in both engines (DESIGN.md section 2's precisions).

The job is built so that every rounded operand is known exactly: one layer, identity output
and the l1 loss summed, so that dLoss/dy is +-1 (exact in every dtype) and the layer's only
operands are the job's own inputs and weights. A float64 model that rounds those two and
computes exactly then leaves only float32's accumulation error (about 1e-7). A result
rounded to the narrow dtype (torch's bfloat16 GEMMs on the CPU round their results) is
about 1e-3 off.
"""

import pytest
import torch

from gradserve.kernels import torch_engine, triton_engine
from tests.jobs import ensemble_job, random_job
from tests.oracle import assert_close_per_model

NARROW = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 accumulation of at most 150 exact products, against float64's.
FLOAT32_SUMS = 1e-6


def rounded_model(tensors: dict, narrow: torch.dtype) -> dict[str, torch.Tensor]:
    """Outputs and gradients of a one-layer identity network under the summed l1 loss, in
    float64 from the operands rounded to `narrow`."""

    def r(t):
        return t.to(narrow).double()

    x, w = r(tensors["inputs"]), r(tensors["layers.0.weight"])  # [M, N, d0], [M, d1, d0]
    y = x @ w.transpose(1, 2) + tensors["layers.0.bias"].double().unsqueeze(1)
    dy = torch.sign(y - tensors["targets"].double())  # exact in every dtype
    return {
        "outputs": y,
        "layers.0.weight.grad": dy.transpose(1, 2) @ x,
        "layers.0.bias.grad": dy.sum(dim=1),
        "inputs.grad": dy @ w,
    }


def engine_results(result) -> dict[str, torch.Tensor]:
    return {
        "outputs": result.outputs,
        "layers.0.weight.grad": result.weight_grads[0],
        "layers.0.bias.grad": result.bias_grads[0],
        "inputs.grad": result.input_grads,
    }


def run(engine: str, tensors: dict, sizes, precision: str):
    job = ensemble_job(tensors, sizes, output="identity", loss="l1", reduction="sum",
                       precision=precision)  # fmt: skip
    if engine == "torch":
        return torch_engine.run(job)
    if precision not in triton_engine.precisions():
        pytest.skip(f"Triton's interpreter cannot compute {precision} dots; checked on GPU")
    return triton_engine.run(job, DEVICE)


@pytest.mark.parametrize("sizes", [(13, 7), (150, 3)], ids=["fused", "per_layer"])
@pytest.mark.parametrize("precision", sorted(NARROW))
@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_rounded_operands_with_float32_results(engine, precision, sizes):
    if engine == "torch" and sizes[0] > 128:
        pytest.skip("one path in the torch engine")
    tensors = random_job(sizes, 3, 37, seed=11)
    got = engine_results(run(engine, tensors, sizes, precision))
    for name, value in rounded_model(tensors, NARROW[precision]).items():
        assert got[name].dtype == torch.float32, name
        assert_close_per_model(name, got[name].cpu(), value, precision, tol=FLOAT32_SUMS)
