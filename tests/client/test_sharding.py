"""One ensemble sharded across two real servers equals one server's result."""

import asyncio
import re

import numpy as np
import pytest
import torch
from torch import nn

from gradserve.client import AsyncGradientClient, GradientClient
from gradserve.client._sharding import shard_bounds
from tests.jobs import random_job
from tests.servers import run_server

SIZES = (6, 12, 3)


@pytest.fixture(scope="module")
def two_servers():
    with run_server() as first, run_server() as second:
        yield first, second


def stats(address):
    with GradientClient(address) as c:
        return c.server_info().stats


@pytest.mark.parametrize("shared", ["per_model", "shared", "inputs_only"])
def test_sharded_equals_unsharded(two_servers, shared):
    """inputs_only: shared inputs with per-model targets and sample weights."""
    first, second = two_servers
    t = random_job(
        SIZES, 7, 10, loss="cross_entropy", shared_inputs=shared == "shared", sample_weights=True,
        seed=3,
    )  # fmt: skip
    if shared == "inputs_only":
        t["inputs"] = t["inputs"][0].clone()
    params = {k: v.numpy() for k, v in t.items() if k.startswith("layers.")}
    args = (params, t["inputs"].numpy(), t["targets"].numpy())
    options = dict(
        sample_weights=t["sample_weights"].numpy(),
        loss="cross_entropy",
        input_gradients=True,
        per_sample_losses=True,
    )
    with GradientClient(first.address) as single:
        whole = single.compute(*args, **options)
    before = [stats(s.address).completed_jobs for s in two_servers]
    with GradientClient([first.address, second.address]) as client:
        sharded = client.compute_sharded(*args, **options)
    after = [stats(s.address).completed_jobs for s in two_servers]
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1]  # one shard each
    assert sharded.summary["shards"] == 2
    assert set(sharded.tensors) == set(whole.tensors)
    for name, value in whole.tensors.items():
        np.testing.assert_allclose(sharded.tensors[name], value, rtol=1e-6, atol=1e-7)
    assert set(sharded.gradients) == set(params)


def test_sharding_a_list_of_sequentials_returns_the_same_form(two_servers):
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)) for _ in range(5)]
    x, y = torch.randn(9, 4), torch.randn(9, 1)
    with GradientClient([s.address for s in two_servers]) as client:
        sharded = client.compute_sharded(nets, x, y, shards=3)
        whole = client.compute(nets, x, y)
    assert isinstance(sharded.gradients, list) and len(sharded.gradients) == 5
    for a, b in zip(sharded.gradients, whole.gradients, strict=True):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_shard_bounds_cover_every_model_once():
    assert shard_bounds(7, 2) in ([(0, 4), (4, 7)], [(0, 3), (3, 7)])
    assert shard_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]
    for m, k in [(1, 1), (10, 3), (1000, 7)]:
        bounds = shard_bounds(m, k)
        assert bounds[0][0] == 0 and bounds[-1][1] == m
        assert all(a < b for a, b in bounds)
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:], strict=False))


@pytest.mark.parametrize("shards", [0, -1, 1.5, True])
def test_a_shard_count_below_one_is_refused(shards):
    """0 was taken for "one per address" and -1 for one shard; no connection is needed."""
    params = {"layers.0.weight": np.ones((4, 2, 3), np.float32),
              "layers.0.bias": np.zeros((4, 2), np.float32)}  # fmt: skip
    with GradientClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="shards must be"):
            client.compute_sharded(params, np.ones((5, 3), np.float32),
                                   np.ones((5, 2), np.float32), shards=shards)  # fmt: skip


