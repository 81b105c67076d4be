"""Runs Gluon kernels on the CPU, one program after another, as TRITON_INTERPRET=1 runs
Triton kernels: Triton's interpreter has no Gluon (a Gluon launch there fails with "0
active drivers"), and without this a Gluon kernel could only be checked on a GPU.

What it checks: the kernel's arithmetic, indexing, masks and its use of shared memory as
memory (a slice loaded after a store reads what was stored). What it cannot: layouts only
say how a GPU spreads a tensor over its threads, so they are carried and checked for
agreement where Gluon checks them, and otherwise ignored; barriers are no-ops, because one
program runs at a time, so a missing barrier (a race between a program's threads) would
not show here. In compiled code there is none to miss: the compiler's shared-memory
barrier analysis (membar) puts a barrier wherever a thread may read or overwrite what
another stored, in Gluon kernels as in Triton's (for sm_90a, the fused kernel at the
benchmark target compiles to 38 barriers without its own and 41 with them on triton 3.9,
34 and 37 on 3.6), so the kernels' barriers say where threads meet rather than make it
so. A GPU checks the rest.

Built on Triton's interpreter (its numpy builder and argument handling), with the Gluon
operations it lacks added: shared-memory allocations are numpy arrays, loads and stores of
them copies, slices views. Nested `@triton.jit` helpers run with the same semantics, so a
Gluon kernel may call the Triton helpers the other kernels use.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager

import numpy as np
import triton.language as tl
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonJITFunction
from triton.experimental.gluon.language import _core as gl_core
from triton.experimental.gluon.language._layouts import SliceLayout
from triton.experimental.gluon.language._semantic import GluonSemantic
from triton.runtime import interpreter as interp


class _SharedHandle:
    """A shared-memory allocation or a view of one: `data` is a numpy view."""

    def __init__(self, data: np.ndarray):
        self.data = data


@dataclasses.dataclass(frozen=True)
class _Options(interp.InterpreterOptions):
    num_ctas: int = 1  # one program at a time: no clusters
    num_warps: int = 4


class _GluonBuilder(interp.InterpreterBuilder):
    """Triton's interpreter builder with the Gluon operations and types a kernel uses."""

    def __init__(self) -> None:
        super().__init__()
        self.options = _Options()

    # Types: a distributed tensor is a block; layouts are not IR here but stay on the
    # Python types, where Gluon's semantics check them.
    def get_distributed_ty(self, element_ty, shape, layout):
        return tl.block_type(element_ty, list(shape))

    def get_shared_mem_desc_ty(self, element_ty, shape, layout, alloc_shape):
        return tl.block_type(element_ty, list(shape))

    def __getattr__(self, name):
        # get_blocked_layout, get_slice_layout, get_swizzled_shared_layout, ...: layouts are
        # carried by the Python types, so their IR form is never used.
        if name.startswith("get_") and name.endswith("_layout"):
            return lambda *args, **kwargs: None
        raise AttributeError(f"the Gluon CPU runner has no {name!r}")

    def get_gluon_layout_from_tensor(self, handle):
        raise NotImplementedError(
            "the Gluon CPU runner does not infer result layouts (permute, reshape, join, "
            "split of registers): only those the kernel states, expand_dims' and reductions'"
        )

    def create_broadcast(self, arg, shape):
        shape = shape.shape if hasattr(shape, "shape") else shape
        return super().create_broadcast(arg, shape)

    def create_convert_layout(self, ty, value):
        return value

    def create_set_auto_layout(self, layout, value):
        return value

    def create_local_alloc(self, ty, value=None):
        data = np.zeros(ty.shape, dtype=interp._get_np_dtype(ty.element_ty))
        if value is not None:
            data[...] = value.data
        return _SharedHandle(data)

    def create_local_load(self, ty, handle):
        return interp.TensorHandle(handle.data.copy(), ty.element_ty)

    def create_local_store(self, handle, value):
        handle.data[...] = value.data

    def create_local_dealloc(self, handle):
        pass

    def create_memdesc_subslice(self, ty, handle, offsets):
        index = tuple(slice(o, o + n) for o, n in zip(offsets, ty.shape, strict=True))
        return _SharedHandle(handle.data[index])

    def create_memdesc_index(self, ty, handle, index):
        return _SharedHandle(handle.data[int(index.data.item())])

    def create_memdesc_trans(self, handle, order):
        return _SharedHandle(np.transpose(handle.data, order))

    def create_memdesc_reshape(self, handle, shape):
        data = handle.data.reshape(shape)
        if not np.shares_memory(data, handle.data):  # a copy would not be shared memory
            raise NotImplementedError("reshape of a non-contiguous shared-memory view")
        return _SharedHandle(data)

    def create_memdesc_reinterpret(self, ty, handle):
        return self.create_memdesc_reshape(handle, ty.shape)

    def get_gluon_layout_from_memdesc(self, handle):
        # Views' types need a shared layout; which one does not matter here.
        return gl.SwizzledSharedLayout(1, 1, 1, list(reversed(range(handle.data.ndim))))


