"""The torch engine: the whole ensemble in one autograd graph of batched matmuls.

Every layer is one `baddbmm` over the model axis M ([M, d_out, d_in] x [M, d_in, N]; on
the CPU a layer of one input feature is one broadcast multiply-add, linear_layer), so the
cost is a handful of large kernels whatever M is, never a Python loop over models. On the
CPU a job of large activations runs in blocks (of models; of one model's samples where
that model alone is large), each block one such graph over activations of several MiB
(block_shape), small enough to stay in the caches, large enough that each kernel's fixed
cost stays small. Runs on CPU or CUDA, in float32, tf32 (CUDA), bfloat16/float16 operands
with float32 accumulation, or float64. This is the fallback engine and the reference the
Triton engine is tested against (besides the independent float64 oracle in the tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import torch

from gradserve.kernels import model_blocks, privacy, sample_blocks
from gradserve.kernels.functional import activate, per_sample_loss, reduce_loss
from gradserve.kernels.linear_layer import BatchedLinear, sum_over_samples
from gradserve.kernels.spec import (
    ACTIVATIONS,
    LOSSES,
    Activation,
    EnsembleJob,
    EnsembleResult,
    LossSpec,
    MLPSpec,
    compute_dtype,
)


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Allow TF32 for exactly the jobs that asked for it (the flag is process-global, so the
    server runs one job at a time per device)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def forward_loss(job: EnsembleJob, weights, biases, x, targets, sample_weights, trace=None):
    """Differentiable forward pass and loss: (loss [M], per-sample loss [M, N], y [M, N, dL]).
    With `trace` (a list), each layer's (input [M, d_in, N], pre-activation [M, d_out, N]) is
    appended to it."""
    h_t = x.transpose(1, 2)
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        z_t = BatchedLinear.apply(h_t, w, b, job.precision)
        if trace is not None:
            trace.append((h_t, z_t))
        h_t = activate(z_t, job.mlp.activation_after(i))
    y = h_t.transpose(1, 2)
    per = per_sample_loss(y, targets, job.loss, sample_weights)
    return reduce_loss(per, job.loss, job.mlp.layer_sizes[-1]), per, y


def per_sample_gradient_norms(trace, dz, mlp: MLPSpec) -> torch.Tensor:
    """Norm of each sample's gradient over all weights and biases, [M, N], without forming
    per-sample gradients: a sample's weight gradient in a linear layer is the outer product
    of its dLoss/dz and its layer input, so its squared norm is |dz|^2 * |a|^2 (plus |dz|^2
    for the bias, where the layer has one)."""
    total = 0
    for i, ((h_t, _), g) in enumerate(zip(trace, dz, strict=True)):
        bias = 1 if mlp.has_bias(i) else 0
        total = total + g.square().sum(dim=1) * (h_t.square().sum(dim=1) + bias)
    return total.sqrt()


def private_gradients(job: EnsembleJob, trace, dz, norms, device):
    """DP-SGD weight and bias gradients (see kernels.spec.Privacy): each layer's sum over
    samples of dz_i a_i^T, with every sample's dz scaled by its clip factor, plus noise."""
    factor = privacy.clip_factors(norms.detach(), job).unsqueeze(1)
    weight_grads, bias_grads = [], []
    for (h_t, _), g in zip(trace, dz, strict=True):
        g = g.detach() * factor  # [M, d_out, N]
        weight_grads.append(sum_over_samples(g, h_t.detach()))
        bias_grads.append(g.sum(dim=2))
    privacy.add_noise(
        weight_grads, bias_grads, job.privacy, privacy.samples_per_loss_unit(job), device
    )
    return weight_grads, bias_grads


def _leaf(t: torch.Tensor, device, dtype, requires_grad: bool) -> torch.Tensor:
    return t.to(device, dtype).detach().requires_grad_(requires_grad)


_cpu_math_primed = False
_cpu_math_lock = threading.Lock()


