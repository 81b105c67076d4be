"""The Triton engine: fused forward + loss + backward for MLP ensembles.

Widths up to 128 take the fully fused kernel (triton_fused.py: one launch for the whole
job, plus a fixed-order reduction of per-program partial gradients when samples are split
across programs); wider networks, and bfloat16 / float16 / IEEE float32 ones wider than 64
that need no per-sample norms, take the per-layer GEMM path (triton_layered.py;
takes_fused). Both compute in fp32 with matmul operands in the job's precision, and are
bit-identical from run to run. Kernels are specialised per architecture (depth, padded
widths, activations, loss, precision are compile-time constants) and Triton caches each
specialisation, so only the first job of a new architecture pays the compile.

On a machine without CUDA the engine runs under Triton's interpreter when
TRITON_INTERPRET=1 is set (that is how the tests exercise it on CPUs).
"""

from __future__ import annotations

import os
import re

import torch

from gradserve.kernels import privacy
from gradserve.kernels.precision_codes import PRECISION_CODES, TF32X3
from gradserve.kernels.spec import EnsembleJob, EnsembleResult

PRECISIONS: tuple[str, ...] = ("float32", "tf32", "bfloat16", "float16")
# How float32 jobs multiply: "ieee", fp32 FMAs (on a GPU, the FMA units), or "tf32x3",
# three tf32 tensor-core products per matmul that together keep fp32 accuracy
# (triton_common.split_tf32). The benchmarks and GPU tests measure both. "gluon": IEEE
# fp32 FMAs too, in Gluon kernels whose threads each compute up to 8x8 outputs where
# tl.dot gives them 4x4, loading half the shared memory per FMA (gluon_fused.py for fused
# jobs without per-sample norms up to padded width 64, gluon_matmul.py for the per-layer
# GEMMs; the other jobs run as under "ieee"). Checked against the oracle on CPUs
# (gluon_cpu.py) and compiled for sm_90 in the tests; not yet timed on a GPU.
FLOAT32_MATMULS: tuple[str, ...] = ("ieee", "tf32x3", "gluon")
FLOAT32_MATMUL = "ieee"  # the default
# Widest layer of the fully fused kernel (and of per-sample norms on this engine).
FUSED_MAX_WIDTH = 128
# Which kernels run a job: "auto" takes the fused kernel up to FUSED_MAX_WIDTH and the
# per-layer GEMMs beyond (see takes_fused); "fused" and "per_layer" force one (the
# benchmarks time both paths on the same job; the per-layer path computes no per-sample
# norms).
PATHS: tuple[str, ...] = ("auto", "fused", "per_layer")
# Networks wider than this take the per-layer GEMMs under "auto" even where the fused
# kernel fits, in the precisions where the per-layer path measured faster at padded width
# 128 on an H100 ([64, 128, 128, 128, 8], M=256, N=1024; bench/results/kernels_gpu_h100.md):
# bfloat16, where the fused kernel works in 32-sample blocks there (2.836 ms against the
# per-layer path's 1.401 ms), and float32 on the FMA units ("ieee": 10.663 ms against
# 3.168 ms; there the fused kernel's 32-sample blocks spill registers and load 2.0 bytes
# of shared memory per FMA, the per-layer GEMMs 1.4 to 1.7; bench/results/ptxas_sm90.md).
# float16 runs bfloat16's tensor-core code. Jobs that need per-sample norms stay fused
# (the per-layer path has none); tf32 and float32 as three tf32 products, not measured
# there, stay fused.
AUTO_FUSED_MAX_WIDTH = 64
HALF_PRECISIONS: tuple[str, ...] = ("bfloat16", "float16")
# Deepest networks the fused kernel takes under "auto". Its body is unrolled over the
# layers, so the first job of an architecture compiles a kernel whose compile time grows
# faster than the depth: for sm_90a with triton 3.6 (the GPU image's), width 64, bfloat16
# took 9.2 s at 16 layers, 35 s at 32 and 196 s at 64; IEEE float32, on the FMA units,
# 13.5 s at 8, 30 s at 12 and 59 s at 16 (bench/results/compile_depth_sm90.md). Deeper
# networks take the per-layer GEMMs, which compile once per precision and epilogue
# whatever the depth (IEEE float32 ones go to torch: engines.select_engine).
AUTO_FUSED_MAX_LAYERS = 16
AUTO_FUSED_MAX_LAYERS_FMA = 8  # IEEE float32 ("ieee" and "gluon")


