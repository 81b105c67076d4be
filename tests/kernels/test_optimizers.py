"""K optimiser steps against torch.optim on one nn.Sequential per model (float64), on the
torch engine and (through Triton's interpreter on the CPU) the Triton engine."""

import pytest
import torch
from torch import nn

from gradserve import kernels
from gradserve.kernels import torch_engine
from tests.jobs import ensemble_job, random_job

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


def reference(tensors, c, steps, hidden="tanh"):
    """Per model: losses [K], final parameters and optimiser state, by torch.optim."""
    layers = len(SIZES) - 1
    out = {"losses": [], "params": {}, "state": {}}
    for k in range(M):
        mods = []
        for i in range(layers):
            lin = nn.Linear(SIZES[i], SIZES[i + 1]).double()
            with torch.no_grad():
                lin.weight.copy_(tensors[f"layers.{i}.weight"][k])
                lin.bias.copy_(tensors[f"layers.{i}.bias"][k])
            mods += [lin, nn.Tanh()] if i < layers - 1 else [lin]
        net = nn.Sequential(*mods)
        opt = torch_optimizer(net.parameters(), c)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(
                net(tensors["inputs"][k].double()), tensors["targets"][k].double()
            )
            loss.backward()
            losses.append(loss.item())
            opt.step()
        out["losses"].append(losses)
        for i in range(layers):
            for kind in ("weight", "bias"):
                p = net[2 * i].weight if kind == "weight" else net[2 * i].bias
                name = f"layers.{i}.{kind}"
                out["params"].setdefault(name, []).append(p.detach().clone())
                for key, value in opt.state[p].items():
                    if key != "step":
                        out["state"].setdefault(f"{name}.{key}", []).append(value.clone())
    return (
        torch.tensor(out["losses"], dtype=torch.float64).T,
        {k: torch.stack(v) for k, v in out["params"].items()},
        {k: torch.stack(v) for k, v in out["state"].items()},
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
    opts = {**c}
    if opts["kind"] == "adamw" and "weight_decay" not in opts:
        opts["weight_decay"] = 0.01
    job.optimizer = kernels.Optimizer(steps=steps, return_state=True, **opts, **kw)
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
