"""Server-side optimiser steps through a real server: equal to torch.optim per model,
losses streamed step by step, training continued from returned state, bad options refused."""

import random

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from gradserve.client import GradserveError
from tests.jobs import drawn_job, random_job

SIZES = (5, 8, 3)
M, N = 4, 16


def nets_and_data(seed=31, n=N):
    tensors = random_job(SIZES, M, n, shared_inputs=True, seed=seed)
    nets = []
    for k in range(M):
        net = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3))
        with torch.no_grad():
            for i in range(2):
                net[2 * i].weight.copy_(tensors[f"layers.{i}.weight"][k])
                net[2 * i].bias.copy_(tensors[f"layers.{i}.bias"][k])
        nets.append(net)
    return nets, tensors["inputs"], tensors["targets"]


def torch_optim_run(nets, x, y, steps, make_opt, batch=None):
    """Reference: each model trained by itself with torch.optim, in float64: `steps`
    full-batch steps, or with `batch` a step on each run of `batch` samples in turn (the
    last one shorter), as a loop over a DataLoader would take them."""
    losses, params = [], []
    starts = [0] * steps if batch is None else range(0, len(x), batch)
    for net in nets:
        net = nn.Sequential(*[m for m in net]).double()  # a float64 copy per model
        opt = make_opt(net.parameters())
        per = []
        for start in starts:
            end = len(x) if batch is None else start + batch
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x[start:end].double()), y[start:end].double())
            loss.backward()
            per.append(loss.item())
            opt.step()
        losses.append(per)
        params.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return np.array(losses).T, params


def test_adamw_steps_equal_torch_optim_and_stream_each_loss(client):
    nets, x, y = nets_and_data()
    seen = []
    result = client.compute(
        [nn.Sequential(*[m for m in net]) for net in nets],
        x,
        y,
        optimizer="adamw",
        steps=6,
        learning_rate=0.02,
        weight_decay=0.05,
        on_step=lambda k, losses: seen.append((k, losses.clone())),
    )
    import copy

    ref_losses, ref_params = torch_optim_run(
        [copy.deepcopy(n) for n in nets], x, y, 6,
        lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.05),
    )  # fmt: skip
    assert result.gradients is None and result.losses.shape == (6, M)
    np.testing.assert_allclose(result.losses.double().numpy(), ref_losses, rtol=1e-5)
    assert [k for k, _ in seen] == list(range(6))
    assert torch.equal(torch.stack([v for _, v in seen]), result.losses)
    for k in range(M):
        for name, value in result.parameters[k].items():
            torch.testing.assert_close(value.double(), ref_params[k][name], rtol=1e-5, atol=1e-6)
    assert result.summary["flops"] > 0


def test_training_continues_from_returned_state(client):
    _, x, y = nets_and_data(32)
    tensors = random_job(SIZES, M, N, seed=32)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    common = dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, hidden_activation="gelu")
    whole = client.compute(params, x.numpy(), y.numpy(), steps=5, **common)
    first = client.compute(
        params, x.numpy(), y.numpy(), steps=3, return_optimizer_state=True, **common
    )
    assert sorted(first.optimizer_state) == sorted(f"{p}.momentum_buffer" for p in params)
    second = client.compute(
        first.parameters, x.numpy(), y.numpy(), steps=2,
        optimizer_state=first.optimizer_state, start_step=3, **common,
    )  # fmt: skip
    np.testing.assert_allclose(
        np.concatenate([first.losses, second.losses]), whole.losses, rtol=1e-6
    )
    for name, value in whole.parameters.items():
        np.testing.assert_allclose(second.parameters[name], value, rtol=1e-5, atol=1e-7)


