"""The Triton engine against the float64 oracle (on CPUs through Triton's interpreter).

Shapes stay small: the interpreter runs every program in numpy.
"""

import dataclasses
import warnings

import pytest
import torch

from gradserve import kernels
from gradserve.kernels import triton_engine
from tests import per_sample
from tests.jobs import ensemble_job, random_job
from tests.kernels.gemm_checks import recorded_splits
from tests.oracle import (
    assert_close_per_model,
    assert_matches_oracle,
    assert_same_results,
    engine_tensors,
    oracle_for,
    same_bits,
)

ODD_SIZES = (5, 13, 7, 3)
WIDE_SIZES = (5, 150, 3)  # a layer wider than 128 takes the per-layer GEMM path
# Widths padding to different powers of two (64, 16, 128, 16): each layer computes on its
# own padded tile, loaded with masks from the unpadded parameters.
MIXED_SIZES = (37, 5, 70, 3)
# Powers of two >= 16 but the output: layers 0 and 1 load without masks, layer 2 with.
EXACT_SIZES = (32, 16, 32, 3)
# In float32 an output layer up to triton_fused.NARROW_OUTPUT (4) units wide runs as
# reductions, a wider one as the padded products: twins of the networks above with wide
# output layers keep the products checked in float32.
ODD_WIDE_OUT = (5, 13, 7, 9)
MIXED_WIDE_OUT = (37, 5, 70, 20)  # padded 64, 16, 128, 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(layer_sizes, tensors, precision="float32", path="auto", **options):
    job = ensemble_job(tensors, layer_sizes, precision=precision, **options)
    got = triton_engine.run(job, DEVICE, path=path)
    assert got.engine == "triton"
    assert_matches_oracle(
        engine_tensors(got), oracle_for(layer_sizes, tensors, **options), precision
    )
    return got


