"""The independent float64 oracle: a plain loop over models of torch.nn modules + autograd.

Shares no code with the engines: it builds one nn.Sequential per model, applies torch.nn's
own losses per sample, and reduces by the documented rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def activation_module(name: str, negative_slope: float = 0.01) -> nn.Module:
    return {
        "identity": nn.Identity,
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "softplus": nn.Softplus,
    }[name]()


@dataclass
class OracleResult:
    loss: torch.Tensor  # [M]
    grads: dict[str, torch.Tensor]  # "layers.{i}.weight.grad" etc, [M, ...]
    input_grads: torch.Tensor  # [M, N, d0]
    per_sample_loss: torch.Tensor  # [M, N]
    outputs: torch.Tensor  # [M, N, dL]

    def by_name(self) -> dict[str, torch.Tensor]:
        """Every result by wire name, as tests.oracle.engine_tensors names an engine's."""
        return {
            "loss": self.loss,
            "inputs.grad": self.input_grads,
            "per_sample_loss": self.per_sample_loss,
            "outputs": self.outputs,
            **self.grads,
        }


def oracle(
    layer_sizes,
    params: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    hidden: str = "relu",
    output: str = "identity",
    negative_slope: float = 0.01,
    output_slope: float | None = None,  # the output activation's, if not negative_slope
    loss: str = "mse",
    reduction: str = "mean",
    huber_delta: float = 1.0,
    sample_weights: torch.Tensor | None = None,
) -> OracleResult:
    num_layers = len(layer_sizes) - 1
    m = params["layers.0.weight"].shape[0]
    losses, per_samples, outs, in_grads = [], [], [], []
    grads: dict[str, list[torch.Tensor]] = {}
    for k in range(m):
        mods: list[nn.Module] = []
        for i in range(num_layers):
            has_bias = f"layers.{i}.bias" in params  # else nn.Linear(..., bias=False)
            lin = nn.Linear(layer_sizes[i], layer_sizes[i + 1], bias=has_bias).double()
            with torch.no_grad():
                lin.weight.copy_(params[f"layers.{i}.weight"][k].double())
                if has_bias:
                    lin.bias.copy_(params[f"layers.{i}.bias"][k].double())
            mods.append(lin)
            if i < num_layers - 1:
                mods.append(activation_module(hidden, negative_slope))
            else:
                slope = negative_slope if output_slope is None else output_slope
                mods.append(activation_module(output, slope))
        net = nn.Sequential(*mods)
        x = (inputs if inputs.dim() == 2 else inputs[k]).double().clone().requires_grad_()
        t = targets if targets.dim() == (1 if loss == "cross_entropy" else 2) else targets[k]
        y = net(x)
        if loss == "cross_entropy":
            per = nn.CrossEntropyLoss(reduction="none")(y, t.long())
            count = y.shape[0]
        else:
            fn = {
                "mse": nn.MSELoss(reduction="none"),
                "l1": nn.L1Loss(reduction="none"),
                "huber": nn.HuberLoss(reduction="none", delta=huber_delta),
                "bce_with_logits": nn.BCEWithLogitsLoss(reduction="none"),
            }[loss]
            per = fn(y, t.double()).sum(dim=1)
            count = y.numel()
        if sample_weights is not None:
            w = sample_weights if sample_weights.dim() == 1 else sample_weights[k]
            per = per * w.double()
        total = per.sum() if reduction == "sum" else per.sum() / count
        total.backward()
        losses.append(total.detach())
        per_samples.append(per.detach())
        outs.append(y.detach())
        in_grads.append(x.grad)
        for i in range(num_layers):
            lin = net[2 * i]
            grads.setdefault(f"layers.{i}.weight.grad", []).append(lin.weight.grad)
            if lin.bias is not None:
                grads.setdefault(f"layers.{i}.bias.grad", []).append(lin.bias.grad)
    return OracleResult(
        loss=torch.stack(losses),
        grads={k: torch.stack(v) for k, v in grads.items()},
        input_grads=torch.stack(in_grads),
        per_sample_loss=torch.stack(per_samples),
        outputs=torch.stack(outs),
    )


# Relative-error bounds ||g - ref|| / ||ref|| per precision (DESIGN.md section 2).
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "tf32": 1e-3, "bfloat16": 1e-2, "float16": 1e-2}


