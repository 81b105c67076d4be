"""The torch engine against the independent float64 oracle."""

import dataclasses
import random

import pytest
import torch

from gradserve import kernels
from gradserve.kernels import linear_layer, torch_engine
from tests.jobs import drawn_engine_job, ensemble_job, random_job
from tests.oracle import (
    assert_close_per_model,
    assert_matches_oracle,
    engine_tensors,
    oracle,
    oracle_for,
)

ODD_SIZES = (5, 13, 7, 3)


def check_against_oracle(layer_sizes, tensors, precision="float32", **options):
    got = torch_engine.run(ensemble_job(tensors, layer_sizes, precision=precision, **options))
    ref = oracle_for(layer_sizes, tensors, **options)
    assert_matches_oracle(engine_tensors(got), ref, precision)


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
@pytest.mark.parametrize("reduction", kernels.REDUCTIONS)
@pytest.mark.parametrize("loss", kernels.LOSSES)
@pytest.mark.parametrize("hidden", kernels.ACTIVATIONS)
def test_matches_oracle_for_every_activation_and_loss(hidden, loss, reduction, shared, m):
    tensors = random_job(ODD_SIZES, m, 11, loss=loss, shared_inputs=shared, seed=m)
    check_against_oracle(ODD_SIZES, tensors, hidden=hidden, loss=loss, reduction=reduction)


@pytest.mark.parametrize("output", kernels.ACTIVATIONS)
def test_output_activation_matches_oracle(output):
    tensors = random_job(ODD_SIZES, 3, 9, seed=4)
    check_against_oracle(ODD_SIZES, tensors, hidden="tanh", output=output)


@pytest.mark.parametrize(
    "layer_sizes, m, n",
    [((1, 1), 1, 1), ((2, 2, 1), 1, 1), ((7, 1, 9, 2), 5, 1), ((3, 17, 17, 17, 4), 2, 33)],
)
def test_awkward_shapes_match_oracle(layer_sizes, m, n):
    tensors = random_job(layer_sizes, m, n, sample_weights=True, seed=n)
    check_against_oracle(layer_sizes, tensors, hidden="silu")


@pytest.mark.parametrize("precision", ["float32", "float64", "bfloat16", "float16"])
def test_width_one_layers_match_oracle(precision):
    """Layers of one input feature, and of one output feature below hidden layers: products
    over one term, which the CPU computes as broadcast multiplies (linear_layer)."""
    sizes = (1, 6, 1, 5, 1)
    dtype = torch.float64 if precision == "float64" else torch.float32
    tensors = random_job(sizes, 3, 37, dtype=dtype, sample_weights=True, seed=8)
    got = torch_engine.run(ensemble_job(tensors, sizes, precision=precision, hidden="tanh"))
    ref = oracle_for(sizes, tensors, hidden="tanh")
    # Looser than the 1e-2 norm for bfloat16 and float16: through a one-unit layer each
    # gradient is a product of single rounded terms, whose roundings nothing averages out
    # (bfloat16: inputs.grad 1.7e-2 off in one model, with these products as GEMMs too).
    tol = 3e-2 if precision in ("bfloat16", "float16") else None
    assert_matches_oracle(engine_tensors(got), ref, precision, tol)


@pytest.mark.parametrize("loss", kernels.LOSSES)
def test_sample_weights_match_oracle(loss):
    tensors = random_job(ODD_SIZES, 4, 10, loss=loss, sample_weights=True, seed=7)
    check_against_oracle(ODD_SIZES, tensors, loss=loss, reduction="mean")


def test_float64_matches_oracle_to_round_off():
    tensors = random_job(ODD_SIZES, 3, 8, dtype=torch.float64, seed=2)
    check_against_oracle(ODD_SIZES, tensors, precision="float64", hidden="gelu")


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_narrow_operands_within_their_tolerance(precision):
    tensors = random_job((16, 32, 8), 2, 64, seed=3)
    check_against_oracle((16, 32, 8), tensors, precision=precision, hidden="tanh")


