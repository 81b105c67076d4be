"""K optimiser steps against torch.optim, one optimiser per model stepping on the float64
oracle's gradients (tests.oracle: an nn.Sequential per model), on the torch engine and
(through Triton's interpreter on the CPU) the Triton engine."""

import random

import pytest
import torch

from gradserve import kernels
from gradserve.kernels import torch_engine
from tests.jobs import drawn_engine_job, ensemble_job, float32_job, random_job
from tests.oracle import assert_close_per_model, oracle

SIZES = (4, 7, 5, 2)
M, N, K = 3, 9, 5

CONFIGS = {
    "sgd": dict(kind="sgd", learning_rate=0.1),
    "sgd-momentum-dampening-decay": dict(
        kind="sgd", learning_rate=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01
    ),
    "sgd-nesterov": dict(kind="sgd", learning_rate=0.05, momentum=0.8, nesterov=True),
    "adam": dict(kind="adam", learning_rate=0.01, weight_decay=0.02),
    "adam-betas-eps": dict(kind="adam", learning_rate=0.003, beta1=0.5, beta2=0.9, eps=1e-4),
    "adamw": dict(kind="adamw", learning_rate=0.01, weight_decay=0.1),
}


def torch_optimizer(params, c):
    if c["kind"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=c["learning_rate"],
            momentum=c.get("momentum", 0.0),
            dampening=c.get("dampening", 0.0),
            nesterov=c.get("nesterov", False),
            weight_decay=c.get("weight_decay", 0.0),
        )
    cls = torch.optim.Adam if c["kind"] == "adam" else torch.optim.AdamW
    return cls(
        params,
        lr=c["learning_rate"],
        betas=(c.get("beta1", 0.9), c.get("beta2", 0.999)),
        eps=c.get("eps", 1e-8),
        weight_decay=c.get("weight_decay", 0.0 if c["kind"] == "adam" else 0.01),
    )


def reference(tensors, c, steps):
    """Per model: losses [K], final parameters and optimiser state, by torch.optim, of the
    fixed tanh/mse network these tests train."""
    return optim_reference(optimizer_job(tensors, c, steps), c, steps)


def optim_reference(job: kernels.EnsembleJob, c, steps):
    """(losses [K, M], parameters and optimiser state by name, [M, ...]) of `steps` steps of
    torch.optim (config `c`) on each of `job`'s models by itself, float64: each step's
    gradients from the independent oracle (tests.oracle), given to one optimiser per model.
    A layer without a bias has none here."""
    mlp = job.mlp
    params = {}
    for i in range(mlp.num_layers):
        params[f"layers.{i}.weight"] = job.weights[i]
        if mlp.has_bias(i):
            params[f"layers.{i}.bias"] = job.biases[i]
    per_model = {
        name: [p[k].double().clone().requires_grad_() for k in range(job.num_models)]
        for name, p in params.items()
    }
    optims = [
        torch_optimizer([ps[k] for ps in per_model.values()], c) for k in range(job.num_models)
    ]
    losses = []
    for _ in range(steps):
        stacked = {name: torch.stack([p.detach() for p in ps]) for name, ps in per_model.items()}
        step = oracle(
            mlp.layer_sizes, stacked, job.inputs, job.targets,
            hidden=mlp.hidden_activation.name, output=mlp.output_activation.name,
            negative_slope=mlp.hidden_activation.negative_slope,
            output_slope=mlp.output_activation.negative_slope, loss=job.loss.name,
            reduction=job.loss.reduction, huber_delta=job.loss.huber_delta,
            sample_weights=job.sample_weights,
        )  # fmt: skip
        losses.append(step.loss)
        for name, ps in per_model.items():
            for k, p in enumerate(ps):
                p.grad = step.grads[f"{name}.grad"][k].clone()
        for optim in optims:
            optim.step()
    state = {}
    for name, ps in per_model.items():
        for key in optims[0].state[ps[0]]:  # after a step: each optimiser's state of p
            if key != "step":
                state[f"{name}.{key}"] = torch.stack(
                    [optim.state[p][key] for optim, p in zip(optims, ps, strict=True)]
                )
    return (
        torch.stack(losses),
        {name: torch.stack([p.detach() for p in ps]) for name, ps in per_model.items()},
        state,
    )


def optimizer_job(tensors, c, steps, precision="float64", **kw):
    job = ensemble_job(
        tensors,
        SIZES,
        hidden="tanh",
        precision=precision,
        input_gradients=False,
        per_sample_losses=False,
        forward_outputs=False,
    )
    job.optimizer = kernels.Optimizer(steps=steps, return_state=True, **c, **kw)
    return job


