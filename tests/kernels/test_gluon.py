"""The Gluon kernels on the CPU (kernels/gluon_cpu.py runs them one program at a time):
the runner itself, the IEEE float32 batched GEMM (gluon_matmul.py) against float64 torch,
and float32_matmul="gluon" through the engine (the per-layer path on that GEMM, fused jobs
on gluon_fused.py) against the float64 oracle."""

import math

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

from gradserve import kernels  # noqa: E402
from gradserve.kernels import gluon_cpu, gluon_fused, gluon_matmul, triton_engine  # noqa: E402
from gradserve.kernels.triton_common import ACTIVATION_CODES  # noqa: E402
from tests.jobs import ensemble_job, random_job  # noqa: E402
from tests.kernels.gemm_checks import (  # noqa: E402
    assert_within_fp32_bound,
    operands,
    recorded_splits,
)
from tests.oracle import (  # noqa: E402
    activation_module,
    assert_close_per_model,
    assert_matches_oracle,
    assert_same_results,
    engine_tensors,
    oracle_for,
)

pytestmark = pytest.mark.skipif(
    not triton_engine.interpreted(), reason="the CPU runner is for TRITON_INTERPRET=1"
)

TILE = gl.BlockedLayout([2, 2], [4, 8], [2, 1], [1, 0])  # 16 x 16, as 2 warps would hold it


