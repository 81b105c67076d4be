"""Random combinations of a job's options, both engines against the float64 oracle.

The other tests vary one thing at a time; bugs hide where options meet (an output
leaky_relu with its own slope next to hidden ones, inputs shared while targets are
per model, norms without parameter gradients, ...). Each seed draws a whole job: depth and
odd widths (now and then a layer wider than 128, for the Triton engine's per-layer path),
M, N, activations and slopes, loss, reduction, Huber delta, which of inputs, targets and
sample weights are shared, and which outputs are requested. float32, so the standard
tolerance applies; the seeds are fixed, so a failure names a job to rerun.
"""

import dataclasses
import random

import pytest

from gradserve import kernels
from gradserve.kernels import torch_engine, triton_engine
from tests.jobs import float32_job, random_job
from tests.oracle import assert_close_per_model, assert_same_results, engine_tensors, oracle

WIDTHS = (1, 2, 3, 5, 7, 13, 16, 17, 31, 32, 33, 64, 70)


def draw_job(seed: int):
    """(job, its tensors, oracle options) for one seed."""
    r = random.Random(seed)
    sizes = tuple(r.choice(WIDTHS) for _ in range(r.randint(2, 5)))
    wide = r.random() < 0.1
    if wide:
        sizes = (sizes[0], 150, *sizes[1:])
    loss = r.choice(kernels.LOSSES)
    m, n = r.randint(1, 3), r.choice([1, 2, 5, 31, 37, 65])
    tensors = random_job(sizes, m, n, loss=loss, sample_weights=r.random() < 0.5, seed=seed)
    for name in ("inputs", "targets", "sample_weights"):  # each shared or not, on its own
        if name in tensors and r.random() < 0.4:
            tensors[name] = tensors[name][0].clone()
    options = dict(
        hidden=r.choice(kernels.ACTIVATIONS),
        output=r.choice(kernels.ACTIVATIONS),
        negative_slope=r.choice([0.01, 0.2, 0.7]),
        output_slope=r.choice([0.01, 0.05, 0.3]),
        loss=loss,
        reduction=r.choice(kernels.REDUCTIONS),
        huber_delta=r.choice([0.1, 1.0, 2.5]),
    )
    outputs = kernels.OutputRequest(
        parameter_gradients=r.random() < 0.8,
        input_gradients=r.random() < 0.5,
        per_sample_losses=r.random() < 0.5,
        forward_outputs=r.random() < 0.5,
        per_sample_gradient_norms=r.random() < 0.4 and not wide,
    )
    job = kernels.EnsembleJob(
        mlp=kernels.MLPSpec(
            sizes,
            kernels.Activation(options["hidden"], options["negative_slope"]),
            kernels.Activation(options["output"], options["output_slope"]),
        ),
        loss=kernels.LossSpec(loss, options["reduction"], options["huber_delta"]),
        weights=[tensors[f"layers.{i}.weight"] for i in range(len(sizes) - 1)],
        biases=[tensors[f"layers.{i}.bias"] for i in range(len(sizes) - 1)],
        inputs=tensors["inputs"],
        targets=tensors["targets"],
        sample_weights=tensors.get("sample_weights"),
        outputs=outputs,
    )
    return job, tensors, options


def check_engine(result, job, expected):
    """Exactly the requested results, each within float32's tolerance of the oracle."""
    want = job.outputs
    assert (result.weight_grads is not None) == want.parameter_gradients
    assert (result.input_grads is not None) == want.input_gradients
    assert (result.per_sample_loss is not None) == want.per_sample_losses
    assert (result.outputs is not None) == want.forward_outputs
    assert (result.per_sample_grad_norm is not None) == want.per_sample_gradient_norms
    for name, value in engine_tensors(result).items():
        assert_close_per_model(f"{result.engine} {name}", value, expected[name], "float32")


@pytest.mark.parametrize("seed", range(64))
def test_random_option_combinations_match_the_oracle(seed):
    job, tensors, options = draw_job(seed)
    ref = oracle(
        job.mlp.layer_sizes, tensors, tensors["inputs"], tensors["targets"],
        sample_weights=tensors.get("sample_weights"), **options,
    )  # fmt: skip
    expected = {
        "loss": ref.loss,
        "inputs.grad": ref.input_grads,
        "per_sample_loss": ref.per_sample_loss,
        "outputs": ref.outputs,
        **ref.grads,
    }
    reference = torch_engine.run(job)
    check_engine(reference, job, expected)
    device = "cuda" if triton_engine.available() and not triton_engine.interpreted() else "cpu"
    got = triton_engine.run(job, device)
    check_engine(got, job, expected)
    if job.outputs.per_sample_gradient_norms:  # the oracle has none: the torch engine's
        assert_close_per_model(
            "per_sample_grad_norm", got.per_sample_grad_norm.cpu(),
            reference.per_sample_grad_norm, "float32",
        )  # fmt: skip


