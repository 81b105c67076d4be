"""The job an engine runs: an MLP architecture, its loss, an ensemble of M parameter sets.

Shapes (M models, N samples, layer_sizes = [d0, ..., dL]):
  weights[i]      [M, d(i+1), d(i)]   as torch.nn.Linear.weight, y = x @ W.T + b
  biases[i]       [M, d(i+1)]
  inputs          [M, N, d0] or [N, d0] shared by all models
  targets         [M, N, dL] / [N, dL], or int class indices [M, N] / [N] for cross_entropy
  sample_weights  [M, N] / [N] or None
"""

from __future__ import annotations

from collections.abc import Callable
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
    # Layers without a bias (nn.Linear(..., bias=False)), sorted. Engines compute them with
    # a zero bias, whose gradient they return as zeros (so optimiser steps keep it zero),
    # and leave it out of per-sample gradient norms.
    layers_without_bias: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes) - 1

    def has_bias(self, layer: int) -> bool:
        return layer not in self.layers_without_bias

    def parameter_names(self) -> list[str]:
        """Wire names of the parameters, first layer first ("layers.0.weight", ...)."""
        names = []
        for i in range(self.num_layers):
            names.append(f"layers.{i}.weight")
            if self.has_bias(i):
                names.append(f"layers.{i}.bias")
        return names

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


@dataclass(frozen=True)
class Privacy:
    """DP-SGD gradients: each sample's gradient is clipped to an L2 norm of at most
    `clip_norm` before the samples are summed, and Gaussian noise of standard deviation
    noise_multiplier * clip_norm is added to every coordinate of the clipped sum.

    A sample's gradient here is that of its own loss: its contribution to the model's loss
    times N under the mean reduction (as Opacus' per-sample gradients), so the clip norm does
    not depend on N. The noisy clipped sum is then reduced like the loss (divided by N under
    the mean reduction): with an infinite clip norm and no noise it is the plain gradient.
    Noise is drawn from torch.Generator(device).manual_seed(noise_seed) as
    randn(weights[0].shape), randn(biases[0].shape), randn(weights[1].shape), ..., float32:
    reproducible for one seed on one device type.
    """

    clip_norm: float
    noise_multiplier: float = 0.0
    noise_seed: int = 0
    # Contribution norm -> own-loss norm; None: N under mean, 1 under sum. Set for the
    # micro-batches of a streamed job, whose sum reduction stands for the whole job's.
    own_loss_scale: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.clip_norm < float("inf"):
            raise ValueError(f"clip_norm must be positive and finite, got {self.clip_norm}")
        if not 0 <= self.noise_multiplier < float("inf"):
            raise ValueError(f"noise_multiplier must be >= 0, finite, got {self.noise_multiplier}")


OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class Optimizer:
    """`steps` optimiser steps on the server, each on the full batch, with torch.optim's
    update rules (SGD with momentum/dampening/nesterov, Adam, AdamW; weight decay as torch:
    added to the gradient for sgd and adam, decoupled for adamw). `start_step` counts the
    steps an incoming optimiser state has already taken (Adam's bias correction)."""

    kind: str
    steps: int
    learning_rate: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None  # None: torch.optim's default, 0.01 for adamw, else 0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    start_step: int = 0
    return_state: bool = False

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.kind!r}; expected one of {OPTIMIZERS}")
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", 0.01 if self.kind == "adamw" else 0.0)

    @property
    def state_names(self) -> tuple[str, ...]:
        """Per-parameter state tensors, named as torch.optim's state dict names them."""
        if self.kind == "sgd":
            return ("momentum_buffer",) if self.momentum else ()
        return ("exp_avg", "exp_avg_sq")


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
    privacy: Privacy | None = None
    optimizer: Optimizer | None = None
    # Optimiser state by "layers.{i}.weight.exp_avg" etc., to continue from; absent: fresh.
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # Called as on_step(step, loss [M]) on the engine's thread after each optimiser step's
    # forward pass.
    on_step: Callable | None = field(default=None, compare=False, repr=False)

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
    # After optimiser steps: the loss at each step [K, M], the updated parameters and,
    # on request, the optimiser state by "layers.{i}.weight.exp_avg" etc.
    losses: torch.Tensor | None = None
    weights: list[torch.Tensor] | None = None
    biases: list[torch.Tensor] | None = None
    optimizer_state: dict[str, torch.Tensor] | None = None
    engine: str = ""
    device: str = ""


def compute_dtype(precision: str) -> torch.dtype:
    """dtype of activations, losses and gradients (matmul operands may be narrower)."""
    return torch.float64 if precision == "float64" else torch.float32


def flops(mlp: MLPSpec, num_models: int, num_samples: int) -> int:
    """Multiply-add FLOPs of forward (2 per MAC) and backward (4 per MAC: dX and dW)."""
    macs = sum(a * b for a, b in zip(mlp.layer_sizes[:-1], mlp.layer_sizes[1:], strict=True))
    return 6 * macs * num_models * num_samples
