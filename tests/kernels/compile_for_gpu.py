"""Compile every Triton kernel of the engine for a GPU target, on a machine without one.

Triton's interpreter runs the kernels' arithmetic on the CPU but not their compilation, so
a construct the GPU compiler rejects would only surface on a GPU. This script lowers each
kernel, over its constexpr variants, through Triton's real pipeline to PTX and (with the
ptxas Triton ships) a cubin for sm_90 (H100). Run by tests/kernels/test_gpu_compile.py in a
subprocess, because TRITON_INTERPRET (set by the test suite) must be off when kernels are
defined.

Usage: python -m tests.kernels.compile_for_gpu [ARCH]   (default 90)
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "compile with the interpreter off"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gradserve.kernels import partial_sums, triton_fused, triton_layered  # noqa: E402
from gradserve.kernels.triton_common import ACTIVATION_CODES as ACT  # noqa: E402
from gradserve.kernels.triton_common import LOSS_CODES as LOSS  # noqa: E402
from gradserve.kernels.triton_common import PRECISION_CODES as PREC  # noqa: E402
from gradserve.kernels.triton_common import (  # noqa: E402
    TEXTBOOK_SOFTPLUS,
    TEXTBOOK_TANH,
    TF32X3,
)

FLOAT_ARGS = {"hidden_slope", "output_slope", "delta", "scale", "clip", "own_scale"}


def compile_kernel(kernel, constexprs: dict, types: dict, arch: int) -> int:
    """Compile one specialisation; returns the cubin's size. Pointers default to fp32,
    FLOAT_ARGS to fp32 scalars, every other argument to i32; a tuple argument's type is
    the tuple of its elements' types."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.endswith("_ptrs"):
            signature[name] = ("*fp32",) * constexprs["L"]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    return len(compiled.asm["cubin"])


def fused_variants():
    # Each variant's NARROW_OUT is the launcher's for this 3-wide output layer: the
    # reductions in float32 (IEEE and TF32X3), the padded products otherwise.
    for kernel, meta, types in _fused_variants():
        if kernel is triton_fused._fused_mlp_kernel and "NARROW_OUT" not in meta:
            meta = dict(meta, NARROW_OUT=triton_fused.narrow_output(3, meta["PRECISION"]))
        yield kernel, meta, types