def test_leaky_relu_slope_and_huber_delta_are_honoured():
    tensors = random_job(ODD_SIZES, 2, 12, seed=5)
    for slope, delta in [(0.3, 0.05), (0.01, 3.0)]:
        job = ensemble_job(
            tensors,
            ODD_SIZES,
            hidden="leaky_relu",
            negative_slope=slope,
            loss="huber",
            huber_delta=delta,
        )
        got = torch_engine.run(job)
        ref = oracle(
            ODD_SIZES,
            tensors,
            tensors["inputs"],
            tensors["targets"],
            hidden="leaky_relu",
            negative_slope=slope,
            loss="huber",
            huber_delta=delta,
        )
        assert_close_per_model("loss", got.loss, ref.loss, "float32")
        assert_close_per_model(
            "w0", got.weight_grads[0], ref.grads["layers.0.weight.grad"], "float32"
        )


def test_hidden_and_output_leaky_relus_keep_their_own_slopes():
    tensors = random_job(ODD_SIZES, 2, 12, seed=7)
    check_against_oracle(
        ODD_SIZES, tensors, hidden="leaky_relu", output="leaky_relu", negative_slope=0.3,
        output_slope=0.05,
    )  # fmt: skip


def gradcheck_two_layers(n: int, seed: int, **options) -> bool:
    """torch.autograd.gradcheck of the engine's own forward + loss on a float64 [3, 4, 2]
    job of n samples, with respect to every parameter and the inputs."""
    sizes = (3, 4, 2)
    tensors = random_job(sizes, 2, n, dtype=torch.float64, seed=seed, sample_weights=True)
    job = ensemble_job(tensors, sizes, precision="float64", **options)

    def loss_of(w0, b0, w1, b1, x):
        loss, _, _ = torch_engine.forward_loss(
            job, [w0, w1], [b0, b1], x, tensors["targets"], tensors["sample_weights"]
        )
        return loss

    names = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias", "inputs"]
    leaves = [tensors[k].clone().requires_grad_() for k in names]
    return torch.autograd.gradcheck(loss_of, leaves)


def test_gradcheck_in_float64():
    """Finite differences agree with autograd through the engine's own forward + loss."""
    assert gradcheck_two_layers(5, 11, hidden="tanh", loss="huber")


@pytest.mark.parametrize("chunk", [2, 3, 64])
def test_gradcheck_with_weight_gradients_summed_in_chunks(monkeypatch, chunk):
    """The weight gradient's sum over samples taken a few samples at a time (chunks of 2
    and 3 of 7 samples, the last one short; 64: one product) is still the gradient."""
    monkeypatch.setattr(linear_layer, "SAMPLE_CHUNK", chunk)
    assert gradcheck_two_layers(7, 12, hidden="softplus")


def test_float32_weight_gradients_keep_their_accuracy_at_two_million_samples():
    """A weight gradient sums N products; summed in one float32 GEMM its error grew as
    sqrt(N), past the float32 tolerance here (2.0e-5 and 2.7e-5 for this job)."""
    sizes, n = (8, 32, 32, 1), 1 << 21
    tensors = random_job(sizes, 2, n, shared_inputs=True, seed=3)
    job = ensemble_job(tensors, sizes, hidden="tanh", input_gradients=False,
                       per_sample_losses=False, forward_outputs=False)  # fmt: skip
    got = torch_engine.run(job)
    ref = oracle_for(sizes, tensors, hidden="tanh")
    assert_close_per_model("loss", got.loss, ref.loss, "float32")
    for i, (w, b) in enumerate(zip(got.weight_grads, got.bias_grads, strict=True)):
        assert_close_per_model(f"w{i}", w, ref.grads[f"layers.{i}.weight.grad"], "float32")
        assert_close_per_model(f"b{i}", b, ref.grads[f"layers.{i}.bias.grad"], "float32")


def test_skipping_parameter_gradients_returns_only_the_loss():
    tensors = random_job(ODD_SIZES, 2, 4)
    job = ensemble_job(
        tensors, ODD_SIZES, input_gradients=False, per_sample_losses=False, forward_outputs=False
    )
    job.outputs = kernels.OutputRequest(parameter_gradients=False)
    got = torch_engine.run(job)
    assert got.weight_grads is None and got.input_grads is None
    assert got.loss.shape == (2,)