@pytest.mark.parametrize("sizes", [ODD_SIZES, ODD_WIDE_OUT], ids=["narrow_out", "wide_out"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
@pytest.mark.parametrize("loss", kernels.LOSSES)
@pytest.mark.parametrize("hidden", kernels.ACTIVATIONS)
def test_fused_matches_oracle_for_every_activation_and_loss(hidden, loss, shared, sizes):
    tensors = random_job(sizes, 3, 37, loss=loss, shared_inputs=shared, seed=3)
    check(sizes, tensors, hidden=hidden, loss=loss)


@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
def test_fused_matches_oracle_for_ensemble_and_sample_counts(m, n, shared):
    tensors = random_job(
        ODD_SIZES, m, n, loss="cross_entropy", shared_inputs=shared, sample_weights=True, seed=m * n
    )
    check(ODD_SIZES, tensors, hidden="silu", loss="cross_entropy")


@pytest.mark.parametrize("loss", kernels.LOSSES)
def test_sum_reduction_and_sample_weights(loss):
    tensors = random_job(ODD_SIZES, 2, 20, loss=loss, sample_weights=True, seed=9)
    check(ODD_SIZES, tensors, hidden="tanh", loss=loss, reduction="sum")


@pytest.mark.parametrize("sizes", [(4, 9, 2), (4, 9, 6)], ids=["narrow_out", "wide_out"])
@pytest.mark.parametrize("output", kernels.ACTIVATIONS)
def test_output_activations(output, sizes):
    tensors = random_job(sizes, 2, 17, seed=5)
    check(sizes, tensors, hidden="softplus", output=output)


# Output widths either side of NARROW_OUTPUT (4), one-layer networks (the output layer's
# input is the job's) and an output padded to 64, with every result the kernel computes
# from the output layer: the forward pass, dW and the input gradient, in the main backward
# pass and in the per-sample norm pass (against vmap(grad) per-sample gradients in float64).
@pytest.mark.parametrize(
    "sizes", [(6, 20, 1), (6, 20, 2), (6, 20, 4), (6, 20, 5), (9, 1), (9, 4), (9, 7), (3, 40, 64)]
)
@pytest.mark.parametrize("norms", [False, True], ids=["", "norms"])
@pytest.mark.parametrize("method", ["ieee", "tf32x3"])
def test_fused_output_widths(sizes, norms, method):
    tensors = random_job(sizes, 2, 29, loss="bce_with_logits", sample_weights=True, seed=sum(sizes))
    options = dict(hidden="tanh", loss="bce_with_logits")
    job = ensemble_job(tensors, sizes, **options)
    job.outputs = kernels.OutputRequest(True, True, True, True, norms)
    got = triton_engine.run(job, DEVICE, path="fused", float32_matmul=method)
    assert_matches_oracle(engine_tensors(got), oracle_for(sizes, tensors, **options), "float32")
    assert got.input_grads is not None and got.outputs is not None
    if norms:  # the norm pass (its own input gradient, from the output layer's reductions)
        grads = per_sample.per_sample_gradients(tensors, sizes, "tanh", "bce_with_logits", "mean")
        torch.testing.assert_close(got.per_sample_grad_norm.double().cpu(),
                                   per_sample.norms(grads), rtol=1e-5, atol=1e-9)  # fmt: skip


@pytest.mark.parametrize("method", ["ieee", "tf32x3"])
def test_narrow_outputs_take_the_reductions(monkeypatch, method):
    """With NARROW_OUTPUT 0 a 4-wide float32 output layer runs on the padded products: both
    ways match the oracle, in different last bits (the reductions add in another order)."""
    from gradserve.kernels import triton_fused

    sizes = (6, 20, 4)
    tensors = random_job(sizes, 2, 29, seed=8)
    job = ensemble_job(tensors, sizes, hidden="gelu")
    job.outputs = kernels.OutputRequest(True, True, True, True)
    reduced = engine_tensors(triton_engine.run(job, DEVICE, path="fused", float32_matmul=method))
    monkeypatch.setattr(triton_fused, "NARROW_OUTPUT", 0)
    products = engine_tensors(triton_engine.run(job, DEVICE, path="fused", float32_matmul=method))
    expected = oracle_for(sizes, tensors, hidden="gelu")
    assert_matches_oracle(reduced, expected, "float32")
    assert_matches_oracle(products, expected, "float32")
    assert any((reduced[name] != products[name]).any() for name in reduced)


def test_leaky_relu_slope_and_huber_delta():
    tensors = random_job(ODD_SIZES, 2, 21, seed=6)
    check(
        ODD_SIZES, tensors, hidden="leaky_relu", negative_slope=0.3, loss="huber", huber_delta=0.2
    )


@pytest.mark.parametrize("sizes", [ODD_SIZES, WIDE_SIZES], ids=["fused", "per_layer"])
def test_hidden_and_output_leaky_relus_keep_their_own_slopes(sizes):
    tensors = random_job(sizes, 2, 21, seed=8)
    check(
        sizes, tensors, hidden="leaky_relu", output="leaky_relu", negative_slope=0.3,
        output_slope=0.05,
    )  # fmt: skip


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
@pytest.mark.parametrize("m, n", [(1, 1), (3, 37)])
def test_wide_layer_takes_the_per_layer_path(m, n, shared, loss):
    tensors = random_job(
        WIDE_SIZES, m, n, loss=loss, shared_inputs=shared, sample_weights=True, seed=n
    )
    check(WIDE_SIZES, tensors, hidden="gelu", output="tanh", loss=loss)


@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("m", [1, 3])
def test_narrow_networks_forced_onto_the_per_layer_path(m, n):
    """path="per_layer", which the GPU benchmarks time against the fused kernel on the same
    job: odd widths the per-layer GEMMs mask to their tiles."""
    tensors = random_job(
        ODD_SIZES, m, n, loss="huber", shared_inputs=m == 3, sample_weights=True, seed=m + n
    )
    check(ODD_SIZES, tensors, path="per_layer", hidden="silu", output="sigmoid", loss="huber")


def test_paths_the_job_cannot_take_are_refused():
    wide = ensemble_job(random_job(WIDE_SIZES, 1, 4), WIDE_SIZES)
    with pytest.raises(ValueError, match="up to 128 wide"):
        triton_engine.run(wide, DEVICE, path="fused")
    with pytest.raises(ValueError, match="path must be one of"):
        triton_engine.run(wide, DEVICE, path="layered")
    job = ensemble_job(random_job(ODD_SIZES, 1, 4), ODD_SIZES)
    job = dataclasses.replace(
        job, outputs=dataclasses.replace(job.outputs, per_sample_gradient_norms=True)
    )
    with pytest.raises(ValueError, match="norms in its fused kernel only"):
        triton_engine.run(job, DEVICE, path="per_layer")


@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
@pytest.mark.parametrize("n", [1, 70])  # 70: three blocks of 32 samples in one program
@pytest.mark.parametrize("sizes", [MIXED_SIZES, MIXED_WIDE_OUT], ids=["narrow_out", "wide_out"])
def test_fused_layers_padded_to_different_widths(n, shared, sizes):
    tensors = random_job(sizes, 2, n, shared_inputs=shared, sample_weights=True, seed=n)
    check(sizes, tensors, path="fused", hidden="sigmoid", output="softplus", loss="huber")


@pytest.mark.parametrize("n", [1, 70])  # 70: three blocks of 32 samples in one program
def test_fused_layers_of_power_of_two_widths(n):
    tensors = random_job(EXACT_SIZES, 3, n, sample_weights=True, seed=n + 1)
    check(EXACT_SIZES, tensors, hidden="leaky_relu", loss="mse")


def test_fused_kernel_leaves_the_jobs_tensors_unchanged():
    """The kernel reads the caller's parameters and samples in place."""
    tensors = random_job(MIXED_SIZES, 2, 40, sample_weights=True, seed=13)
    job = ensemble_job(tensors, MIXED_SIZES, hidden="tanh")
    before = [t.clone() for t in (*job.weights, *job.biases, job.inputs, job.targets)]
    triton_engine.run(job, DEVICE, path="fused")
    after = (*job.weights, *job.biases, job.inputs, job.targets)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_networks_whose_widths_pad_alike_share_one_kernel(monkeypatch):
    """The compile-time constants depend on the padded widths (and on which widths need
    no padding), not on the widths themselves: a search over hidden widths 33..64 compiles
    once on a GPU, not once per width."""
    from gradserve.kernels import triton_fused

    kernel, seen = triton_fused._fused_mlp_kernel, []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **constants):
                seen.append(constants)
                return kernel[grid](*args, **constants)

            return launch

    monkeypatch.setattr(triton_fused, "_fused_mlp_kernel", Recording())
    for sizes in [(37, 5, 70, 3), (40, 9, 100, 2)]:
        job = ensemble_job(random_job(sizes, 2, 20, seed=3), sizes)
        triton_engine.run(job, DEVICE, path="fused")
    assert len(seen) == 2 and seen[0] == seen[1]


def test_gradient_layout_aligns_every_layer_and_overlaps_none():
    from gradserve.kernels.triton_fused import GradientLayout, padded_widths

    sizes = (37, 5, 70, 3)
    layout = GradientLayout.of(padded_widths(sizes))  # room for the padded blocks
    spans = []
    for i, (w_at, b_at) in enumerate(zip(layout.weight_offsets, layout.bias_offsets, strict=True)):
        spans += [(w_at, w_at + sizes[i + 1] * sizes[i]), (b_at, b_at + sizes[i + 1])]
    assert all(start % 16 == 0 for start, _ in spans) and layout.row % 16 == 0
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] <= layout.row