def _prime_cpu_math() -> None:
    """Call every math function a CPU job may use once, on tiny tensors, before any job is
    big enough for torch to split it across threads.

    ATen runs float unary ops (exp, log, sqrt, tanh, erf, ...) through MKL's VML, which
    picks each function's kernel on its first call; when torch's intra-op threads make
    that first call together, one thread can run a low-accuracy kernel for its whole share
    (pytorch/pytorch#188792, MKL 2024.2 as in the torch wheels). Seen here as a fresh
    server's first tanh job with one half of its models' gradients off by up to 8e-4
    (tanh relative error 5e-5 instead of 6e-8, traced from bit-exact inputs to the first
    layer's tanh), in ~3% of fresh processes; with this priming 0 of 120 (engine repro)."""
    global _cpu_math_primed
    with _cpu_math_lock:
        if _cpu_math_primed:
            return
        gen = torch.Generator().manual_seed(0)
        # The VML functions behind activations, losses, norms (sqrt) and optimisers (sqrt).
        for dtype in (torch.float32, torch.float64):
            x = torch.rand(4, generator=gen, dtype=dtype) + 0.5
            for fn in (torch.exp, torch.log, torch.log1p, torch.expm1, torch.sqrt, torch.tanh,
                       torch.erf, torch.erfc, torch.sigmoid):  # fmt: skip
                fn(x)
        sizes = (3, 4, 2)
        cases = [(act, "mse") for act in ACTIVATIONS] + [("tanh", loss) for loss in LOSSES]
        for dtype in (torch.float32, torch.float64):
            for act, loss in cases:
                weights = [torch.randn(2, b, a, generator=gen, dtype=dtype)
                           for a, b in zip(sizes, sizes[1:], strict=False)]  # fmt: skip
                biases = [torch.randn(2, b, generator=gen, dtype=dtype) for b in sizes[1:]]
                if loss == "cross_entropy":
                    targets = torch.randint(0, sizes[-1], (3,), generator=gen)
                else:
                    targets = torch.rand(3, sizes[-1], generator=gen, dtype=dtype)
                job = EnsembleJob(
                    mlp=MLPSpec(sizes, Activation(act), Activation(act)),
                    loss=LossSpec(loss),
                    weights=weights,
                    biases=biases,
                    inputs=torch.randn(3, sizes[0], generator=gen, dtype=dtype),
                    targets=targets,
                    precision="float64" if dtype == torch.float64 else "float32",
                )
                _run(job, torch.device("cpu"))
        _cpu_math_primed = True


# On the CPU, a job whose widest layer's activations (all models together) take at least
# CPU_BLOCKED_JOB_MIN_BYTES (two full blocks) runs in blocks of CPU_BLOCK_BYTES of
# activations: blocks of models, and where one model's are larger, that model a block of
# samples at a time (a block at least as large as the model's parameters, block_shape).
# glibc maps every allocation above 32 MiB afresh and faults it in at each use, and each
# elementwise pass over a tensor that large (activation, its derivative, bias sums, the
# loss) streams it from memory; a block's tensors come from the heap and stay in the caches
# from one pass to the next, and the job's memory is that of one block's activations (and
# its results). Measured on 2 cores (bench/results/cpu_blocks.md): jobs of 32-512 MiB
# activations 1.18x-2.77x faster in blocks of 4 MiB, at 1/2.8 to 1/48 of the memory (one
# of 72 MiB of parameters, a model at a time, 0.98x, at 2/3 of the memory); blocks of
# 2 MiB were slower on some (a [64, 128, 128, 8] job 1.2x against 1.7x), of 8 MiB on the
# largest (2.2x against 3x). Jobs of 9-16 MiB: 1.20x-2.57x, at 1/1.6 to 1/2.9 of the
# memory (one of little work per byte, [8, 32, 1], 5-12 ms whole, went 0.81x in an earlier
# run: its four blocks' fixed costs). Jobs of 8 MiB: 1.01x-1.25x, at 1/1.35 to 1/1.9 of the
# memory (bench/results/cpu_blocks_small.md; an earlier run 0.97x-1.37x); a job of less, a
# block and a small rest, gains little cache and pays another engine call (5 MiB: 0.87x),
# so it runs whole.
CPU_BLOCKED_JOB_MIN_BYTES = 8 << 20
CPU_BLOCK_BYTES = 4 << 20
# A block of one model's samples holds at least this many times the model's parameter bytes
# of activations (block_shape).
CPU_SAMPLE_BLOCK_PARAMETER_MULTIPLE = 1


