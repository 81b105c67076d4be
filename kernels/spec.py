"""The job an engine runs: an MLP architecture, its loss, an ensemble of M parameter sets.

Shapes (M models, N samples, layer_sizes = [d0, ..., dL]):
  weights[i]      [M, d(i+1), d(i)]   as torch.nn.Linear.weight, y = x @ W.T + b
  biases[i]       [M, d(i+1)]
  inputs          [M, N, d0] or [N, d0] shared by all models
  targets         [M, N, dL] / [N, dL], or int class indices [M, N] / [N] for cross_entropy
  sample_weights  [M, N] / [N] or None
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu", "silu", "softplus")
LOSSES = ("mse", "l1", "huber", "bce_with_logits", "cross_entropy")
REDUCTIONS = ("mean", "sum")
PRECISIONS = ("float32", "tf32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class Activation:
    name: str = "identity"
    negative_slope: float = 0.01  # leaky_relu only

    def __post_init__(self) -> None:
        if self.name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.name!r}; expected one of {ACTIVATIONS}")


@dataclass(frozen=True)
class LossSpec:
    name: str = "mse"
    reduction: str = "mean"
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"unknown loss {self.name!r}; expected one of {LOSSES}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; expected {REDUCTIONS}")


@dataclass(frozen=True)
class MLPSpec:
    """Architecture: widths and activations. Hashable, so engines can cache per spec."""

    layer_sizes: tuple[int, ...]
    hidden_activation: Activation = Activation("relu")
    output_activation: Activation = Activation("identity")

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes) - 1

    def activation_after(self, layer: int) -> Activation:
        last = layer == self.num_layers - 1
        return self.output_activation if last else self.hidden_activation


@dataclass(frozen=True)
class OutputRequest:
    parameter_gradients: bool = True
    input_gradients: bool = False
    per_sample_losses: bool = False
    forward_outputs: bool = False
    # Norm of each sample's gradient (its contribution to the model's loss) over all
    # parameters; the torch engine computes it.
    per_sample_gradient_norms: bool = False


@dataclass
class EnsembleJob:
    mlp: MLPSpec
    loss: LossSpec
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor
    sample_weights: torch.Tensor | None = None
    precision: str = "float32"
    outputs: OutputRequest = field(default_factory=OutputRequest)

    @property
    def num_models(self) -> int:
        return self.weights[0].shape[0]

    @property
    def num_samples(self) -> int:
        return self.inputs.shape[-2]

    @property
    def shared_inputs(self) -> bool:
        return self.inputs.dim() == 2


@dataclass
class EnsembleResult:
    """Float results on the engine's device. Gradients are of each model's own loss."""

    loss: torch.Tensor  # [M]
    weight_grads: list[torch.Tensor] | None = None  # like weights
    bias_grads: list[torch.Tensor] | None = None  # like biases
    input_grads: torch.Tensor | None = None  # [M, N, d0]
    per_sample_loss: torch.Tensor | None = None  # [M, N]
    per_sample_grad_norm: torch.Tensor | None = None  # [M, N]
    outputs: torch.Tensor | None = None  # [M, N, dL]
    engine: str = ""
    device: str = ""


def flops(mlp: MLPSpec, num_models: int, num_samples: int) -> int:
    """Multiply-add FLOPs of forward (2 per MAC) and backward (4 per MAC: dX and dW)."""
    macs = sum(a * b for a, b in zip(mlp.layer_sizes[:-1], mlp.layer_sizes[1:], strict=True))
    return 6 * macs * num_models * num_samples