@gluon.jit
def _product_through_shared(x_ptr, y_ptr, out_ptr, N: gl.constexpr, LAYOUT: gl.constexpr):
    """out = x @ y for N x N tiles, from slices of shared memory (columns of x, rows of y),
    written back over x's buffer and read from it: what a slice or a load reads is what
    was last stored there."""
    rows = gl.arange(0, N, layout=gl.SliceLayout(1, LAYOUT))
    cols = gl.arange(0, N, layout=gl.SliceLayout(0, LAYOUT))
    offsets = rows[:, None] * N + cols[None, :]
    x_s = gl.allocate_shared_memory(
        gl.float32, [N, N], gl.SwizzledSharedLayout(1, 1, 1, [0, 1]), gl.load(x_ptr + offsets)
    )
    y_s = gl.allocate_shared_memory(gl.float32, [N, N], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    y_s.store(gl.load(y_ptr + offsets))
    acc = gl.zeros([N, N], gl.float32, LAYOUT)
    for k in gl.static_range(N):
        acc += x_s.slice(k, 1, dim=1).load(LAYOUT) * y_s.slice(k, 1, dim=0).load(LAYOUT)
    x_s.store(acc)
    gl.store(out_ptr + offsets, x_s.load(LAYOUT))


@gluon.jit
def _add_in_two_layouts(x_ptr, out_ptr, N: gl.constexpr, A: gl.constexpr, B: gl.constexpr):
    a = gl.load(x_ptr + gl.arange(0, N, layout=A))
    b = gl.load(x_ptr + gl.arange(0, N, layout=B))
    gl.store(out_ptr + gl.arange(0, N, layout=A), a + b)


def test_runner_keeps_shared_memory_as_memory():
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    out = torch.full_like(x, float("nan"))
    gluon_cpu.run(_product_through_shared, (1,), x, y, out, 16, TILE, num_warps=2)
    torch.testing.assert_close(out.double(), x.double() @ y.double(), rtol=1e-6, atol=1e-6)


def test_runner_refuses_what_gluon_refuses_a_layout_mismatch():
    """Operands in different layouts need a convert_layout in Gluon; the runner says so as
    the GPU compiler would, instead of computing what no GPU build would run."""
    x, out = torch.randn(32), torch.empty(32)
    a = gl.BlockedLayout([1], [32], [1], [0])
    b = gl.BlockedLayout([2], [32], [1], [0])
    with pytest.raises(ValueError, match="[Ll]ayout mismatch"):
        gluon_cpu.run(_add_in_two_layouts, (1,), x, out, 32, a, b)
    gluon_cpu.run(_add_in_two_layouts, (1,), x, out, 32, a, a)
    assert torch.equal(out, 2 * x)


# (P, K, Q): one of everything, odd sizes, sizes crossing the large tiles' edges, and K in
# an odd (1, 3, 5) and an even (4) number of steps of 16: the K loop takes two an iteration
SHAPES = [(1, 1, 1), (1, 37, 1), (37, 70, 45), (130, 33, 129), (33, 64, 65)]


def _gemm(a, b, batch, epilogue, act, tiles, bias=None, aux=None, slope=0.1):
    p, q = a.shape[-2], b.shape[-1]
    c = torch.full((batch, p, q), float("nan"))
    gluon_matmul.launch(a, b, c, bias, aux, batch, epilogue=epilogue, act=act, slope=slope,
                        tiles=tiles)  # fmt: skip
    return c


TILES = {
    "small": gluon_matmul.SMALL_TILES,
    "large": gluon_matmul.LARGE_TILES,
    "one buffer": dict(gluon_matmul.SMALL_TILES, buffers=1),  # the sweep's alternative
}


@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("layouts", [("rows", "columns"), ("columns", "rows"),
                                     ("rows", "rows"), ("shared", "columns")])  # fmt: skip
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_float64_products(shape, layouts, tiles):
    p, k, q = shape
    batch = 2
    a, b = operands(p, k, q, batch, *layouts, seed=p + k + q)
    got = _gemm(a, b, batch, epilogue=0, act=0, tiles=TILES[tiles])
    a64, b64 = a.double(), b.double()
    expected = a64 @ b64
    assert_within_fp32_bound(got, expected, k * (a64.abs() @ b64.abs()))


@pytest.mark.parametrize("act", kernels.ACTIVATIONS)
def test_gemm_epilogues_for_every_activation(act):
    """Forward (+ bias, then act stored beside) and backward (* act'(Z)) epilogues."""
    p, k, q, batch = 37, 70, 45, 2
    a, b = operands(p, k, q, batch, "rows", "columns", seed=11)
    code = ACTIVATION_CODES[act]
    gen = torch.Generator().manual_seed(12)
    bias = torch.randn(batch, q, generator=gen)
    h = torch.full((batch, p, q), float("nan"))
    z = _gemm(a, b, batch, epilogue=1, act=code, tiles=gluon_matmul.SMALL_TILES, bias=bias, aux=h)
    a64, b64 = a.double(), b.double()
    z64 = a64 @ b64 + bias.double()[:, None, :]
    bound = k * (a64.abs() @ b64.abs()) + bias.double().abs()[:, None, :]
    assert_within_fp32_bound(z, z64, bound)
    # act(Z) from the kernel's own Z: the activation's float32 accuracy, not the product's
    module = activation_module(act, negative_slope=0.1)
    torch.testing.assert_close(h.double(), module(z.double()), rtol=2e-6, atol=2e-6)

    zin = torch.randn(batch, p, q, generator=gen)
    got = _gemm(a, b, batch, epilogue=2, act=code, tiles=gluon_matmul.SMALL_TILES, aux=zin)
    zgrad = zin.double().requires_grad_()
    (derivative,) = torch.autograd.grad(module(zgrad).sum(), zgrad)
    product = a64 @ b64
    expected = product * derivative
    # the product's bound, scaled by the derivative, and the derivative's own float32 error
    bound = k * (a64.abs() @ b64.abs()) * derivative.abs() + 64 * product.abs()
    assert_within_fp32_bound(got, expected, bound)


def test_gemm_gives_the_same_bits_twice():
    a, b = operands(130, 33, 129, 2, "columns", "rows", seed=5)
    first = _gemm(a, b, 2, epilogue=0, act=0, tiles=gluon_matmul.LARGE_TILES)
    second = _gemm(a, b, 2, epilogue=0, act=0, tiles=gluon_matmul.LARGE_TILES)
    assert torch.equal(first, second)


@pytest.mark.parametrize("k_per_split", [128, 48])  # split_length's multiple of 128; 3 K steps
@pytest.mark.parametrize("tiles", ["small", "large"])
def test_gemm_split_into_k_ranges_adds_up_to_the_product(tiles, k_per_split):
    """A plain product split along K (as split_length splits a weight gradient's samples
    on a GPU whose SMs its tiles leave idle): range s of each batch's product goes to
    c[b, s], and the ranges add up to the product; the last range is the rest of K."""
    p, k, q, batch = 37, 300, 45, 2
    a, b = operands(p, k, q, batch, "columns", "rows", seed=7)
    splits = math.ceil(k / k_per_split)
    c = torch.full((batch, splits, p, q), float("nan"))
    gluon_matmul.launch(a, b, c, None, None, batch, epilogue=0, act=0, slope=0.0,
                        tiles=TILES[tiles], k_per_split=k_per_split)  # fmt: skip
    a64, b64 = a.double(), b.double()
    for s in range(splits):
        ks = slice(s * k_per_split, (s + 1) * k_per_split)
        part_a, part_b = a64[..., ks], b64[..., ks, :]
        length = part_a.shape[-1]
        assert_within_fp32_bound(c[:, s], part_a @ part_b, length * (part_a.abs() @ part_b.abs()))
    # and the ranges add up to the whole product, as sum_partials adds them
    assert_within_fp32_bound(c.double().sum(1), a64 @ b64, k * (a64.abs() @ b64.abs()))


WIDE_SIZES = (5, 150, 3)  # wider than the fused kernel's 128: the per-layer path


@pytest.fixture
def gluon_gemm(monkeypatch):
    """The epilogues of the Gluon GEMM's launches while a test runs."""
    launched = []
    launch = gluon_matmul.launch

    def counted(*args, **kwargs):
        launched.append(kwargs["epilogue"])
        return launch(*args, **kwargs)

    monkeypatch.setattr(gluon_matmul, "launch", counted)
    return launched


def _check(sizes, tensors, **options):
    """float32_matmul="gluon" on the job against the oracle: on the per-layer path where a
    layer is wider than 128, else on the fused kernel."""
    job = ensemble_job(tensors, sizes, **options)
    got = triton_engine.run(job, "cpu", float32_matmul="gluon")
    assert_matches_oracle(engine_tensors(got), oracle_for(sizes, tensors, **options), "float32")
    return got


@pytest.mark.parametrize("hidden", kernels.ACTIVATIONS)
def test_per_layer_path_on_gluon_matches_oracle_for_every_activation(gluon_gemm, hidden):
    tensors = random_job(WIDE_SIZES, 2, 21, seed=3)
    _check(WIDE_SIZES, tensors, hidden=hidden, output="tanh", negative_slope=0.2)
    # forward (+ bias, act) per layer, then dW (no epilogue) and dZ (* act') or dX
    assert sorted(set(gluon_gemm)) == [0, 1, 2]


@pytest.mark.parametrize("loss", kernels.LOSSES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
@pytest.mark.parametrize("m, n", [(1, 1), (3, 37)])
def test_per_layer_path_on_gluon_matches_oracle_for_every_loss(gluon_gemm, m, n, shared, loss):
    tensors = random_job(
        WIDE_SIZES, m, n, loss=loss, shared_inputs=shared, sample_weights=True, seed=m + n
    )
    _check(WIDE_SIZES, tensors, hidden="gelu", output="identity", loss=loss)


def test_per_layer_path_on_gluon_gives_the_same_bits_twice(gluon_gemm):
    sizes = (7, 33, 150, 2)
    tensors = random_job(sizes, 2, 19, seed=4)
    first = engine_tensors(_check(sizes, tensors, hidden="silu"))
    second = engine_tensors(_check(sizes, tensors, hidden="silu"))
    assert_same_results(first, second, "float32", exact=True)


@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
def test_per_layer_sums_split_across_programs_on_gluon(gluon_gemm, monkeypatch, shared):
    """The Gluon GEMM's weight-gradient products split over the samples as the tl.dot
    GEMM's do (test_triton_engine's test of the split): forced here (64 SMs, ranges of at
    least 100 samples), N = 300 in three ranges, against the oracle, the same bits twice."""
    from gradserve.kernels import triton_layered

    monkeypatch.setattr(triton_layered, "multiprocessors", lambda device: 64)
    monkeypatch.setattr(triton_layered, "SPLIT_MIN_LENGTH", 100)
    tensors = random_job(WIDE_SIZES, 2, 300, shared_inputs=shared, sample_weights=True, seed=5)
    with recorded_splits([]) as splits:
        first = engine_tensors(_check(WIDE_SIZES, tensors, hidden="tanh"))
    assert splits == [3, 3, 3, 3], splits  # both layers' dW products and bias sums
    assert 0 in gluon_gemm  # the dW products on the Gluon GEMM
    second = engine_tensors(_check(WIDE_SIZES, tensors, hidden="tanh"))
    assert_same_results(first, second, "float32", exact=True)


def test_other_precisions_stay_on_tl_dot(gluon_gemm):
    """The Gluon GEMM is IEEE float32's: tf32 jobs keep Triton's tensor-core kernel."""
    tensors = random_job(WIDE_SIZES, 2, 9, seed=6)
    job = ensemble_job(tensors, WIDE_SIZES, precision="tf32")
    triton_engine.run(job, "cpu", path="per_layer", float32_matmul="gluon")
    assert gluon_gemm == []


# The fused kernel (gluon_fused.py): float32_matmul="gluon" on fused jobs without per-sample
# norms up to padded width 64.
# Outputs up to gluon_fused.NARROW_OUTPUT wide take its reductions, wider ones the padded
# products: each network below has a twin with a wide output layer.
ODD_SIZES = (5, 13, 7, 3)  # every width padded, to 16
ODD_WIDE_OUT = (5, 13, 7, 9)
MIXED_SIZES = (37, 5, 60, 3)  # padded 64, 16, 64, 16: products of every shape pair
MIXED_WIDE_OUT = (37, 5, 60, 20)  # padded 64, 16, 64, 32
TARGET_SIZES = (32, 64, 64, 64, 1)  # the benchmark target's network: unpadded widths


@pytest.fixture
def gluon_fused_runs(monkeypatch):
    """How many jobs ran on the Gluon fused kernel while a test runs."""
    runs = []
    fused_mlp = gluon_fused.fused_mlp

    def counted(*args, **kwargs):
        runs.append(kwargs)
        return fused_mlp(*args, **kwargs)

    monkeypatch.setattr(gluon_fused, "fused_mlp", counted)
    return runs


@pytest.mark.parametrize("sizes", [ODD_SIZES, ODD_WIDE_OUT], ids=["narrow_out", "wide_out"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
@pytest.mark.parametrize("loss", kernels.LOSSES)
@pytest.mark.parametrize("hidden", kernels.ACTIVATIONS)
def test_fused_on_gluon_matches_oracle_for_every_activation_and_loss(
    gluon_fused_runs, hidden, loss, shared, sizes
):
    tensors = random_job(sizes, 3, 37, loss=loss, shared_inputs=shared, seed=3)
    _check(sizes, tensors, hidden=hidden, loss=loss)
    assert len(gluon_fused_runs) == 1


@pytest.mark.parametrize("sizes", [MIXED_SIZES, MIXED_WIDE_OUT], ids=["narrow_out", "wide_out"])
@pytest.mark.parametrize("output", kernels.ACTIVATIONS)
def test_fused_on_gluon_output_activations(gluon_fused_runs, output, sizes):
    tensors = random_job(sizes, 2, 17, sample_weights=True, seed=5)
    _check(sizes, tensors, hidden="leaky_relu", output=output, negative_slope=0.2,
           output_slope=0.05, loss="huber", huber_delta=0.3)  # fmt: skip
    assert len(gluon_fused_runs) == 1


# Output widths either side of NARROW_OUTPUT (4), single-layer networks (the output layer's
# input is the job's), and an output padded to 64.
@pytest.mark.parametrize(
    "sizes", [(6, 20, 1), (6, 20, 2), (6, 20, 4), (6, 20, 5), (9, 1), (9, 4), (9, 7), (3, 40, 64)]
)
def test_fused_on_gluon_output_widths(gluon_fused_runs, sizes):
    tensors = random_job(sizes, 2, 29, sample_weights=True, seed=sum(sizes))
    job = ensemble_job(tensors, sizes, hidden="tanh", output="sigmoid", loss="bce_with_logits")
    job.outputs = kernels.OutputRequest(True, True, True, True)
    got = engine_tensors(triton_engine.run(job, "cpu", float32_matmul="gluon"))
    expected = oracle_for(sizes, tensors, hidden="tanh", output="sigmoid",
                          loss="bce_with_logits").by_name()  # fmt: skip
    assert "inputs.grad" in got and "outputs" in got
    for name, value in got.items():
        assert_close_per_model(name, value, expected[name], "float32")
    assert len(gluon_fused_runs) == 1


def test_fused_on_gluon_narrow_outputs_take_the_reductions(monkeypatch):
    """With NARROW_OUTPUT 0 a 4-wide output layer runs on the padded products: both ways
    match the oracle, in different last bits (the reductions add in another order)."""
    sizes = (6, 20, 4)
    tensors = random_job(sizes, 2, 29, seed=8)
    reduced = engine_tensors(_check(sizes, tensors, hidden="gelu"))
    monkeypatch.setattr(gluon_fused, "NARROW_OUTPUT", 0)
    products = engine_tensors(_check(sizes, tensors, hidden="gelu"))
    assert any((reduced[name] != products[name]).any() for name in reduced)


def _assert_covers_once(layout, shape):
    """A layout of a program's threads over `shape` gives no thread copies: no dimension
    is covered more than once, every lane and warp of the program is used."""
    for d, size in enumerate(shape):
        covered = (layout.size_per_thread[d] * layout.threads_per_warp[d]
                   * layout.warps_per_cta[d])  # fmt: skip
        assert covered <= size, (shape, layout)
    assert math.prod(layout.threads_per_warp) == 32
    assert math.prod(layout.warps_per_cta) == gluon_fused.NUM_WARPS


@pytest.mark.parametrize("block_n", [16, 32, 64, 128])
def test_weight_gradient_groups_fit_their_shared_memory_and_use_every_thread(block_n):
    """gradient_layout: more than one group's [Q, K] sums fit the layer input's shared
    memory (DP x block_n floats), where they are added (one group adds nothing across
    threads), and every thread holds its own outputs (no layout dimension wider than the
    tensor, which would give threads copies)."""
    widths = [16, 32, 64]
    for q, k, dp in [(q, k, dp) for q in widths for k in widths for dp in widths]:
        if dp < max(q, k):
            continue
        groups, layout = gluon_fused.gradient_layout(q, k, block_n, dp * block_n)
        assert 1 <= groups <= block_n, (q, k, dp)
        assert groups == 1 or groups * q * k <= dp * block_n, (q, k, dp)
        _assert_covers_once(layout, [groups, q, k])


def test_transposed_weight_layout_gives_every_weight_to_one_thread():
    """transposed_weight_layout (the forward product's W^T, loaded with lanes along d_out)
    covers no dimension of a [d_out, d_in] weight more than once, for every width pair with
    4 weights for each thread (16 x 16 has 2: any layout of 4 a thread repeats some)."""
    for d_out in [16, 32, 64]:
        for d_in in [16, 32, 64]:
            if d_out * d_in < 4 * 32 * gluon_fused.NUM_WARPS:
                continue
            _assert_covers_once(gluon_fused.transposed_weight_layout(d_out, d_in), [d_out, d_in])


@pytest.mark.parametrize("n", [1, 37, 300])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
def test_fused_on_gluon_matches_oracle_for_ensemble_and_sample_counts(
    gluon_fused_runs, m, n, shared
):
    """N=300: three blocks of 128 samples, the partial gradients added block after block."""
    sizes = TARGET_SIZES if n == 300 else MIXED_SIZES
    tensors = random_job(sizes, m, n, loss="cross_entropy" if sizes[-1] > 1 else "mse",
                         shared_inputs=shared, sample_weights=True, seed=m * n)  # fmt: skip
    loss = "cross_entropy" if sizes[-1] > 1 else "mse"
    _check(sizes, tensors, hidden="silu", loss=loss, reduction="sum")
    assert len(gluon_fused_runs) == 1


@pytest.mark.parametrize("sizes", [MIXED_SIZES, MIXED_WIDE_OUT, (9, 1)],
                         ids=["narrow_out", "wide_out", "one_layer"])  # fmt: skip
@pytest.mark.parametrize("param_grads, input_grads", [(False, True), (True, False), (False, False)])
def test_fused_on_gluon_computes_only_what_is_asked(
    gluon_fused_runs, param_grads, input_grads, sizes
):
    tensors = random_job(sizes, 2, 21, seed=11)
    job = ensemble_job(tensors, sizes, hidden="tanh")
    job.outputs = kernels.OutputRequest(param_grads, input_grads, True, True)
    got = engine_tensors(triton_engine.run(job, "cpu", float32_matmul="gluon"))
    assert ("layers.0.weight.grad" in got) == param_grads
    assert ("inputs.grad" in got) == input_grads
    expected = oracle_for(sizes, tensors, hidden="tanh").by_name()
    for name, value in got.items():
        assert_close_per_model(name, value, expected[name], "float32")
    assert len(gluon_fused_runs) == 1


def test_fused_on_gluon_gives_the_same_bits_twice(gluon_fused_runs):
    tensors = random_job(TARGET_SIZES, 2, 300, seed=4)
    first = engine_tensors(_check(TARGET_SIZES, tensors, hidden="gelu"))
    second = engine_tensors(_check(TARGET_SIZES, tensors, hidden="gelu"))
    assert_same_results(first, second, "float32", exact=True)


@pytest.mark.parametrize(
    "sizes, norms", [((5, 100, 3), False), (ODD_SIZES, True)], ids=["width_128", "norms"]
)
def test_fused_jobs_beyond_the_gluon_kernel_run_on_triton_s(gluon_fused_runs, sizes, norms):
    """Padded width 128 and per-sample norms: the Triton fused kernel's, as under "ieee"."""
    tensors = random_job(sizes, 2, 9, seed=6)
    job = ensemble_job(tensors, sizes)
    if norms:
        job.outputs = kernels.OutputRequest(True, True, True, True, per_sample_gradient_norms=True)
    got = triton_engine.run(job, "cpu", float32_matmul="gluon", path="fused")
    assert_matches_oracle(engine_tensors(got), oracle_for(sizes, tensors), "float32")
    assert gluon_fused_runs == []


def test_gluon_without_gluon_in_triton_is_refused_clearly(monkeypatch):
    """Triton before 3.6 has no Gluon: float32_matmul="gluon" says so before anything runs."""
    monkeypatch.setattr(triton_engine, "gluon_available", lambda: False)
    tensors = random_job(ODD_SIZES, 1, 3, seed=1)
    with pytest.raises(ValueError, match="needs Triton with Gluon"):
        triton_engine.run(ensemble_job(tensors, ODD_SIZES), "cpu", float32_matmul="gluon")
