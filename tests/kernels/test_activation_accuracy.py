"""Activations, their derivatives and the losses keep float32's digits across the whole
range of pre-activations and logits, not only near 1.

Random test jobs keep pre-activations and losses near 1, where the textbook forms are fine.
Checked here, elementwise against float64 and end to end against the oracle on both
engines: small pre-activations (the Triton kernels' tanh, as 2 sigmoid(2z) - 1, cancelled:
at |z| ~ 1e-3 it kept 3 of float32's 7 digits), very negative ones (softplus as
log(1 + e^z) loses e^z below 1's last place: softplus(-15) was 0), and confidently right
logits (torch's own binary_cross_entropy_with_logits and cross_entropy compute gradients
sigmoid(y) - t and e_t / total - 1, which cancel there: at a margin of 8 the gradients
were 1e-4 off, in both engines).
"""

import functools

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from gradserve import kernels
from gradserve.kernels import functional, torch_engine, triton_engine
from gradserve.kernels.triton_common import (
    ACTIVATION_CODES,
    PRECISION_CODES,
    TEXTBOOK_SOFTPLUS,
    TEXTBOOK_TANH,
    TF32X3,
    activate,
    activation_grad,
    textbook_forms,
)
from tests.jobs import ensemble_job, random_job
from tests.oracle import activation_module, assert_matches_oracle, engine_tensors, oracle_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOPE = 0.01
FLOAT32_EPS = float(np.finfo(np.float32).eps)
# Below float32's smallest normal number results are subnormal, with fewer digits than eps
# (sigmoid(-100) = 3.7e-44): errors up to it count as none.
TINY = float(np.finfo(np.float32).tiny)