def fused_max_layers(precision: str, float32_matmul: str = FLOAT32_MATMUL) -> int:
    """The deepest network `auto` runs on the fused kernel (AUTO_FUSED_MAX_LAYERS)."""
    on_fma = precision == "float32" and float32_matmul in ("ieee", "gluon")
    return AUTO_FUSED_MAX_LAYERS_FMA if on_fma else AUTO_FUSED_MAX_LAYERS


def takes_fused(
    precision: str,
    layer_sizes,
    norms_needed: bool,
    path: str = "auto",
    float32_matmul: str = FLOAT32_MATMUL,
) -> bool:
    """Whether a job runs on the fused kernel (else the per-layer GEMMs), for a path the job
    can take (`run` refuses the others)."""
    if path != "auto":
        return path == "fused"
    widest = max(layer_sizes)
    if widest > FUSED_MAX_WIDTH:
        return False
    if len(layer_sizes) - 1 > fused_max_layers(precision, float32_matmul) and not norms_needed:
        return False
    faster_per_layer = precision in HALF_PRECISIONS or (
        precision == "float32" and float32_matmul in ("ieee", "gluon")
    )
    return norms_needed or not (faster_per_layer and widest > AUTO_FUSED_MAX_WIDTH)


def fits_int32_offsets(num_samples: int, layer_sizes) -> bool:
    """Whether the kernels' element offsets within one model fit 32 bits: its [N, d]
    inputs, activations and outputs and its [d(i+1), d(i)] weights. (Bases across the
    ensemble are 64-bit, so M is free.) Beyond that, 32-bit offsets would wrap: such a job
    is left to the torch engine."""
    largest = max(num_samples * max(layer_sizes),
                  *(a * b for a, b in zip(layer_sizes, layer_sizes[1:], strict=False)))  # fmt: skip
    return largest < 2**31


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def precisions() -> tuple[str, ...]:
    """Precisions this engine runs here. Triton's interpreter computes bfloat16 dot products
    wrongly (numpy has no bfloat16: a 16x16 product came out at 1e10), so not there."""
    if interpreted():
        return tuple(p for p in PRECISIONS if p != "bfloat16")
    return PRECISIONS


# The oldest Triton the kernels run on: they take tuples of pointers as arguments (triton
# 3.1's interpreter failed on the fused kernel), and are checked and timed with 3.6 on GPUs
# and 3.9 here.
MIN_TRITON = (3, 6)


def available() -> bool:
    """Triton importable and at least MIN_TRITON, and a GPU to run on (or the interpreter
    switched on). With an older Triton the torch engine runs every job."""
    return why_unavailable() is None