def relative_errors(got, ref: torch.Tensor) -> list[float]:
    """Each model's relative L2 error of `got` against `ref` (both [M, ...])."""
    got = torch.as_tensor(got).double().cpu()
    ref = ref.double().cpu()
    # all-zero references: compare absolutely
    return [
        (got[k] - ref[k]).norm().item() / max(ref[k].norm().item(), 1e-6)
        for k in range(ref.shape[0])
    ]


def assert_close_per_model(
    name: str, got, ref: torch.Tensor, precision: str, tol: float | None = None
) -> None:
    """Check every model's slice of `got` against the oracle by relative L2 error."""
    got = torch.as_tensor(got).double()
    ref = ref.double()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    tol = TOLERANCE[precision] if tol is None else tol
    for k, rel in enumerate(relative_errors(got, ref)):
        scale = max(ref[k].norm().item(), 1e-6)
        if rel > tol:  # say where, so that a rare deviation can be diagnosed
            diff = (got[k] - ref[k]).abs().flatten()
            at = int(diff.argmax())
            raise AssertionError(
                f"{name} model {k}: rel err {rel:.3g} > {tol}; largest difference "
                f"{diff[at].item():.3g} at flat index {at} (got {got[k].flatten()[at].item()!r}, "
                f"oracle {ref[k].flatten()[at].item()!r}); {int((diff > tol * scale).sum())} of "
                f"{diff.numel()} elements differ by more than the bound"
            )


def oracle_for(layer_sizes, tensors: dict[str, torch.Tensor], **options) -> OracleResult:
    """The oracle on a tests.jobs.random_job() dict, with the engine's option names
    (hidden, output, negative_slope, output_slope, loss, reduction, huber_delta)."""
    return oracle(
        layer_sizes,
        tensors,
        tensors["inputs"],
        tensors["targets"],
        hidden=options.get("hidden", "relu"),
        output=options.get("output", "identity"),
        negative_slope=options.get("negative_slope", 0.01),
        output_slope=options.get("output_slope"),
        loss=options.get("loss", "mse"),
        reduction=options.get("reduction", "mean"),
        huber_delta=options.get("huber_delta", 1.0),
        sample_weights=tensors.get("sample_weights"),
    )


def engine_tensors(result) -> dict:
    """An engine's EnsembleResult as tensors by wire name, on the host."""
    named = {
        "loss": result.loss,
        "inputs.grad": result.input_grads,
        "per_sample_loss": result.per_sample_loss,
        "outputs": result.outputs,
    }
    for i, (w, b) in enumerate(
        zip(result.weight_grads or [], result.bias_grads or [], strict=True)
    ):
        named[f"layers.{i}.weight.grad"] = w
        named[f"layers.{i}.bias.grad"] = b
    return {k: torch.as_tensor(v).cpu() for k, v in named.items() if v is not None}


def assert_matches_oracle(
    got: dict, ref: OracleResult, precision: str, tol: float | None = None
) -> None:
    """Every result the oracle has (loss, every gradient, input gradients, per-sample losses,
    outputs) is present in `got` (tensors by wire name) and within tolerance, per model."""
    expected = ref.by_name()
    missing = sorted(set(expected) - set(got))
    assert not missing, f"results missing: {missing}"
    for name, value in expected.items():
        assert_close_per_model(name, got[name], value, precision, tol)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical bit patterns (torch.equal takes -0.0 for 0.0; NaNs for unequal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def assert_same_results(first: dict, second: dict, precision: str, exact: bool) -> None:
    """Two runs' results for one job (tensors by wire name). `exact`: the same bits (two
    runs of one launch configuration; or two configurations under Triton's interpreter,
    which add the same float32 values in the same order). Else, for two configurations on
    a GPU: Triton reduces a tensor (tl.sum: the bias gradients over a block's samples, the
    per-sample gradient norms) in the register layout it picks for it, which differs
    between configurations and sets the order of the additions, so the same results within
    the precision's bound (a float32 rounding in a norm moves a clip factor, and through it
    the operands a reduced-precision matmul rounds)."""
    assert first.keys() == second.keys()
    for name, value in first.items():
        if exact:
            assert same_bits(value, second[name]), name
        else:
            assert_close_per_model(name, second[name], value, precision)