@pytest.mark.parametrize(
    "sizes, m, n", [((1, 1), 1, 1), ((7, 1, 9, 2), 5, 1), ((3, 17, 17, 4), 2, 33)]
)
def test_fused_awkward_shapes(sizes, m, n):
    """One linear layer (nothing in the scratch), a width-1 hidden layer, one sample."""
    tensors = random_job(sizes, m, n, sample_weights=True, seed=m + n)
    check(sizes, tensors, hidden="softplus", output="sigmoid")


@pytest.mark.parametrize("sizes", [ODD_SIZES, ODD_WIDE_OUT], ids=["narrow_out", "wide_out"])
@pytest.mark.parametrize("param_grads, input_grads", [(False, True), (True, False), (False, False)])
def test_fused_computes_only_what_is_asked(param_grads, input_grads, sizes):
    tensors = random_job(sizes, 2, 21, seed=11)
    job = ensemble_job(tensors, sizes, hidden="tanh")
    job.outputs = kernels.OutputRequest(param_grads, input_grads, True, True)
    got = engine_tensors(triton_engine.run(job, DEVICE))
    assert ("layers.0.weight.grad" in got) == param_grads
    assert ("inputs.grad" in got) == input_grads
    ref = oracle_for(sizes, tensors, hidden="tanh")
    for name, value in got.items():
        expected = ref.grads[name] if name in ref.grads else getattr(ref, _ORACLE[name])
        assert_close_per_model(name, value, expected, "float32")