def _fused_variants():
    widths = (16, 32, 32, 16)  # layer sizes (5, 32, 17, 3): the second needs no padding
    layout = triton_fused.GradientLayout.of(widths)
    base = dict(L=3, DP=32, WIDTHS=widths, EXACT=(False, True, False, False), BIASED=(1, 1, 1),
                DW_AT=layout.weight_offsets, DB_AT=layout.bias_offsets, GRAD_ROW=layout.row,
                BLOCK_N=32,
                HIDDEN_ACT=ACT["gelu"], OUTPUT_ACT=ACT["sigmoid"], LOSS=LOSS["huber"],
                HAS_WEIGHTS=True,
                WANT_Y=True, PROFILE=False, RESIDENT=False, CARRY=False,
                FMA_K_CHUNK=triton_fused.FMA_K_CHUNK)  # fmt: skip
    types = {"profile_ptr": "*i64", "sizes": ("i32",) * (base["L"] + 1)}
    for precision, (grads, dx, norms, clip) in itertools.product(
        ("float32", "tf32", "bfloat16", "float16"),
        [(True, False, False, False), (False, True, False, False), (True, True, True, False),
         (False, False, True, False), (True, False, True, True), (True, True, True, True)],
    ):  # fmt: skip
        weights = ({"bfloat16": "*bf16", "float16": "*fp16"}.get(precision, "*fp32"),) * base["L"]
        meta = dict(base, PRECISION=PREC[precision], WANT_PARAM_GRADS=grads, WANT_DX=dx,
                    NORMS=norms, CLIP=clip)  # fmt: skip
        yield triton_fused._fused_mlp_kernel, meta, {**types, "w_ptrs": weights}
    # pre-activations and gradient sums kept in registers (LaunchConfig.resident, .carry)
    for precision in ("float32", "tf32", "bfloat16"):
        weights = ({"bfloat16": "*bf16"}.get(precision, "*fp32"),) * base["L"]
        for resident, carry in ((True, False), (False, True), (True, True)):
            kept = dict(base, PRECISION=PREC[precision], WANT_PARAM_GRADS=True, WANT_DX=True,
                        NORMS=True, CLIP=True, RESIDENT=resident, CARRY=carry)  # fmt: skip
            yield triton_fused._fused_mlp_kernel, kept, {**types, "w_ptrs": weights}
    # float32 as three tf32 products (float32_matmul="tf32x3"), every pass on
    x3 = dict(base, PRECISION=TF32X3, WANT_PARAM_GRADS=True, WANT_DX=True, NORMS=True, CLIP=True)
    yield triton_fused._fused_mlp_kernel, x3, types
    # IEEE float32 in K-chunks of 32 (bench/fused_sweep.py times it against the default)
    yield triton_fused._fused_mlp_kernel, dict(x3, PRECISION=PREC["float32"], FMA_K_CHUNK=32), types
    # float32 (IEEE, three tf32 products) with the output layer as padded products
    # (NARROW_OUTPUT 0), every pass on
    for precision in (PREC["float32"], TF32X3):
        padded = dict(x3, PRECISION=precision, NARROW_OUT=False)
        yield triton_fused._fused_mlp_kernel, padded, types
    ce = dict(base, LOSS=LOSS["cross_entropy"], HIDDEN_ACT=ACT["tanh"], PRECISION=PREC["float32"],
              WANT_PARAM_GRADS=True, WANT_DX=False, NORMS=True, CLIP=True)  # fmt: skip
    yield triton_fused._fused_mlp_kernel, ce, {**types, "t_ptr": "*i64"}
    # norms and clipping of a network with layers without a bias
    # (and softplus's cheaper form, as bfloat16 jobs run it, and the logistic loss)
    bias_free = dict(base, PRECISION=PREC["bfloat16"], WANT_PARAM_GRADS=True, WANT_DX=True,
                     NORMS=True, CLIP=True, BIASED=(0, 1, 0), HIDDEN_ACT=TEXTBOOK_SOFTPLUS,
                     LOSS=LOSS["bce_with_logits"])  # fmt: skip
    yield triton_fused._fused_mlp_kernel, bias_free, {**types, "w_ptrs": ("*bf16",) * base["L"]}
    # the benchmarks' profiling build (timers: inline PTX the interpreter cannot run)
    profiled = dict(base, PRECISION=PREC["tf32"], WANT_PARAM_GRADS=True, WANT_DX=True,
                    NORMS=True, CLIP=False, PROFILE=True, HIDDEN_ACT=TEXTBOOK_TANH)  # fmt: skip
    yield triton_fused._fused_mlp_kernel, profiled, types
    # the fused kernel's partial gradients of three layers: weight and bias segments
    segments = dict(BLOCK=1024, STARTS=(*layout.weight_offsets, *layout.bias_offsets))
    yield partial_sums._sum_partials_kernel, segments, {"lengths": ("i32",) * 6}


def layered_variants():
    for epilogue, precision in itertools.product((0, 1, 2), ("float32", "tf32", "bfloat16")):
        meta = dict(EPILOGUE=epilogue, ACT=ACT["silu"], PRECISION=PREC[precision],
                    BLOCK_P=64, BLOCK_Q=64, BLOCK_K=32)  # fmt: skip
        yield triton_layered._batched_matmul_kernel, meta, {}
    x3 = dict(EPILOGUE=1, ACT=ACT["silu"], PRECISION=TF32X3, BLOCK_P=64, BLOCK_Q=64, BLOCK_K=32)
    yield triton_layered._batched_matmul_kernel, x3, {}
    for loss in ("mse", "bce_with_logits", "cross_entropy"):
        meta = dict(OUTPUT_ACT=ACT["identity"], LOSS=LOSS[loss], HAS_WEIGHTS=True)
        names = inspect.signature(triton_layered._loss_kernel.fn).parameters
        meta.update({k: 16 for k in names if k.isupper() and k not in meta})  # block sizes
        types = {"t_ptr": "*i64"} if loss == "cross_entropy" else {}
        yield triton_layered._loss_kernel, meta, types
    yield triton_layered._column_sum_kernel, dict(BLOCK_R=32, BLOCK_C=64), {}


def main() -> int:
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    count = 0
    for kernel, meta, types in itertools.chain(fused_variants(), layered_variants()):
        size = compile_kernel(kernel, meta, types, arch)
        assert size > 0, (kernel.fn.__name__, meta)
        count += 1
    print(f"compiled {count} kernel specialisations for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