@pytest.mark.parametrize(
    "job, error, message",
    [
        # slicing these by shard failed with an IndexError and an AttributeError
        (dict(optimizer="adam", learning_rate=0.1, start_step=1,
              optimizer_state=torch.optim.Adam(nn.Linear(3, 2).parameters()).state_dict()),
         ValueError, "got key 'state'"),
        (dict(optimizer="adam", learning_rate=0.1, start_step=1, optimizer_state=[1.0]),
         TypeError, "(a dict), got list"),
        (dict(inputs=[[1.0, 2.0, 3.0]] * 4 + [[1.0]]), ValueError, "inputs: its rows differ"),
    ],
)  # fmt: skip
def test_sharded_jobs_are_checked_before_they_are_cut(job, error, message):
    params = {"layers.0.weight": np.ones((4, 2, 3), np.float32),
              "layers.0.bias": np.zeros((4, 2), np.float32)}  # fmt: skip
    job = {"inputs": np.ones((5, 3), np.float32), "targets": np.ones((5, 2), np.float32), **job}
    with GradientClient(["127.0.0.1:1", "127.0.0.1:2"]) as client:
        with pytest.raises(error, match=re.escape(message)):
            client.compute_sharded(params, **job)


def test_sharded_training_equals_unsharded_and_continues_from_sharded_state(two_servers):
    t = random_job(SIZES, 5, 11, shared_inputs=True, seed=6)
    params = {k: v.numpy() for k, v in t.items() if k.startswith("layers.")}
    args = (t["inputs"].numpy(), t["targets"].numpy())
    opts = dict(optimizer="adam", learning_rate=0.01, hidden_activation="tanh")
    with GradientClient(two_servers[0].address) as single:
        whole = single.compute(params, *args, steps=4, **opts)
    with GradientClient([s.address for s in two_servers]) as client:
        first = client.compute_sharded(params, *args, steps=2, return_optimizer_state=True, **opts)
        assert first.losses.shape == (2, 5)
        second = client.compute_sharded(
            first.parameters, *args, steps=2, optimizer_state=first.optimizer_state,
            start_step=2, **opts,
        )  # fmt: skip
        with pytest.raises(ValueError, match="on_step"):
            client.compute_sharded(params, *args, steps=2, on_step=print, **opts)
    np.testing.assert_allclose(np.concatenate([first.losses, second.losses]), whole.losses,
                               rtol=1e-6)  # fmt: skip
    for name, value in whole.parameters.items():
        np.testing.assert_allclose(second.parameters[name], value, rtol=1e-5, atol=1e-7)


def test_sharded_dp_noise_is_independent_per_shard_and_reproducible(two_servers):
    t = random_job(SIZES, 6, 9, seed=7)
    params = {k: v.numpy() for k, v in t.items() if k.startswith("layers.")}
    args = (params, t["inputs"].numpy(), t["targets"].numpy())
    dp = dict(clip_norm=0.5, noise_multiplier=1.0, noise_seed=3)
    with GradientClient([s.address for s in two_servers]) as client:
        a = client.compute_sharded(*args, **dp).gradients
        b = client.compute_sharded(*args, **dp).gradients
        clean = client.compute_sharded(*args, clip_norm=0.5).gradients
    for name in a:
        assert np.array_equal(a[name], b[name])
        noise = a[name] - clean[name]
        assert not np.allclose(noise[:3], noise[3:])  # the shards' noise differs


def test_the_async_client_shards_alike_and_checks_health(two_servers):
    first, second = two_servers
    t = random_job(SIZES, 5, 8, seed=4)
    params = {k: v.numpy() for k, v in t.items() if k.startswith("layers.")}
    args = (params, t["inputs"].numpy(), t["targets"].numpy())
    with GradientClient(first.address) as single:
        whole = single.compute(*args, input_gradients=True)

    async def run():
        async with AsyncGradientClient([first.address, second.address]) as client:
            sharded = await client.compute_sharded(*args, input_gradients=True)
            return await client.health(), sharded

    before = [stats(s.address).completed_jobs for s in two_servers]
    health, sharded = asyncio.run(run())
    after = [stats(s.address).completed_jobs for s in two_servers]
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1]  # one shard each
    assert health == "SERVING" and sharded.summary["shards"] == 2
    for name, value in whole.tensors.items():
        np.testing.assert_allclose(sharded.tensors[name], value, rtol=1e-6, atol=1e-7)