STREAMED_OPTIMIZERS = {
    "sgd": (
        dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    "adam": (
        dict(optimizer="adam", learning_rate=0.02, betas=(0.8, 0.99)),
        lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99)),
    ),
    "adamw": (
        dict(optimizer="adamw", learning_rate=0.02, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("kind", sorted(STREAMED_OPTIMIZERS))
def test_streamed_jobs_of_one_step_each_chain_into_torch_optims_steps(client, kind):
    """A streamed job (micro_batch_samples) takes one optimiser step over all its samples;
    three such jobs, each continuing from the last one's parameters and state, are three
    full-batch steps of torch.optim on each model by itself (float64 throughout)."""
    import copy

    options, make_opt = STREAMED_OPTIMIZERS[kind]
    nets, x, y = nets_and_data(37, n=403)
    ref_losses, ref_params = torch_optim_run([copy.deepcopy(n) for n in nets], x, y, 3, make_opt)
    models = [nn.Sequential(*[m for m in net]).double() for net in nets]
    state = None
    for step in range(3):
        result = client.compute(
            models, x.double(), y.double(), precision="float64", micro_batch_samples=64,
            steps=1, start_step=step, optimizer_state=state, return_optimizer_state=True,
            **options,
        )  # fmt: skip
        assert result.losses.shape == (1, M) and result.gradients is None
        np.testing.assert_allclose(result.losses[0].numpy(), ref_losses[step], rtol=1e-12)
        state = result.optimizer_state
        for k, model in enumerate(models):  # the next job starts from the updated parameters
            model.load_state_dict(result.parameters[k])
    for k in range(M):
        for name, value in models[k].state_dict().items():
            torch.testing.assert_close(value, ref_params[k][name], rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("kind", sorted(STREAMED_OPTIMIZERS))
def test_a_streamed_job_stepping_on_each_micro_batch_equals_a_torch_optim_loop(client, kind):
    """steps = the number of micro-batches (403 samples in 7 of 64, the last of 19): a step
    on each micro-batch's samples alone, with the parameters the steps before left, as
    torch.optim stepping over a DataLoader of batch 64 on each model (float64); each step's
    losses stream as it is taken."""
    import copy

    options, make_opt = STREAMED_OPTIMIZERS[kind]
    nets, x, y = nets_and_data(39, n=403)
    ref_losses, ref_params = torch_optim_run(
        [copy.deepcopy(n) for n in nets], x, y, 7, make_opt, batch=64
    )
    models = [nn.Sequential(*[m for m in net]).double() for net in nets]
    seen = []
    result = client.compute(
        models, x.double(), y.double(), precision="float64", micro_batch_samples=64, steps=7,
        on_step=lambda k, losses: seen.append((k, losses.clone())), **options,
    )  # fmt: skip
    assert result.losses.shape == (7, M) and result.gradients is None
    np.testing.assert_allclose(result.losses.numpy(), ref_losses, rtol=1e-12)
    assert [k for k, _ in seen] == list(range(7))
    assert torch.equal(torch.stack([v for _, v in seen]), result.losses)
    for k in range(M):
        for name, value in result.parameters[k].items():
            torch.testing.assert_close(value, ref_params[k][name], rtol=1e-11, atol=1e-14)
    # every sample computed once, not once per step
    assert result.summary["flops"] == 6 * (5 * 8 + 8 * 3) * M * 403


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_steps_on_each_micro_batch_with_dp_sgd_equal_one_shot_jobs_chained(client, backend):
    """DP-SGD stepping on each of three micro-batches (100, 100 and 50 samples; per-model
    targets, sample weights, a layer without bias) equals three one-shot single-step jobs
    on those samples, each continuing from the last one's parameters and state with the
    next noise seed, as a one-shot job's own steps draw theirs. float32, compared by
    relative L2 (the one-shot jobs' results went through float32 on the wire)."""
    tensors = random_job((7, 12, 5, 3), 3, 250, sample_weights=True, seed=41)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    del params["layers.1.bias"]
    x, y, w = (tensors[k].numpy() for k in ("inputs", "targets", "sample_weights"))
    options = dict(optimizer="adam", learning_rate=0.01, clip_norm=0.05, noise_multiplier=0.7,
                   hidden_activation="tanh", return_optimizer_state=True,
                   backend=backend)  # fmt: skip
    streamed = client.compute(params, x, y, sample_weights=w, micro_batch_samples=100, steps=3,
                              noise_seed=11, **options)  # fmt: skip
    chained, state, losses = params, None, []
    for k, (a, b) in enumerate(((0, 100), (100, 200), (200, 250))):
        step = client.compute(chained, x[:, a:b], y[:, a:b], sample_weights=w[:, a:b], steps=1,
                              start_step=k, optimizer_state=state, noise_seed=11 + k,
                              **options)  # fmt: skip
        chained, state = step.parameters, step.optimizer_state
        losses.append(step.losses[0])
    np.testing.assert_allclose(streamed.losses, np.stack(losses), rtol=1e-5)
    for got, want in ((streamed.parameters, chained), (streamed.optimizer_state, state)):
        assert set(got) == set(want)
        for name, value in want.items():
            for k in range(len(value)):
                err = np.linalg.norm(got[name][k] - value[k]) / np.linalg.norm(value[k])
                assert err < 1e-5, (name, k, err)


def test_epochs_of_steps_per_micro_batch_chain_through_parameters_and_state(client):
    """Two epochs as two streamed jobs, the second continuing from the first's parameters
    and Adam state (start_step = its 5 steps), equal one streamed job over the samples
    twice over (10 steps), float64."""
    nets, x, y = nets_and_data(43, n=80)
    models = [nn.Sequential(*[m for m in net]).double() for net in nets]
    options = dict(precision="float64", micro_batch_samples=16, optimizer="adam",
                   learning_rate=0.01, return_optimizer_state=True)  # fmt: skip
    x, y = x.double(), y.double()
    once = client.compute(models, torch.cat([x, x]), torch.cat([y, y]), steps=10, **options)
    first = client.compute(models, x, y, steps=5, **options)
    for k, model in enumerate(models):
        model.load_state_dict(first.parameters[k])
    second = client.compute(models, x, y, steps=5, start_step=5,
                            optimizer_state=first.optimizer_state, **options)  # fmt: skip
    np.testing.assert_allclose(torch.cat([first.losses, second.losses]).numpy(),
                               once.losses.numpy(), rtol=1e-12)  # fmt: skip
    for k in range(M):
        for name, value in once.parameters[k].items():
            torch.testing.assert_close(second.parameters[k][name], value, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", range(16))
def test_drawn_jobs_stepping_on_each_micro_batch_equal_one_shot_steps_chained(client, seed):
    """Drawn jobs (every loss, reduction and activation, odd widths, shared or per-model
    tensors, sample weights or none) with a drawn optimiser, a step on each of 2 to 8
    micro-batches, equal one-shot single-step jobs on each micro-batch's samples, chained
    through their parameters and state (float64; over 60 one-off seeds they were equal bit
    for bit)."""
    from gradserve import kernels

    r = random.Random(seed)
    sizes, loss, t = drawn_job(r, seed, 4, 40)
    n = t["inputs"].shape[-2]
    micro = max(1, -(-n // r.randint(2, 8)))
    batches = -(-n // micro)
    params = {k: v.numpy() for k, v in t.items() if k.startswith("layers.")}
    x, y = t["inputs"].numpy(), t["targets"].numpy()
    w = t["sample_weights"].numpy() if "sample_weights" in t else None
    kind = r.choice(["sgd", "adam", "adamw"])
    options = dict(
        loss=loss, reduction=r.choice(kernels.REDUCTIONS), precision="float64",
        hidden_activation=r.choice(kernels.ACTIVATIONS),
        output_activation=r.choice(kernels.ACTIVATIONS), optimizer=kind, learning_rate=0.05,
        momentum=0.5 if kind == "sgd" else 0.0, return_optimizer_state=True,
    )  # fmt: skip
    streamed = client.compute(params, x, y, sample_weights=w, micro_batch_samples=micro,
                              steps=batches, **options)  # fmt: skip

    def rows(a, per_model_dims: int, start: int):
        if a is None:
            return None
        end = start + micro
        return a[:, start:end] if a.ndim == per_model_dims else a[start:end]

    chained, state, losses = params, None, []
    for k in range(batches):
        start = k * micro
        step = client.compute(
            chained, rows(x, 3, start), rows(y, 2 if loss == "cross_entropy" else 3, start),
            sample_weights=rows(w, 2, start), steps=1, start_step=k, optimizer_state=state,
            **options,
        )  # fmt: skip
        chained, state = step.parameters, step.optimizer_state
        losses.append(step.losses[0])
    np.testing.assert_allclose(streamed.losses, np.stack(losses), rtol=1e-12, atol=1e-300)
    for name, value in chained.items():
        np.testing.assert_allclose(streamed.parameters[name], value, rtol=1e-12, atol=1e-14)


def test_streamed_step_with_dp_sgd_and_a_layer_without_bias_equals_one_shot(client):
    """Clipped per sample and noised once, as the one-shot job's step (same seed, same
    noise); the layer without a bias gets none back; on_step sees the one step.
    float32: compared by relative L2."""
    tensors = random_job((7, 12, 5, 3), 3, 900, shared_inputs=True, sample_weights=True, seed=38)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    del params["layers.1.bias"]
    args = (params, tensors["inputs"].numpy(), tensors["targets"].numpy())
    options = dict(sample_weights=tensors["sample_weights"].numpy(), optimizer="adam",
                   learning_rate=0.01, steps=1, clip_norm=0.05, noise_multiplier=0.7,
                   noise_seed=11, hidden_activation="tanh",
                   return_optimizer_state=True)  # fmt: skip
    whole = client.compute(*args, **options)
    seen = []
    streamed = client.compute(*args, micro_batch_samples=100, on_step=lambda k, _: seen.append(k),
                              **options)  # fmt: skip
    assert seen == [0]  # the step's losses, once, as they come with the results
    assert set(streamed.parameters) == set(params)
    np.testing.assert_allclose(streamed.losses, whole.losses, rtol=2e-6)
    for got, want in ((streamed.parameters, whole.parameters),
                      (streamed.optimizer_state, whole.optimizer_state)):  # fmt: skip
        assert set(got) == set(want)
        for name, value in want.items():
            for k in range(len(value)):
                err = np.linalg.norm(got[name][k] - value[k]) / np.linalg.norm(value[k])
                assert err < 1e-5, (name, k, err)


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(optimizer="sgd", learning_rate=0.0), "optimizer.learning_rate"),
        (dict(optimizer="sgd", learning_rate=float("nan")), "optimizer.learning_rate"),
        (dict(optimizer="sgd", learning_rate=0.1, steps=0), "optimizer.steps"),
        (dict(optimizer="sgd", learning_rate=0.1, momentum=-1), "optimizer.momentum"),
        (dict(optimizer="sgd", learning_rate=0.1, nesterov=True), "optimizer.nesterov"),
        (dict(optimizer="adam", learning_rate=0.1, betas=(1.0, 0.9)), "optimizer.beta1"),
        (dict(optimizer="adam", learning_rate=0.1, betas=(0.9, -0.1)), "optimizer.beta2"),
        (dict(optimizer="adam", learning_rate=0.1, eps=0.0), "optimizer.eps"),
        (dict(optimizer="adamw", learning_rate=0.1, weight_decay=-1), "optimizer.weight_decay"),
        (dict(optimizer="adam", learning_rate=0.1, start_step=-2), "optimizer.start_step"),
        # finite doubles whose float32 update scalars would overflow
        (dict(optimizer="sgd", learning_rate=1e300), "optimizer.learning_rate"),
        (dict(optimizer="sgd", learning_rate=0.1, momentum=1e39), "optimizer.momentum"),
        (dict(optimizer="adam", learning_rate=1e38), "optimizer.learning_rate"),
        (
            dict(optimizer="adamw", learning_rate=1e30, weight_decay=1e30),
            "optimizer.learning_rate",
        ),
        (
            dict(optimizer="adam", learning_rate=0.1, input_gradients=True),
            "outputs.input_gradients",
        ),
        (
            dict(optimizer="adam", learning_rate=0.1, per_sample_gradient_norms=True),
            "outputs.per_sample_gradient_norms",
        ),
        (
            dict(
                optimizer="adam",
                learning_rate=0.1,
                optimizer_state={"layers.0.weight.exp_avg": np.ones((M, 8, 5), np.float32)},
                start_step=1,
            ),
            "tensors[layers.0.weight.exp_avg_sq]",
        ),
        # continuing earlier steps without their state (plain sgd has none, so may)
        (dict(optimizer="adam", learning_rate=0.1, start_step=3), "optimizer.start_step"),
        (
            dict(
                optimizer="adamw",
                learning_rate=0.1,
                optimizer_state={
                    f"layers.{i}.{p}.{s}": np.ones(shape, np.float32)
                    for i, w in enumerate(((8, 5), (3, 8)))
                    for p, shape in (("weight", (M, *w)), ("bias", (M, w[0])))
                    for s in ("exp_avg", "exp_avg_sq")
                },
            ),
            "optimizer.start_step",
        ),
        (
            dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, start_step=3),
            "optimizer.start_step",
        ),
    ],
)
def test_bad_optimizer_options_are_refused(client, options, field):
    tensors = random_job(SIZES, M, N, seed=33)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    with pytest.raises(GradserveError) as err:
        client.compute(params, tensors["inputs"].numpy(), tensors["targets"].numpy(), **options)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in err.value.violations], err.value.details


def test_steps_beyond_the_servers_limit_are_refused_as_too_large():
    """--max-optimizer-steps 4: five full-batch steps, or a step on each of six
    micro-batches, are over it (RESOURCE_EXHAUSTED, not to be retried); the streamed job is
    told that larger micro-batches take fewer steps."""
    from gradserve.client import GradientClient
    from tests.servers import run_server

    tensors = random_job(SIZES, M, N, seed=34)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    job = (params, tensors["inputs"].numpy(), tensors["targets"].numpy())
    with run_server("--max-optimizer-steps", "4") as server:
        with GradientClient(server.address) as client:
            for micro, steps, hint in ((0, 5, False), (3, 6, True)):  # N=16: 6 micro-batches
                with pytest.raises(GradserveError) as err:
                    client.compute(*job, optimizer="sgd", learning_rate=0.1, steps=steps,
                                   micro_batch_samples=micro)  # fmt: skip
                assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "exceed the limit of 4" in err.value.details
                assert ("larger micro-batches take fewer steps" in err.value.details) == hint


@pytest.mark.parametrize(
    "state, error, message",
    [
        # torch.optim's own state_dict(): keyed by parameter index, not by wire name
        (torch.optim.Adam(torch.nn.Linear(5, 8).parameters()).state_dict(), ValueError,
         "got key 'state' (torch.optim's state_dict() is none)"),
        # a key that would have replaced the job's own inputs
        ({"inputs": np.ones((N, 5), np.float32)}, ValueError, "got key 'inputs'"),
        ({"layers.0.weight.velocity": np.ones((M, 8, 5), np.float32)}, ValueError,
         "got key 'layers.0.weight.velocity'"),
        ([np.ones((M, 8, 5), np.float32)], TypeError, "(a dict), got list"),
    ],
)  # fmt: skip
def test_optimizer_state_that_is_no_earlier_results_is_refused_before_sending(
    client, state, error, message
):
    tensors = random_job(SIZES, M, N, seed=35)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    with pytest.raises(error) as err:
        client.compute(params, tensors["inputs"].numpy(), tensors["targets"].numpy(),
                       optimizer="adam", learning_rate=0.1, optimizer_state=state,
                       start_step=1)  # fmt: skip
    assert message in str(err.value)
    assert "optimizer_state takes an earlier result's optimizer_state" in str(err.value)


def test_too_many_steps_are_refused_with_resource_exhausted(client):
    tensors = random_job(SIZES, M, N, seed=34)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    with pytest.raises(GradserveError) as err:
        client.compute(params, tensors["inputs"].numpy(), tensors["targets"].numpy(),
                       optimizer="sgd", learning_rate=0.1, steps=10**9)  # fmt: skip
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_abandoned_training_stops_and_frees_the_engine(client):
    """A deadline ends the call; the steps stop at once instead of occupying the device."""
    tensors = random_job(SIZES, M, N, seed=35)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    args = (params, tensors["inputs"].numpy(), tensors["targets"].numpy())
    with pytest.raises(GradserveError) as err:
        client.compute(*args, optimizer="sgd", learning_rate=1e-3, steps=100_000, timeout=1.0)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # 100k steps take minutes here; the next job is served within seconds.
    assert client.compute(*args, timeout=15).loss.shape == (M,)


def test_async_client_trains_and_sees_each_step(server):
    import asyncio

    from gradserve.client import AsyncGradientClient

    tensors = random_job(SIZES, M, N, seed=36)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    seen = []

    async def main():
        async with AsyncGradientClient(server.address, timeout=60) as client:
            return await client.compute(
                params, tensors["inputs"].numpy(), tensors["targets"].numpy(),
                optimizer="sgd", learning_rate=0.05, momentum=0.9, steps=5,
                on_step=lambda k, losses: seen.append(k),
            )  # fmt: skip

    result = asyncio.run(main())
    assert seen == [0, 1, 2, 3, 4] and result.losses.shape == (5, M)
    assert set(result.parameters) == set(params)