def in_blocks(monkeypatch, blocks: str, layer_sizes, n: int, precision="float32"):
    """Make the CPU engine run every job of these shapes in blocks: "models" two models at
    a time, "samples" a model at a time, five samples at a time, "single samples" one
    (torch_engine's blocks). Returns that block shape (models, samples)."""
    itemsize = 8 if precision == "float64" else 4
    samples = {"models": 2 * n, "samples": 5, "single samples": 1}[blocks]
    monkeypatch.setattr(torch_engine, "CPU_BLOCKED_JOB_MIN_BYTES", 0)
    monkeypatch.setattr(torch_engine, "CPU_SAMPLE_BLOCK_PARAMETER_MULTIPLE", 0)
    monkeypatch.setattr(torch_engine, "CPU_BLOCK_BYTES", samples * max(layer_sizes) * itemsize)
    return (2, n) if blocks == "models" else (1, samples)


BLOCKS = ["models", "samples"]


def test_jobs_run_whole_up_to_their_bound_then_in_blocks_of_models_then_of_samples():
    sizes, n = (8, 64, 1), 1000
    per_model = n * 64 * 4
    whole = (torch_engine.CPU_BLOCKED_JOB_MIN_BYTES - 1) // per_model
    block = torch_engine.CPU_BLOCK_BYTES // per_model
    assert torch_engine.block_shape(whole, n, sizes, "float32") == (whole, n)
    assert torch_engine.block_shape(whole + 1, n, sizes, "float32") == (block, n)
    assert torch_engine.block_shape(whole + 1, n, sizes, "float64") == (block // 2, n)
    one_model = torch_engine.CPU_BLOCK_BYTES // (64 * 4)
    assert torch_engine.block_shape(2, 1 << 20, sizes, "float32") == (1, one_model)
    assert torch_engine.block_shape(1, 1 << 20, sizes, "float64") == (1, one_model // 2)
    # A model's parameters larger than the block: blocks of as many bytes as they take
    # (a sample of 16 MiB, parameters of 48 MiB: three samples).
    assert torch_engine.block_shape(1, 8, (1, 4 << 20, 1), "float32") == (1, 3)
    wide = (1024, 2048, 1)
    parameter_bytes = (1025 * 2048 + 2049) * 4
    assert torch_engine.block_shape(1, 1 << 16, wide, "float32") == (1, parameter_bytes // 8192)


@pytest.mark.parametrize("blocks", [*BLOCKS, "single samples"])
@pytest.mark.parametrize("reduction", kernels.REDUCTIONS)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
def test_a_job_run_in_blocks_matches_oracle(monkeypatch, shared, loss, reduction, blocks):
    """Blocks of 2 of 5 models, or of 5 of 37 samples (the last block short): every result
    of every model, with sample weights, shared or per-model inputs and targets."""
    tensors = random_job(ODD_SIZES, 5, 37, loss=loss, shared_inputs=shared,
                         sample_weights=True, seed=21)  # fmt: skip
    options = dict(hidden="tanh", loss=loss, reduction=reduction)
    job = ensemble_job(tensors, ODD_SIZES, **options)
    job.outputs = kernels.OutputRequest(True, True, True, True, per_sample_gradient_norms=True)
    whole = torch_engine.run(job)
    shape = in_blocks(monkeypatch, blocks, ODD_SIZES, 37)
    assert torch_engine.block_shape(5, 37, ODD_SIZES, "float32") == shape
    got = torch_engine.run(job)
    ref = oracle_for(ODD_SIZES, tensors, **options)
    assert_matches_oracle(engine_tensors(got), ref, "float32")
    torch.testing.assert_close(got.per_sample_grad_norm, whole.per_sample_grad_norm)


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("reduction", [*kernels.REDUCTIONS, "micro-batch"])
def test_dp_gradients_of_a_job_in_blocks_are_the_whole_jobs(monkeypatch, reduction, blocks):
    """Clipping per block, the noise for the joined gradients: the same gradients as the
    whole job's for one seed (spec.Privacy's documented order), float64, three outputs.
    "micro-batch": a streamed job's micro-batch (sum reduction, the whole job's own-loss
    scale: 1/3 under its mean)."""
    tensors = random_job(ODD_SIZES, 5, 23, seed=22, dtype=torch.float64)
    job = ensemble_job(tensors, ODD_SIZES, reduction=reduction.replace("micro-batch", "sum"),
                       precision="float64", input_gradients=False, per_sample_losses=False,
                       forward_outputs=False)  # fmt: skip
    scale = 1 / 3 if reduction == "micro-batch" else None
    job.privacy = kernels.Privacy(0.05, noise_multiplier=1.5, noise_seed=7, own_loss_scale=scale)
    whole = torch_engine.run(job)
    shape = in_blocks(monkeypatch, blocks, ODD_SIZES, 23, "float64")
    assert torch_engine.block_shape(5, 23, ODD_SIZES, "float64") == shape
    got = torch_engine.run(job)
    for name, a, b in [("w", whole.weight_grads, got.weight_grads),
                       ("b", whole.bias_grads, got.bias_grads)]:  # fmt: skip
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-14, msg=f"{name}{i}")
    clean = torch_engine.run(
        dataclasses.replace(job, privacy=kernels.Privacy(0.05, own_loss_scale=scale))
    )
    assert (got.weight_grads[0] - clean.weight_grads[0]).abs().max() > 1e-3  # noise added


def random_block_job(seed: int):
    """A job whose every option is drawn: depth, odd widths, M, N, activations, loss,
    reduction, which of inputs, targets and sample weights are per model, layers without
    bias, the outputs asked for, DP clipping (with noise) or optimiser steps. float64, so
    whole and blocks differ only by the float64 sums' grouping."""
    r = random.Random(seed)
    job = drawn_engine_job(r, seed, max_models=5, max_samples=40, without_bias=0.2)
    kind = r.random()
    if kind < 0.25:
        job.privacy = kernels.Privacy(r.choice((0.01, 0.5, 10.0)), 1.0, noise_seed=seed)
    elif kind < 0.45:
        job.outputs = kernels.OutputRequest()  # training returns losses and parameters
        job.optimizer = kernels.Optimizer(r.choice(kernels.OPTIMIZERS), r.randint(1, 3), 0.05,
                                          weight_decay=0.01, return_state=True)  # fmt: skip
    block_bytes = r.randint(1, 4 * job.num_samples * max(job.mlp.layer_sizes)) * 8
    return job, block_bytes


def result_tensors(result) -> dict[str, torch.Tensor]:
    """Every tensor of an EnsembleResult, by field (and index or state name)."""
    out = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, torch.Tensor):
            out[f.name] = value
        elif isinstance(value, list):
            out.update({f"{f.name}[{i}]": t for i, t in enumerate(value)})
        elif isinstance(value, dict):
            out.update({f"{f.name}.{k}": t for k, t in value.items()})
    return out


@pytest.mark.parametrize("seed", range(40))
def test_random_jobs_in_blocks_give_the_whole_jobs_results(monkeypatch, seed):
    """Where options meet (per-model targets with shared inputs, a layer without bias and
    norms, DP noise, optimiser steps, ...), blocks of a drawn size give every result the
    whole job gives, within float64's rounding."""
    from gradserve.kernels import engines

    job, block_bytes = random_block_job(seed)
    whole = result_tensors(engines.run(job, "torch", torch.device("cpu")))
    monkeypatch.setattr(torch_engine, "CPU_BLOCKED_JOB_MIN_BYTES", 0)
    monkeypatch.setattr(torch_engine, "CPU_SAMPLE_BLOCK_PARAMETER_MULTIPLE", 0)
    monkeypatch.setattr(torch_engine, "CPU_BLOCK_BYTES", block_bytes)
    got = result_tensors(engines.run(job, "torch", torch.device("cpu")))
    assert got.keys() == whole.keys()
    for name, value in whole.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-13, msg=name)