def block_shape(num_models: int, num_samples: int, layer_sizes, precision: str) -> tuple[int, int]:
    """(models, samples) of each block a CPU job of this shape runs in; (M, N) where it
    runs whole. Blocks of models hold as many as CPU_BLOCK_BYTES does; a model larger than
    that runs alone, as many samples at a time as fill it (one at least), or as many as
    its parameters' bytes fill, if more: each block of samples reads the model's weights
    and adds their gradients into float64 sums, which must stay small against its work:
    in blocks of CPU_BLOCK_BYTES (256 and 128 samples), an M=2 N=4096 [512, 4096, 4096, 8]
    job took 1.5x its whole time and an M=1 N=2048 [8192, 8192, 1] one 2.4x (one run; with
    this bound 0.98x and whole; bench/results/cpu_blocks.md has jobs of both kinds)."""
    itemsize = compute_dtype(precision).itemsize
    per_row = max(layer_sizes) * itemsize  # a model's sample
    if num_models * num_samples * per_row < CPU_BLOCKED_JOB_MIN_BYTES:
        return num_models, num_samples
    models = CPU_BLOCK_BYTES // (num_samples * per_row)
    if models >= 1:
        return min(models, num_models), num_samples
    pairs = zip(layer_sizes, layer_sizes[1:], strict=False)
    parameter_bytes = sum((d_in + 1) * d_out for d_in, d_out in pairs) * itemsize
    block_bytes = max(CPU_BLOCK_BYTES, CPU_SAMPLE_BLOCK_PARAMETER_MULTIPLE * parameter_bytes)
    samples = block_bytes // per_row
    return 1, min(num_samples, max(1, samples))


def run(job: EnsembleJob, device: torch.device | str = "cpu") -> EnsembleResult:
    """Forward, loss and backward for every model of the ensemble."""
    device = torch.device(device)
    if device.type != "cpu":
        return _run(job, device)
    if not _cpu_math_primed:
        _prime_cpu_math()
    m, n = job.num_models, job.num_samples
    models, samples = block_shape(m, n, job.mlp.layer_sizes, job.precision)
    if (models, samples) == (m, n):
        return _run(job, device)
    return _run_in_blocks(job, device, models, samples)


def _run_in_blocks(job: EnsembleJob, device: torch.device, models: int, samples: int):
    """The job's models `models` at a time (each block `samples` samples at a time), into
    the job's results. DP noise is added to the joined gradients, so that it is drawn in
    the documented order whatever the blocks."""
    dp = job.privacy
    quiet = (
        job
        if dp is None
        else dataclasses.replace(job, privacy=dataclasses.replace(dp, noise_multiplier=0.0))
    )
    m = job.num_models
    result = model_blocks.allocate_result(job, device)
    for start in range(0, m, models):
        block = model_blocks.models(quiet, start, min(start + models, m))
        part = _run_samples_in_blocks(block, device, samples)
        model_blocks.copy_models(result, part, start)
        del part  # freed before the next block runs
    if dp is not None and result.weight_grads is not None:
        loss_unit = privacy.samples_per_loss_unit(job)
        privacy.add_noise(result.weight_grads, result.bias_grads, dp, loss_unit, device)
    return result