@pytest.mark.parametrize("seed", range(0, 64, 2))
def test_random_jobs_give_the_same_results_with_values_kept_in_registers(seed, monkeypatch):
    """The fused kernel's `resident` and `carry` launch options (pre-activations and
    gradient sums in registers) against the default, in blocks of 16 samples so that most
    programs walk several blocks: the same sums in the same order, so the same bits under
    the interpreter (on a GPU, up to the order of tl.sum's additions: assert_same_results).
    On a GPU each configuration also runs twice, bit for bit: the options drop barriers,
    and a race would show as results that change from run to run."""
    from gradserve.kernels import triton_fused

    job, _, _ = draw_job(seed)
    if max(job.mlp.layer_sizes) > triton_engine.FUSED_MAX_WIDTH:
        pytest.skip("the per-layer path has no launch options")
    device = "cuda" if triton_engine.available() and not triton_engine.interpreted() else "cpu"
    chosen = triton_fused.launch_config
    results = []
    for resident, carry in ((False, False), (True, True), (False, True)):

        def config(dp, n, m, dev, precision, r=resident, c=carry):
            splits = triton_fused.sample_splits(n, 16, m, dev)
            return chosen(dp, n, m, dev, precision)._replace(
                block_n=16, splits=splits[0], blocks_per_split=splits[1], resident=r, carry=c
            )

        monkeypatch.setattr(triton_fused, "launch_config", config)
        results.append(engine_tensors(triton_engine.run(job, device)))
        if device == "cuda":
            again = engine_tensors(triton_engine.run(job, device))
            assert_same_results(results[-1], again, job.precision, exact=True)
    for other in results[1:]:
        assert_same_results(results[0], other, job.precision, exact=device == "cpu")


@pytest.mark.parametrize("seed", range(24))
def test_random_jobs_with_clipping_or_layers_without_bias_agree_across_engines(seed):
    """Where DP clipping and layers without bias meet the other options: a job drawn by
    tests.jobs.drawn_engine_job, clipped (without noise, whose draws are the device's) or with
    some layers without bias or both, on the Triton engine in float32 against the torch
    engine in float64 (itself checked against the oracle), every result per model."""
    from tests.jobs import drawn_engine_job

    r = random.Random(seed)
    job = drawn_engine_job(r, seed, max_models=4, max_samples=40, without_bias=0.3)
    if not job.mlp.layers_without_bias or r.random() < 0.5:
        job.privacy = kernels.Privacy(r.choice((0.01, 0.5, 10.0)))
    assert_triton_float32_agrees_with_torch(job)


@pytest.mark.parametrize("seed", range(16))
def test_random_jobs_on_the_per_layer_path_agree_across_engines(seed, monkeypatch):
    """The Triton engine's per-layer path, which layers wider than 128 take, forced on the
    small networks of tests.jobs.drawn_engine_job (layers without bias among them; no
    per-sample norms, which only the fused kernel computes), against the torch engine."""
    import functools

    from tests.jobs import drawn_engine_job

    r = random.Random(seed)
    job = drawn_engine_job(r, seed, max_models=4, max_samples=40, without_bias=0.3)
    job.outputs = dataclasses.replace(job.outputs, per_sample_gradient_norms=False)
    monkeypatch.setattr(
        triton_engine, "run", functools.partial(triton_engine.run, path="per_layer")
    )
    assert_triton_float32_agrees_with_torch(job)


def assert_triton_float32_agrees_with_torch(job: kernels.EnsembleJob) -> None:
    """`job` (float64) on the Triton engine in float32 against the torch engine in float64,
    every result per model."""
    import torch

    from gradserve.kernels import engines

    device = "cuda" if triton_engine.available() and not triton_engine.interpreted() else "cpu"
    ref = engines.run(job, "torch", torch.device("cpu"))

    got = engines.run(float32_job(job), "triton", torch.device(device))
    # Looser than float32's 1e-5: these tiny networks' gradients are sums over a few dozen
    # samples whose terms (clipped ones especially) can nearly cancel, and float32's error
    # relative to such a sum grows as the terms' magnitudes over the sum's. Over 300 drawn
    # jobs (150 of the clipping test's seeds, 150 of an earlier way of drawing) the torch
    # engine in float32 was up to 1.4e-5 off its float64 results, the Triton engine up to
    # 7.8e-5 (a clipped [2, 1] weight gradient of 21 samples, clip norm 0.01); its per-layer
    # path up to 1.6e-5 over 200 (an l1 job's bias gradient); a clipping or bias mistake is
    # off by far more (a bias-free layer's bias counted in the norms: 9 of 24 failed).
    tol = 2e-4
    expected = engine_tensors(ref)
    assert engine_tensors(got).keys() == expected.keys()
    for name, value in engine_tensors(got).items():
        assert_close_per_model(name, value, expected[name], "float32", tol)
    if job.outputs.per_sample_gradient_norms:
        assert_close_per_model("per_sample_grad_norm", got.per_sample_grad_norm.cpu(),
                               ref.per_sample_grad_norm, "float32", tol)  # fmt: skip