_ORACLE = {
    "loss": "loss",
    "inputs.grad": "input_grads",
    "per_sample_loss": "per_sample_loss",
    "outputs": "outputs",
}


def test_samples_split_across_programs_reduce_to_the_oracle(monkeypatch):
    """On GPUs a model's samples are dealt to several programs when M alone cannot fill
    the device (the interpreter uses one): each writes its own row of partial gradients,
    and the fixed-order reduction of the rows is cut into the layers' gradients."""
    from gradserve.kernels import triton_fused

    def one_block_per_program(n, block_n, m, device):
        return triton_fused.triton.cdiv(n, block_n), 1

    monkeypatch.setattr(triton_fused, "sample_splits", one_block_per_program)
    for sizes in (MIXED_SIZES, MIXED_WIDE_OUT):
        tensors = random_job(sizes, 2, 70, sample_weights=True, seed=12)  # 3 blocks of 32
        check(sizes, tensors, path="fused", hidden="gelu", loss="mse")


def test_partial_gradients_are_summed_in_order_over_the_gradients_only():
    """sum_partials adds the programs' rows s = 0, 1, 2, ... (each column's float32 sum in
    that order) and only over the gradients' segments: the room between them, which no
    program writes, is never read (here +inf and -inf: under the interpreter, numpy warns
    of an invalid value when a sum adds them, and the warning is an error here)."""
    from gradserve.kernels.partial_sums import sum_partials

    generator = torch.Generator().manual_seed(5)
    partial = torch.randn(3, 5, 1100, generator=generator) * 10.0 ** torch.randint(
        -4, 4, (3, 5, 1100), generator=generator
    )  # magnitudes apart, so that another order of the additions would round differently
    segments = [(0, 21), (32, 7), (48, 1000), (1088, 1)]  # crosses a 1024-column block
    inside = torch.zeros(1100, dtype=torch.bool)
    for start, length in segments:
        inside[start : start + length] = True
    partial[:, 0::2, ~inside] = float("inf")
    partial[:, 1::2, ~inside] = float("-inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summed = sum_partials(partial.to(DEVICE), segments).cpu()
    expected = partial[:, 0]
    for s in range(1, partial.shape[1]):
        expected = expected + partial[:, s]
    assert same_bits(summed[:, inside], expected[:, inside])
    assert torch.isfinite(summed[:, inside]).all()


def test_per_layer_launches_fit_cuda_grid_limits(monkeypatch):
    """CUDA runs up to 2**31 - 1 programs on a grid's first axis but 65535 on the others:
    a per-layer job of 2**22 samples (65536 blocks of 64 in its 1-wide output layer,
    131072 blocks of 32 in its loss) launches within them. The launches are recorded, not
    run: the inputs are one float broadcast to [N, 129], so no memory stands behind them."""
    from gradserve.kernels import triton_layered
    from gradserve.kernels.triton_common import ACTIVATION_CODES, LOSS_CODES

    launched = {}
    for kernel in (triton_layered._batched_matmul_kernel, triton_layered._loss_kernel,
                   triton_layered._column_sum_kernel):  # fmt: skip

        def record(*args, grid, warmup, name=kernel.__name__, **kwargs):
            launched.setdefault(name, []).append(grid)

        monkeypatch.setattr(kernel, "run", record)
    n = 2**22
    triton_layered.layered_mlp(
        [torch.randn(1, 1, 129)], [torch.randn(1, 1)], torch.randn(1).expand(n, 129),
        torch.randn(1).expand(n, 1), None, hidden_act=ACTIVATION_CODES["relu"],
        output_act=ACTIVATION_CODES["identity"], hidden_slope=0.0, output_slope=0.0,
        loss=LOSS_CODES["mse"], delta=1.0, scale=1.0 / n, precision=0,
        want_param_grads=True, want_dx=True, want_y=False,
    )  # fmt: skip
    assert sorted(launched) == ["_batched_matmul_kernel", "_column_sum_kernel", "_loss_kernel"]
    assert launched["_loss_kernel"] == [(n // 32,)]  # one program per block of 32 samples
    for grids in launched.values():
        for grid in grids:
            assert grid[0] < 2**31 and all(axis <= 65535 for axis in grid[1:]), grid


def test_split_length_fills_idle_multiprocessors():
    """The per-layer path splits a sum over the samples only where its tiles leave SMs idle,
    into about two programs per SM, each adding at least SPLIT_MIN_LENGTH samples."""
    from gradserve.kernels.triton_layered import SPLIT_MIN_LENGTH, split_length, triton

    n = 2**20
    assert split_length(n, 4, 0) == n  # no SMs to fill: the interpreter
    assert split_length(n, 132, 132) == n  # a program per SM already
    length = split_length(n, 4, 132)
    assert length % 128 == 0 and triton.cdiv(n, length) == 66  # 4 x 66 programs: 2 per SM
    assert split_length(n, 100, 132) == triton.cdiv(n, 3 * 128) * 128  # 3 x 100 programs
    assert split_length(2 * SPLIT_MIN_LENGTH - 1, 4, 132) == 2 * SPLIT_MIN_LENGTH - 1
    assert split_length(2 * SPLIT_MIN_LENGTH, 4, 132) == SPLIT_MIN_LENGTH


@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
def test_per_layer_sums_split_across_programs_reduce_to_the_oracle(monkeypatch, shared):
    """On a GPU the per-layer path splits the samples of its weight-gradient products and
    bias sums across programs where its tiles leave SMs idle (the interpreter has none to
    fill). Forced here (64 SMs, ranges of at least 100 samples): N = 300 in three ranges of
    128, 128 and 44 samples, whose partial sums add up to the oracle's gradients, the same
    bits on a second run."""
    from gradserve.kernels import triton_layered

    monkeypatch.setattr(triton_layered, "multiprocessors", lambda device: 64)
    monkeypatch.setattr(triton_layered, "SPLIT_MIN_LENGTH", 100)
    tensors = random_job(WIDE_SIZES, 2, 300, shared_inputs=shared, sample_weights=True, seed=4)
    with recorded_splits([]) as splits:
        first = check(WIDE_SIZES, tensors, hidden="tanh", loss="mse")
    # both layers' weight-gradient products and bias sums, in three ranges
    assert splits == [3, 3, 3, 3], splits
    second = check(WIDE_SIZES, tensors, hidden="tanh", loss="mse")
    for a, b in zip(engine_tensors(first).values(), engine_tensors(second).values(), strict=True):
        assert same_bits(a, b)


@pytest.mark.parametrize("loss", ["mse", "bce_with_logits", "cross_entropy"])
@pytest.mark.parametrize("sizes", [(5, 7, 300), (3, 2100)], ids=["4_rows", "1_row"])
def test_wide_output_layers_take_fewer_samples_per_loss_program(sizes, loss):
    """The per-layer path's loss kernel takes 4 samples a program at 300 outputs (padded
    512) and one at 2100 (padded 4096), where the others take 32 (loss_block_shape)."""
    from gradserve.kernels.triton_layered import loss_block_shape

    assert loss_block_shape(3).block_n == 32
    assert loss_block_shape(sizes[-1]).block_n == (4 if sizes[-1] == 300 else 1)
    tensors = random_job(sizes, 2, 19, loss=loss, sample_weights=True, seed=4)
    check(sizes, tensors, hidden="tanh", loss=loss)


def test_deep_network_on_the_per_layer_path():
    """20 layers: deeper than the fused kernel takes under auto (its compile time grows
    with the depth), so the per-layer GEMMs run it."""
    sizes = (3,) + (5,) * 19 + (2,)
    assert not triton_engine.takes_fused("tf32", sizes, False)
    tensors = random_job(sizes, 2, 11, seed=6)
    check(sizes, tensors, hidden="tanh")


def test_widest_fused_width_128():
    tensors = random_job((128, 128, 2), 1, 33, seed=2)
    check((128, 128, 2), tensors, path="fused", hidden="relu")


@pytest.mark.parametrize("hidden", ["tanh", "softplus"])  # their textbook forms when fused
@pytest.mark.parametrize("sizes", [ODD_SIZES, WIDE_SIZES])
@pytest.mark.parametrize("precision", ["tf32", "bfloat16", "float16"])
def test_reduced_precisions_within_their_tolerance(precision, sizes, hidden):
    if precision not in triton_engine.precisions():
        pytest.skip("Triton's interpreter cannot compute bfloat16 dots; checked on GPU")
    tensors = random_job(sizes, 2, 40, seed=4)
    check(sizes, tensors, precision=precision, hidden=hidden)


@pytest.mark.parametrize("sizes", [ODD_SIZES, WIDE_SIZES])
def test_two_runs_give_identical_bits(sizes):
    tensors = random_job(sizes, 3, 37, sample_weights=True, seed=8)
    job = ensemble_job(tensors, sizes, hidden="gelu", loss="huber")
    first = triton_engine.run(job, DEVICE)
    second = triton_engine.run(job, DEVICE)
    for a, b in zip(
        first.weight_grads + first.bias_grads + [first.loss, first.input_grads],
        second.weight_grads + second.bias_grads + [second.loss, second.input_grads],
        strict=True,
    ):
        assert torch.equal(a, b)


def test_float64_is_refused():
    tensors = random_job(ODD_SIZES, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        triton_engine.run(ensemble_job(tensors, ODD_SIZES, precision="float64"), DEVICE)


@pytest.mark.parametrize(
    "sizes, n, options, private",
    [
        (MIXED_SIZES, 70, dict(hidden="gelu", loss="huber"), False),  # 3 blocks of 32
        (ODD_SIZES, 37, dict(hidden="leaky_relu", output="leaky_relu", output_slope=0.3), False),
        (EXACT_SIZES, 21, dict(hidden="tanh", loss="cross_entropy"), True),  # norm pass, clip
        ((4, 3), 5, dict(hidden="relu", output="sigmoid"), False),  # one layer
    ],
    ids=["blocks", "slopes", "private", "one_layer"],
)
def test_values_kept_in_registers_give_the_same_results(monkeypatch, sizes, n, options, private):
    """LaunchConfig.resident keeps each layer's pre-activation in registers instead of the
    program's scratch, LaunchConfig.carry the sums of the parameter gradients over a
    program's blocks instead of its row of partial gradients: the same float32 values added
    in the same order, so the same bits under the interpreter (on a GPU, up to the order of
    tl.sum's additions: tests.oracle.assert_same_results), and the oracle's results. On a
    GPU each configuration also runs twice, bit for bit (a race would not)."""
    tensors = random_job(sizes, 2, n, loss=options.get("loss", "mse"), sample_weights=True,
                         seed=n)  # fmt: skip
    job = ensemble_job(tensors, sizes, **options)
    if private:
        job.privacy = kernels.Privacy(0.5)
    from gradserve.kernels import triton_fused

    chosen, results = triton_fused.launch_config, []
    for resident, carry in ((False, False), (True, False), (False, True), (True, True)):

        def config(*args, r=resident, c=carry):
            return chosen(*args)._replace(resident=r, carry=c)

        monkeypatch.setattr(triton_fused, "launch_config", config)
        results.append(engine_tensors(triton_engine.run(job, DEVICE, path="fused")))
        if DEVICE == "cuda":
            again = engine_tensors(triton_engine.run(job, DEVICE, path="fused"))
            assert_same_results(results[-1], again, "float32", exact=True)
    memory = results[0]
    for registers in results[1:]:
        assert_same_results(memory, registers, "float32", exact=DEVICE == "cpu")
        if not private:  # the clipped sums have their own oracle (test_privacy.py)
            assert_matches_oracle(registers, oracle_for(sizes, tensors, **options), "float32")


@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
def test_per_layer_path_with_narrow_operands_gives_the_same_bits(shared):
    """float16/bfloat16 jobs on the per-layer path take their weights and inputs in the
    narrow dtype and store hidden activations in it (triton_layered.layered_mlp's `narrow`):
    operands the matmul rounds to that dtype anyway, so the bits of fp32 operands."""
    if "float16" not in triton_engine.precisions():
        pytest.skip("float16 is not computed here")
    from gradserve.kernels import triton_layered
    from gradserve.kernels.triton_common import ACTIVATION_CODES, LOSS_CODES

    sizes = (5, 150, 140, 3)  # two hidden layers wider than 128: both stored narrow
    tensors = random_job(sizes, 2, 19, shared_inputs=shared, sample_weights=True, seed=5)
    tensors = {name: value.to(DEVICE) for name, value in tensors.items()}
    weights = [tensors[f"layers.{i}.weight"] for i in range(3)]
    biases = [tensors[f"layers.{i}.bias"] for i in range(3)]
    options = dict(
        hidden_act=ACTIVATION_CODES["tanh"], output_act=ACTIVATION_CODES["identity"],
        hidden_slope=0.01, output_slope=0.01, loss=LOSS_CODES["mse"], delta=1.0, scale=0.5,
        precision=triton_engine.precision_code("float16"), want_param_grads=True,
        want_dx=True, want_y=True,
    )  # fmt: skip
    x, t, sw = tensors["inputs"], tensors["targets"], tensors["sample_weights"]
    wide = triton_layered.layered_mlp(weights, biases, x, t, sw, **options)
    narrow = triton_layered.layered_mlp(
        [w.half() for w in weights], biases, x.half(), t, sw, **options, narrow=torch.float16
    )
    (wide_dw, wide_db), *wide_rest = wide
    (narrow_dw, narrow_db), *narrow_rest = narrow
    for a, b in zip(wide_dw + wide_db + wide_rest, narrow_dw + narrow_db + narrow_rest,
                    strict=True):  # fmt: skip
        assert a.dtype == torch.float32 and same_bits(a, b)


def test_gradient_sums_kept_in_registers_give_the_same_bits_for_zero_gradients(monkeypatch):
    """A dead relu unit whose upstream gradient is negative for every sample has dLoss/dz
    -0.0 throughout, so its bias gradient is a sum of -0.0s, whose sign depends on how the
    sum starts (the interpreter's sums give +0.0, a GPU's may not). LaunchConfig.carry starts
    from -0.0, the identity of float addition, so it keeps whatever sign the partial-gradient
    row gets: bit for bit, whatever order a GPU adds the other units' gradients in."""
    from gradserve.kernels import triton_fused

    sizes = (3, 4, 1)
    tensors = random_job(sizes, 1, 32, seed=3)  # one full block: no padding rows (+0.0)
    tensors["layers.0.bias"][0, 2] = -100.0  # unit 2 never fires
    tensors["layers.1.weight"][0, 0, 2] = -1.0  # and its upstream gradient is negative
    tensors["targets"] = tensors["targets"] - 100.0  # outputs above targets: dLoss/dy > 0
    job = ensemble_job(tensors, sizes, hidden="relu")
    chosen, results = triton_fused.launch_config, []
    for carry in (False, True):

        def config(*args, c=carry):
            return chosen(*args)._replace(carry=c)

        monkeypatch.setattr(triton_fused, "launch_config", config)
        results.append(engine_tensors(triton_engine.run(job, DEVICE)))
    dead = [result["layers.0.bias.grad"][0, 2] for result in results]
    assert dead[0].item() == 0.0 and same_bits(dead[0], dead[1])
    assert_same_results(results[0], results[1], "float32", exact=DEVICE == "cpu")


def test_auto_path_takes_the_per_layer_gemms_where_they_were_faster_at_width_128():
    """At padded width 128 the per-layer path took half the fused kernel's time in bfloat16
    and under a third in IEEE float32 on an H100: `auto` sends bfloat16 / float16 / IEEE
    float32 networks wider than 64 to the per-layer GEMMs, unless they need per-sample norms
    (fused only). tf32 and float32 as three tf32 products stay fused."""
    takes = triton_engine.takes_fused
    for precision in ("bfloat16", "float16", "float32"):
        assert takes(precision, (64, 64, 1), False)
        assert not takes(precision, (64, 65, 1), False)
        assert not takes(precision, (17, 96, 128, 5), False)
        assert takes(precision, (17, 96, 128, 5), True)  # norms: the fused kernel's
        assert takes(precision, (17, 96, 5), False, "fused")
    assert not takes("float32", (17, 96, 5), False, float32_matmul="ieee")
    assert takes("float32", (17, 96, 5), False, float32_matmul="tf32x3")
    assert takes("tf32", (17, 96, 128, 5), False)
    assert not takes("tf32", (5, 150, 3), False) and not takes("float16", (5, 150, 3), True)


def test_auto_path_runs_those_networks_on_the_path_it_names(monkeypatch):
    """A float16 network 96 wide runs on the per-layer GEMMs without norms and on the fused
    kernel with them, each against the oracle / torch engine."""
    if "float16" not in triton_engine.precisions():
        pytest.skip("float16 is not computed here")
    from gradserve.kernels import torch_engine, triton_fused, triton_layered

    sizes = (9, 96, 5)
    tensors = random_job(sizes, 2, 21, seed=31)
    calls = []
    for module, name in ((triton_fused, "fused_mlp"), (triton_layered, "layered_mlp")):
        original = getattr(module, name)

        def recorded(*args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)
    check(sizes, tensors, precision="float16", hidden="tanh")
    assert calls == ["layered_mlp"]
    job = ensemble_job(tensors, sizes, precision="float16", hidden="tanh")
    job.outputs = dataclasses.replace(job.outputs, per_sample_gradient_norms=True)
    got = triton_engine.run(job, DEVICE)
    assert calls[1:] == ["fused_mlp"]
    assert_close_per_model("per_sample_grad_norm", got.per_sample_grad_norm.cpu(),
                           torch_engine.run(job).per_sample_grad_norm, "float16")  # fmt: skip