def _run_samples_in_blocks(job: EnsembleJob, device: torch.device, block: int):
    """A block of models `block` samples at a time (sample_blocks): the blocks' losses and
    gradients added in float64 and reduced as the job's, their per-sample rows copied into
    the job's. `job` has no DP noise to add (_run_in_blocks adds it)."""
    n = job.num_samples
    if block >= n:
        return _run(job, device)
    total, rows = None, {}
    for start in range(0, n, block):
        stop = min(start + block, n)
        part = _run(sample_blocks.samples(job, start, stop), device)
        for name, value in sample_blocks.rows(part, job).items():
            if name not in rows:
                rows[name] = value.new_empty(value.shape[0], n, *value.shape[2:])
            rows[name][:, start:stop].copy_(value)
        total = sample_blocks.add(total, part)
        del part  # freed before the next block runs
    return dataclasses.replace(sample_blocks.reduce(total, job, device), **rows)


def _run(job: EnsembleJob, device: torch.device) -> EnsembleResult:
    dtype = compute_dtype(job.precision)
    want = job.outputs
    m, n = job.num_models, job.num_samples

    # detach(): `.to` returns the caller's own tensor when nothing changes, and marking that
    # tensor as requiring grad would leak into the caller.
    # Norms (and clipping, which needs them) take the graph through the weights even when
    # autograd is not asked for the weights' gradients.
    dp = job.privacy
    norms_needed = want.per_sample_gradient_norms or dp is not None
    track = want.parameter_gradients or norms_needed
    weights = [_leaf(w, device, dtype, track) for w in job.weights]
    biases = [_leaf(b, device, dtype, track) for b in job.biases]
    x = job.inputs.to(device, dtype).detach()
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(m, n, x.shape[-1])
    if want.input_gradients:
        x = x.contiguous().requires_grad_(True)
    targets = job.targets.to(device)
    targets = targets.long() if job.loss.name == "cross_entropy" else targets.to(dtype)
    sample_weights = None
    if job.sample_weights is not None:
        sample_weights = job.sample_weights.to(device, dtype)

    # Clipped gradients are built from each layer's dLoss/dz and input, not by autograd.
    leaves: list[torch.Tensor] = []
    if want.parameter_gradients and dp is None:
        for w, b in zip(weights, biases, strict=True):
            leaves += [w, b]
    if want.input_gradients:
        leaves.append(x)

    trace = [] if norms_needed else None
    with torch.set_grad_enabled(track or bool(leaves)), matmul_precision(job.precision, device):
        loss, per, y = forward_loss(job, weights, biases, x, targets, sample_weights, trace)
        # Models are independent, so d(sum of losses)/d(theta_m) = d(loss_m)/d(theta_m);
        # samples too, so d(loss)/dz of a sample is that sample's own.
        wrt = leaves + [z for _, z in trace or []]
        grads = list(torch.autograd.grad(loss.sum(), wrt)) if wrt else []
        dz = grads[len(leaves) :]
        grads = grads[: len(leaves)]
        norms = per_sample_gradient_norms(trace, dz, job.mlp) if norms_needed else None

    result = EnsembleResult(loss=loss.detach(), engine="torch", device=str(device))
    if want.parameter_gradients and dp is not None:
        result.weight_grads, result.bias_grads = private_gradients(job, trace, dz, norms, device)
    elif want.parameter_gradients:
        result.weight_grads = list(grads[0 : 2 * job.mlp.num_layers : 2])
        result.bias_grads = list(grads[1 : 2 * job.mlp.num_layers : 2])
    if want.input_gradients:
        result.input_grads = grads[-1]
    if want.per_sample_losses:
        result.per_sample_loss = per.detach()
    if want.per_sample_gradient_norms:
        result.per_sample_grad_norm = norms.detach()
    if want.forward_outputs:
        result.outputs = y.detach()
    return result