def why_unavailable() -> str | None:
    """Why this engine cannot run here, in words; None where it can."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    major_minor = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if major_minor < MIN_TRITON:
        wanted = ".".join(map(str, MIN_TRITON))
        return f"Triton {triton.__version__} is older than the {wanted} its kernels need"
    if not (torch.cuda.is_available() or interpreted()):
        return "no CUDA device"
    return None


# bf16/fp16 jobs hand the kernels narrow weights (and the per-layer path narrow inputs and
# hidden activations): they are matmul operands only, rounded to this dtype by the matmul
# anyway, and half the bytes means half the loads and registers.
NARROW_WEIGHTS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def gluon_available() -> bool:
    """Whether Triton has Gluon (3.6 and later: the API the Gluon kernels are written to)."""
    import importlib.util

    try:
        return importlib.util.find_spec("triton.experimental.gluon") is not None
    except ImportError:  # no triton at all
        return False


def precision_code(precision: str, float32_matmul: str = FLOAT32_MATMUL) -> int:
    """The kernels' PRECISION constant for a job's precision."""
    if float32_matmul not in FLOAT32_MATMULS:
        raise ValueError(f"float32_matmul must be one of {FLOAT32_MATMULS}, not {float32_matmul!r}")
    if precision == "float32" and float32_matmul == "tf32x3":
        return TF32X3
    if float32_matmul == "gluon" and not gluon_available():
        raise ValueError("float32_matmul='gluon' needs Triton with Gluon (3.6 or later)")
    return PRECISION_CODES[precision]


def run(
    job: EnsembleJob,
    device: torch.device | str,
    *,
    float32_matmul: str = FLOAT32_MATMUL,
    path: str = "auto",
) -> EnsembleResult:
    from gradserve.kernels import triton_fused, triton_layered
    from gradserve.kernels.triton_common import ACTIVATION_CODES, LOSS_CODES

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    fits_fused = max(job.mlp.layer_sizes) <= FUSED_MAX_WIDTH
    if path == "fused" and not fits_fused:
        raise ValueError(f"the fused kernel takes layers up to {FUSED_MAX_WIDTH} wide")
    norms_needed = job.outputs.per_sample_gradient_norms or job.privacy is not None
    fused = takes_fused(job.precision, job.mlp.layer_sizes, norms_needed, path, float32_matmul)
    if norms_needed and not fused:
        raise ValueError(
            f"the triton engine computes per-sample gradient norms in its fused kernel only "
            f"(widths <= {FUSED_MAX_WIDTH})"
        )
    if job.precision not in precisions():
        raise ValueError(f"the triton engine does not run precision {job.precision!r} here")
    if not fits_int32_offsets(job.num_samples, job.mlp.layer_sizes):
        raise ValueError("the triton engine needs each model's tensors below 2**31 elements")
    device = torch.device(device)
    want = job.outputs
    f32 = dict(device=device, dtype=torch.float32)
    weights = [w.to(**f32).contiguous() for w in job.weights]
    biases = [b.to(**f32).contiguous() for b in job.biases]
    x = job.inputs.to(**f32).contiguous()
    cross_entropy = job.loss.name == "cross_entropy"
    targets = job.targets.to(device, torch.int64 if cross_entropy else torch.float32)
    targets = targets.contiguous()
    sample_weights = None
    if job.sample_weights is not None:
        sample_weights = job.sample_weights.to(**f32).contiguous()
    sizes = job.mlp.layer_sizes
    d_out = sizes[-1]
    count = job.num_samples * (1 if cross_entropy else d_out)
    scale = 1.0 / count if job.loss.reduction == "mean" else 1.0
    options = dict(
        hidden_act=ACTIVATION_CODES[job.mlp.hidden_activation.name],
        output_act=ACTIVATION_CODES[job.mlp.output_activation.name],
        hidden_slope=float(job.mlp.hidden_activation.negative_slope),
        output_slope=float(job.mlp.output_activation.negative_slope),
        loss=LOSS_CODES[job.loss.name],
        delta=float(job.loss.huber_delta),
        scale=scale,
        precision=precision_code(job.precision, float32_matmul),
        want_param_grads=want.parameter_gradients,
        want_dx=want.input_gradients,
        want_y=want.forward_outputs,
    )

    gluon = float32_matmul == "gluon" and job.precision == "float32"
    fused_on_gluon = False
    if gluon and fused:
        from gradserve.kernels import gluon_fused  # Gluon: Triton 3.6 and later

        fused_on_gluon = gluon_fused.takes(sizes, norms_needed)
    if fused_on_gluon:
        norms = None
        ieee = {key: value for key, value in options.items() if key != "precision"}
        (weight_grads, bias_grads), dx, per, y = gluon_fused.fused_mlp(
            weights, biases, x, targets, sample_weights, **ieee
        )
    elif fused:
        narrow = NARROW_WEIGHTS.get(job.precision)
        operands = [w.to(narrow) for w in weights] if narrow else weights
        (weight_grads, bias_grads), dx, per, y, norms = triton_fused.fused_mlp(
            operands, biases, x, targets, sample_weights, **options, want_norms=norms_needed,
            clip=job.privacy.clip_norm if job.privacy is not None else None,
            own_scale=privacy.own_loss_scale(job) if job.privacy is not None else 1.0,
            # only jobs with norms specialise on it: the other passes compute every bias
            biased=tuple(map(job.mlp.has_bias, range(len(sizes) - 1))) if norms_needed else None,
        )  # fmt: skip
        if job.privacy is not None and weight_grads is not None:
            privacy.add_noise(
                weight_grads, bias_grads, job.privacy, privacy.samples_per_loss_unit(job), device
            )
    else:
        norms = None
        narrow = NARROW_WEIGHTS.get(job.precision)
        if narrow:
            weights, x = [w.to(narrow) for w in weights], x.to(narrow)
        (weight_grads, bias_grads), dx, per, y = triton_layered.layered_mlp(
            weights, biases, x, targets, sample_weights, **options, narrow=narrow,
            ieee_gemm="gluon" if gluon else "tl.dot",
        )  # fmt: skip
    return EnsembleResult(
        loss=per.sum(dim=1) * scale,
        weight_grads=weight_grads,
        bias_grads=bias_grads,
        input_grads=dx,
        per_sample_loss=per if want.per_sample_losses else None,
        per_sample_grad_norm=norms if want.per_sample_gradient_norms else None,
        outputs=y,
        engine="triton",
        device=str(device),
    )