class _GluonCpuSemantic(GluonSemantic):
    """Gluon's semantics on the CPU builder. Gluon asks the compiler for the layout of
    some results (expand_dims' parent layout); here it follows from the operand's."""

    def expand_dims(self, input, axis):
        layout = input.type.layout
        if not isinstance(layout, SliceLayout) or layout.dim != axis:
            raise ValueError(f"expand_dims on axis {axis} of a tensor laid out as {layout}")
        shape = list(input.shape)
        shape.insert(axis, 1)
        handle = self.builder.create_expand_dims(input.handle, axis)
        return self.tensor(handle, gl.distributed_type(input.type.scalar, shape, layout.parent))


def _reduce(input, axis, combine_fn, keep_dims=False, **kwargs):
    """tl.reduce (and so tl.sum, tl.max, ...) by the interpreter's numpy reductions, with
    the layout Gluon gives the result: the input's, sliced along the reduced axis."""
    inputs = input if isinstance(input, tuple) else (input,)
    results = interp.ReduceOps(axis, combine_fn, keep_dims).apply(inputs)
    layout = getattr(inputs[0].type, "layout", None)
    if layout is not None and axis is not None:
        if not keep_dims:
            layout = SliceLayout(axis, layout)
        results = tuple(
            tl.tensor(r.handle, gl.distributed_type(r.dtype, list(r.shape), layout))
            if r.shape
            else r
            for r in results
        )
    return results if isinstance(input, tuple) else results[0]


_builder = _GluonBuilder()
_semantic = _GluonCpuSemantic(_builder)


def _takes_semantic(member) -> bool:
    """Builtins, and the functions the compiler hands its semantics to without marking
    them builtin (shared_memory_descriptor.slice)."""
    if getattr(member, gl_core.GLUON_BUILTIN, False) or tl.core.is_builtin(member):
        return True
    return inspect.isfunction(member) and "_semantic" in inspect.signature(member).parameters


def _unpatched(member):
    """The language function behind an interpreter binding. Triton's interpreter binds a
    builtin to its semantics as `lambda *args, member=builtin, **kwargs` and leaves some
    bound after a kernel (those of modules only its own helpers see, as tl.core from
    tl.cdiv); the runner binds as `_member=`."""
    while True:
        bound = getattr(member, "__kwdefaults__", None) or {}
        inner = bound.get("member", bound.get("_member"))
        if inner is None:
            return member
        member = inner


def _bind(member):
    """`member` with the runner's semantics, whatever semantics its caller passes."""

    def bound(*args, _member=member, **kwargs):
        kwargs.pop("_semantic", None)
        return _member(*args, **kwargs, _semantic=_semantic)

    return bound


def _patch_builtins(owner, scope) -> None:
    for name, member in inspect.getmembers(owner):
        member = _unpatched(member)
        if _takes_semantic(member):
            scope.set_attr(owner, name, _bind(member))


@contextmanager
def _gluon_language():
    """Gluon's and Triton's language bound to the CPU semantics, and @triton.jit helpers
    called as plain functions under them, for the duration."""
    scope = interp._LangPatchScope()
    try:
        for owner in (gl, gl_core, gl.shared_memory_descriptor, tl, tl.core, tl.math, tl.tensor):
            _patch_builtins(owner, scope)
        interp._patch_lang_tensor(tl.tensor, scope)
        interp._patch_lang_core(tl, scope)
        scope.set_attr(gl, "static_range", tl.static_range)
        for owner in (gl, gl_core, tl, tl.core):
            scope.set_attr(owner, "reduce", _reduce)

        def call_helper(self, *args, **kwargs):
            return self.rewrite()(*args, **kwargs)

        scope.set_attr(interp.InterpretedFunction, "__call__", call_helper)
        # Gluon's own jit functions (gl.zeros, ...) and a kernel's Gluon helpers likewise.
        scope.set_attr(GluonJITFunction, "__call__", lambda self, *a, **k: self.fn(*a, **k))
        yield
    finally:
        scope.restore()


def run(kernel, grid, *args, **kwargs) -> None:
    """Launch the Gluon kernel `kernel` (a @gluon.jit function) on CPU tensors, as
    `kernel[grid](*args, **kwargs)` would on a GPU. Launch options are accepted; only
    num_warps means anything here (what gl.num_warps() returns)."""
    fn = kernel.fn
    _builder.options = _Options(num_warps=kwargs.get("num_warps", 4))  # for gl.num_warps()
    executor = interp.GridExecutor(fn, kernel.arg_names, grid)
    constexprs = {param.name for param in kernel.params if param.is_constexpr}
    names = set(inspect.signature(fn).parameters)
    kwargs = {k: v for k, v in kwargs.items() if k in names}
    args_hst, kwargs_hst = executor._init_args_hst(args, kwargs)
    with _gluon_language():
        call_args = inspect.getcallargs(fn, *args_hst, **kwargs_hst)
        call_args = {
            name: value if name in constexprs else interp._implicit_cvt(value)
            for name, value in call_args.items()
        }
        grid = tuple(grid) + (1,) * (3 - len(grid))
        _builder.set_grid_dim(*grid)
        for x in range(grid[0]):
            for y in range(grid[1]):
                for z in range(grid[2]):
                    _builder.set_grid_idx(x, y, z)
                    fn(**call_args)
    executor._restore_args_dev(args, args_hst, kwargs, kwargs_hst)