def params_of(result):
    out = {}
    for i, (w, b) in enumerate(zip(result.weights, result.biases, strict=True)):
        out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = w, b
    return out


@pytest.mark.parametrize("blocks", [0, 2 * N, 4], ids=["whole", "models", "samples"])
@pytest.mark.parametrize("config", CONFIGS)
def test_steps_equal_torch_optim(config, blocks, monkeypatch):
    """Each step's job run whole, or in torch_engine's blocks (of two models; of four
    samples of one model), the steps taken on the joined gradients."""
    if blocks:
        monkeypatch.setattr(torch_engine, "CPU_BLOCKED_JOB_MIN_BYTES", 0)
        monkeypatch.setattr(torch_engine, "CPU_SAMPLE_BLOCK_PARAMETER_MULTIPLE", 0)
        monkeypatch.setattr(torch_engine, "CPU_BLOCK_BYTES", blocks * max(SIZES) * 8)
        shape = (2, N) if blocks == 2 * N else (1, blocks)
        assert torch_engine.block_shape(M, N, SIZES, "float64") == shape
    c = CONFIGS[config]
    tensors = random_job(SIZES, M, N, seed=21, dtype=torch.float64)
    losses, params, state = reference(tensors, c, K)
    got = kernels.run(optimizer_job(tensors, c, K), "torch", torch.device("cpu"))
    torch.testing.assert_close(got.losses, losses, rtol=1e-10, atol=1e-12)
    for name, p in params_of(got).items():
        torch.testing.assert_close(p, params[name], rtol=1e-10, atol=1e-12, msg=name)
    assert set(got.optimizer_state) == set(state)
    for name, s in state.items():
        torch.testing.assert_close(got.optimizer_state[name], s, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("config", ["sgd-momentum-dampening-decay", "adamw"])
def test_continuing_from_returned_state_equals_one_run(config):
    c = CONFIGS[config]
    tensors = random_job(SIZES, M, N, seed=22, dtype=torch.float64)
    whole = kernels.run(optimizer_job(tensors, c, 5), "torch", torch.device("cpu"))
    first = kernels.run(optimizer_job(tensors, c, 3), "torch", torch.device("cpu"))
    resumed = dict(tensors, **params_of(first))
    job = optimizer_job(resumed, c, 2, start_step=3)
    job.optimizer_state = first.optimizer_state
    second = kernels.run(job, "torch", torch.device("cpu"))
    torch.testing.assert_close(torch.cat([first.losses, second.losses]), whole.losses)
    for name, p in params_of(whole).items():
        torch.testing.assert_close(params_of(second)[name], p, rtol=1e-12, atol=1e-14)


def test_steps_report_each_loss_as_they_happen():
    tensors = random_job(SIZES, M, N, seed=23, dtype=torch.float64)
    seen = []
    job = optimizer_job(tensors, CONFIGS["adam"], 4)
    job.on_step = lambda k, loss: seen.append((k, loss.clone()))
    got = kernels.run(job, "torch", torch.device("cpu"))
    assert [k for k, _ in seen] == [0, 1, 2, 3]
    torch.testing.assert_close(torch.stack([v for _, v in seen]), got.losses)
    assert got.losses[-1].sum() < got.losses[0].sum()  # it trains


@pytest.mark.parametrize("config", ["sgd-nesterov", "adam"])
def test_triton_engine_steps_equal_torch_optim(config):
    """float32 on the Triton engine (fused kernel, interpreter on the CPU)."""
    c = CONFIGS[config]
    tensors = random_job(SIZES, M, N, seed=24)
    losses, params, _ = reference({k: v.double() for k, v in tensors.items()}, c, K)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    got = kernels.run(optimizer_job(tensors, c, K, precision="float32"), "triton", device)
    assert got.engine == "triton"
    torch.testing.assert_close(got.losses.double().cpu(), losses, rtol=1e-5, atol=1e-7)
    for name, p in params_of(got).items():
        torch.testing.assert_close(p.double().cpu(), params[name], rtol=1e-5, atol=1e-6)


def test_optimizer_options_are_checked():
    with pytest.raises(ValueError):
        kernels.Optimizer(kind="lbfgs", steps=1, learning_rate=0.1)


@pytest.mark.parametrize("kind", kernels.OPTIMIZERS)
def test_weight_decay_defaults_as_torch_optims(kind):
    """Unset, an optimiser's weight decay is torch.optim's default for it (AdamW's 0.01)."""
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    torch_default = cls([torch.zeros(1, requires_grad=True)], lr=0.1).defaults["weight_decay"]
    assert kernels.Optimizer(kind, steps=1, learning_rate=0.1).weight_decay == torch_default


def test_dp_sgd_steps_draw_fresh_noise_each_step():
    """Training with privacy: step k's gradient is the clipped, noised one with seed + k."""
    tensors = random_job(SIZES, M, N, seed=25, dtype=torch.float64)
    dp = kernels.Privacy(0.3, noise_multiplier=1.0, noise_seed=40)
    job = optimizer_job(tensors, CONFIGS["sgd"], 2)
    job.privacy = dp
    got = kernels.run(job, "torch", torch.device("cpu"))

    params = {k: v.clone() for k, v in tensors.items()}
    for k in range(2):
        step = ensemble_job(
            params, SIZES, hidden="tanh", precision="float64", input_gradients=False,
            per_sample_losses=False, forward_outputs=False,
        )  # fmt: skip
        step.privacy = kernels.Privacy(0.3, noise_multiplier=1.0, noise_seed=40 + k)
        r = kernels.run(step, "torch", torch.device("cpu"))
        for i in range(len(SIZES) - 1):
            params[f"layers.{i}.weight"] = params[f"layers.{i}.weight"] - 0.1 * r.weight_grads[i]
            params[f"layers.{i}.bias"] = params[f"layers.{i}.bias"] - 0.1 * r.bias_grads[i]
    for name, p in params_of(got).items():
        torch.testing.assert_close(p, params[name], rtol=1e-12, atol=1e-14)


def drawn_optimizer(r: random.Random) -> dict:
    """An optimiser config (as CONFIGS') drawn by `r`: kind, learning rate, and each of
    weight decay, momentum with dampening or Nesterov, betas, eps or its default."""
    c = {"kind": r.choice(kernels.OPTIMIZERS), "learning_rate": r.choice((0.3, 0.05, 0.003))}
    if r.random() < 0.5:
        c["weight_decay"] = r.choice((0.01, 0.2))
    if c["kind"] == "sgd" and r.random() < 0.75:
        c["momentum"] = r.choice((0.5, 0.9))
        variant = r.choice(("nesterov", "dampening", "plain"))  # torch: Nesterov undamped
        if variant == "nesterov":
            c["nesterov"] = True
        elif variant == "dampening":
            c["dampening"] = 0.3
    elif c["kind"] != "sgd":
        if r.random() < 0.5:
            c["beta1"], c["beta2"] = r.choice(((0.5, 0.9), (0.0, 0.99)))
        if r.random() < 0.3:
            c["eps"] = 1e-3
    return c


@pytest.mark.parametrize(
    "engine, precision, seeds", [("torch", "float64", range(80)), ("triton", "float32", range(16))]
)
def test_random_training_jobs_equal_torch_optim(engine, precision, seeds):
    """Where optimiser steps meet the other options: jobs drawn by tests.jobs.drawn_engine_job
    (depth, odd widths, every loss and activation, shared or per-model tensors, sample
    weights, layers without bias) trained 1-4 steps by a drawn optimiser, against
    optim_reference; each step's losses and the final parameters per model."""
    device = torch.device("cuda" if engine == "triton" and torch.cuda.is_available() else "cpu")
    for seed in seeds:
        r = random.Random(seed)
        job = drawn_engine_job(r, seed, max_models=4, max_samples=12, without_bias=0.3)
        job.outputs = kernels.OutputRequest()  # training returns the parameters
        c, steps = drawn_optimizer(r), r.randint(1, 4)
        if precision == "float32" and c["kind"] != "sgd":
            # Adam divides each gradient by its own size (+ eps), so where a gradient is 0 in
            # float64 (terms that cancel exactly, l1's +-1/N ones) float32's rounding noise
            # moves the parameter by up to a learning rate whatever its size: over seeds
            # 0-399, seed 228's bias gradient, -3.7e-9 against 0, moved its bias by 0.014
            # (relative error 0.16) with eps 1e-8. With eps 1e-3 noise moves a parameter by
            # noise / eps learning rates: those 400 seeds then agreed to 7.1e-6 at most.
            c["eps"] = 1e-3
        job.optimizer = kernels.Optimizer(steps=steps, **c)
        losses, params, _ = optim_reference(job, c, steps)
        if precision == "float32":
            job = float32_job(job)
        got = kernels.run(job, engine, device)
        assert got.engine == engine
        where = f"seed {seed}, {c}, {steps} steps"
        assert_close_per_model(f"losses ({where})", got.losses.T.cpu(), losses.T, precision)
        for name, p in params.items():
            assert_close_per_model(f"{name} ({where})", params_of(got)[name].cpu(), p, precision)
        for i in job.mlp.layers_without_bias:  # kept zero, as torch has none to update
            assert not got.biases[i].any(), where