@triton.jit
def _pointwise_kernel(z_ptr, out_ptr, grad_ptr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    z = tl.load(z_ptr + offs)
    tl.store(out_ptr + offs, activate(z, ACT, SLOPE))
    tl.store(grad_ptr + offs, activation_grad(z, ACT, SLOPE))


def kernel_values(z: torch.Tensor, name: str, code: int | None = None):
    block = 128
    padded = torch.zeros(triton.cdiv(z.numel(), block) * block, device=DEVICE)
    padded[: z.numel()] = z
    out, grad = torch.empty_like(padded), torch.empty_like(padded)
    # the interpreter computes in numpy, which warns where exp overflows to inf and where
    # inf * 0 is NaN: the kernels count on both, as on GPUs
    with np.errstate(over="ignore", invalid="ignore"):
        _pointwise_kernel[(padded.numel() // block,)](
            padded, out, grad, ACT=ACTIVATION_CODES[name] if code is None else code, BLOCK=block
        )
    return out[: z.numel()].cpu().numpy(), grad[: z.numel()].cpu().numpy()


def torch_values(z: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The activation and its autograd derivative, computed by torch in z's dtype."""
    z = z.clone().requires_grad_(True)
    out = activation_module(name, SLOPE)(z)
    (grad,) = torch.autograd.grad(out.sum(), z)
    return out.detach().double().numpy(), grad.double().numpy()


def derivative_terms(z: torch.Tensor, name: str) -> np.ndarray:
    """The size of the terms torch and the kernels sum into a derivative (1 - tanh(z)^2,
    silu's s + z s (1 - s), gelu's Phi(z) + z phi(z)): where they cancel, a rounding of a term
    is a large part of the result, in torch's float32 as in the kernels' (gelu's Phi(z) is
    0.5 (1 + erf(z / sqrt 2)), whose terms cancel far below 0)."""
    z = z.double()
    if name == "tanh":
        return (1.0 + torch.tanh(z) ** 2).numpy()
    if name == "silu":
        s = torch.sigmoid(z)
        return (s + (z * s * (1 - s)).abs()).numpy()
    if name == "gelu":
        phi = torch.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
        return (0.5 * (1 + torch.erf(z / np.sqrt(2.0)).abs()) + (z * phi).abs()).numpy()
    return np.zeros(z.shape)


def sweep() -> torch.Tensor:
    """Both signs of magnitudes from 1e-7 to 120, log-spaced, and zero."""
    magnitudes = torch.logspace(-7, np.log10(120.0), 700, dtype=torch.float64)
    return torch.cat([-magnitudes.flip(0), torch.zeros(1, dtype=torch.float64), magnitudes])


@pytest.mark.parametrize("name", kernels.ACTIVATIONS)
def test_activations_and_derivatives_are_as_accurate_as_torchs(name):
    z = sweep().float()  # exact float32 values, so float64 of them is the truth
    truth = torch_values(z.double(), name)
    ours = kernel_values(z, name)
    torchs = torch_values(z, name)
    terms = (np.abs(truth[0]), derivative_terms(z, name))
    for what, got, reference, exact, size in zip(
        ("value", "derivative"), ours, torchs, truth, terms, strict=True
    ):
        # torch's own float32 error (gelu's erf form cancels far below 0) and a few
        # roundings of the result and the terms summed into it (the GPU's exp and
        # division are approximate to 2 ulp)
        bound = 2 * np.abs(reference - exact) + 8 * FLOAT32_EPS * (np.abs(exact) + size) + TINY
        error = np.abs(got.astype(np.float64) - exact)
        worst = int(np.argmax(error - bound))
        assert (error <= bound).all(), (
            f"{name} {what} at z={z[worst].item()!r}: {got[worst]!r}, float64 {exact[worst]!r}, "
            f"torch float32 {reference[worst]!r}"
        )


@pytest.mark.parametrize("name, code", [("tanh", TEXTBOOK_TANH), ("softplus", TEXTBOOK_SOFTPLUS)])
def test_textbook_forms_err_by_an_ulp_of_one(name, code):
    """The forms the fused kernel computes tanh and softplus with for tf32, bfloat16 and
    float16 products (textbook_forms): off by a few float32 roundings of 1 (so digits lost
    where the value is far below 1), their derivatives as accurate as the exact forms'."""
    z = sweep().float()
    truth = torch_values(z.double(), name)
    torchs = torch_values(z, name)
    got, grad = kernel_values(z, name, code)
    assert np.abs(got - truth[0]).max() <= 4 * FLOAT32_EPS
    exact_grad = kernel_values(z, name)[1]
    np.testing.assert_allclose(grad, exact_grad, rtol=8 * FLOAT32_EPS, atol=4 * FLOAT32_EPS)
    assert np.abs(grad - truth[1]).max() <= 2 * np.abs(torchs[1] - truth[1]).max() + 4 * FLOAT32_EPS
    for precision in ("tf32", "bfloat16", "float16"):
        assert textbook_forms(ACTIVATION_CODES[name], PRECISION_CODES[precision]) == code
    for precision in (PRECISION_CODES["float32"], TF32X3):
        assert textbook_forms(ACTIVATION_CODES[name], precision) == ACTIVATION_CODES[name]


@pytest.mark.parametrize("name", kernels.ACTIVATIONS)
def test_activations_of_infinities_and_nan_are_torchs(name):
    z = torch.tensor([float("inf"), float("-inf"), float("nan")])
    got, _ = kernel_values(z, name)
    expected, _ = torch_values(z, name)
    if name == "gelu":  # torch's gelu(inf) is NaN; the kernels give the limit, inf
        expected[0] = np.inf
    np.testing.assert_array_equal(got, expected.astype(np.float32))


ENGINES = {
    "torch": torch_engine.run,
    "triton_fused": functools.partial(triton_engine.run, path="fused"),
    "triton_per_layer": functools.partial(triton_engine.run, path="per_layer"),
    "gluon_fused": functools.partial(triton_engine.run, float32_matmul="gluon", path="fused"),
}


def check_engine(engine, sizes, tensors, **options):
    job = ensemble_job(tensors, sizes, **options)
    got = engine_tensors(ENGINES[engine](job, DEVICE))
    assert_matches_oracle(got, oracle_for(sizes, tensors, **options), "float32")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("hidden", ["tanh", "softplus"])
@pytest.mark.parametrize("sizes", [(5, 13, 7, 3), (5, 13, 7, 9)], ids=["narrow_out", "wide_out"])
def test_pre_activations_far_from_one_match_the_oracle(sizes, hidden, engine):
    tensors = random_job(sizes, 2, 37, seed=4)
    if hidden == "tanh":  # pre-activations of about 1e-3
        for name in tensors:
            if name != "targets":
                tensors[name] = tensors[name] * 1e-3
    else:  # hidden pre-activations of about -8 (e^z ~ 3e-4) to -15
        for i in range(len(sizes) - 2):
            shift = torch.linspace(-8.0, -15.0, sizes[i + 1])
            tensors[f"layers.{i}.bias"] = tensors[f"layers.{i}.bias"] + shift
    check_engine(engine, sizes, tensors, hidden=hidden)


@pytest.mark.parametrize("engine", ENGINES)
def test_logistic_loss_of_confident_logits_matches_the_oracle(engine):
    """Logits of magnitude 8 to 16 on their targets' side (and one at 0, where the
    derivative is 1/2 - t): per-sample losses of 3e-4 and less."""
    sizes = (1, 3)
    tensors = random_job(sizes, 2, 37, loss="bce_with_logits", seed=6)
    x = tensors["inputs"]
    tensors["inputs"] = x.sign() * (4.0 + x.abs().clamp(max=1.0))
    tensors["inputs"][0, 0] = 0.0
    tensors["layers.0.weight"] = torch.tensor([2.0, 2.5, 3.2]).expand(2, 3).unsqueeze(-1).clone()
    tensors["layers.0.bias"] = torch.zeros(2, 3)
    logits = tensors["inputs"] @ tensors["layers.0.weight"].transpose(1, 2)
    assert (logits.abs() >= 8.0).sum() == logits.numel() - 3
    tensors["targets"] = (logits > 0).float()
    check_engine(engine, sizes, tensors, hidden="identity", loss="bce_with_logits")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("classes", [2, 5, 20])
def test_cross_entropy_of_confident_logits_matches_the_oracle(classes, engine):
    """Each sample's logit for its class about 8 above the others (in model 1, three
    samples' class is not the largest logit)."""
    sizes = (classes, classes)
    gen = torch.Generator().manual_seed(classes)
    label = torch.randint(0, classes, (2, 37), generator=gen)
    onehot = torch.nn.functional.one_hot(label, classes).float()
    tensors = {
        "layers.0.weight": torch.eye(classes)
        + torch.randn(2, classes, classes, generator=gen) * 0.01,
        "layers.0.bias": torch.randn(2, classes, generator=gen) * 0.1,
        "inputs": onehot * 8.0 + torch.randn(2, 37, classes, generator=gen) * 0.5,
        "targets": label,
    }
    tensors["targets"][1, :3] = (label[1, :3] + 1) % classes  # model 1: confidently wrong
    check_engine(engine, sizes, tensors, hidden="identity", loss="cross_entropy")


def test_the_torch_engines_hand_written_loss_gradients_pass_gradcheck():
    """functional's logistic and cross-entropy losses differentiate by hand: their backward
    agrees with finite differences in float64, at logits of every size and at 0."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64) * 6
    y[0, 0] = 0.0
    y.requires_grad_(True)
    t = torch.rand(2, 7, 5, generator=gen, dtype=torch.float64)
    t[1] = (t[1] > 0.5).double()
    labels = torch.randint(0, 5, (2, 7), generator=gen)
    assert torch.autograd.gradcheck(lambda y: functional._LogisticLoss.apply(y, t), (y,))
    assert torch.autograd.gradcheck(lambda y: functional.cross_entropy(y, labels), (y,))
    loss = kernels.LossSpec("bce_with_logits")
    expected = torch.nn.functional.binary_cross_entropy_with_logits(y, t, reduction="none")
    torch.testing.assert_close(functional.per_sample_loss(y, t, loss, None), expected.sum(-1))
    expected = torch.nn.functional.cross_entropy(y.transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(functional.cross_entropy(y, labels), expected)
