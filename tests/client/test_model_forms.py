"""The client accepts each ensemble form and returns results in the same form and kind."""

import asyncio
import re
import time
import warnings
from collections import OrderedDict

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from gradserve.client import NO_RETRIES, AsyncGradientClient, GradientClient, GradserveError


def make_net(seed, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), act(), nn.Linear(6, 6), act(), nn.Linear(6, 2))


def torch_grads(net, x, y):
    net.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def test_single_sequential_returns_scalar_loss_and_its_own_parameter_names(client):
    net = make_net(0, nn.SiLU)
    x, y = torch.randn(11, 3), torch.randn(11, 2)
    result = client.compute(net, x, y)
    assert isinstance(result.loss, torch.Tensor) and result.loss.dim() == 0
    expected = torch_grads(net, x, y)
    assert set(result.gradients) == set(expected)
    for k, g in expected.items():
        torch.testing.assert_close(result.gradients[k], g, rtol=1e-5, atol=1e-6)


def test_a_single_sequentials_results_have_no_model_axis(client):
    """As torch gives them for one network: outputs like net(x), input gradients like
    x.grad, one value per sample, one loss per step; `tensors` keeps the wire's [1, ...]."""
    net = make_net(1)
    x, y = torch.randn(11, 3, requires_grad=True), torch.randn(11, 2)
    result = client.compute(net, x.detach(), y, input_gradients=True, forward_outputs=True,
                            per_sample_losses=True, per_sample_gradient_norms=True)  # fmt: skip
    out = net(x)
    nn.functional.mse_loss(out, y).backward()
    torch.testing.assert_close(result.outputs, out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.input_gradients, x.grad, rtol=1e-5, atol=1e-7)
    assert result.per_sample_loss.shape == result.per_sample_grad_norm.shape == (11,)
    assert result.tensors["outputs"].shape == (1, 11, 2)
    seen = []
    trained = client.compute(net, x.detach(), y, optimizer="sgd", learning_rate=0.1, steps=4,
                             on_step=lambda k, loss: seen.append(loss))  # fmt: skip
    assert trained.losses.shape == (4,) and trained.loss == trained.losses[-1]
    assert all(loss.shape == () for loss in seen) and torch.equal(torch.stack(seen), trained.losses)
    listed = client.compute([net], x.detach(), y, forward_outputs=True)
    assert listed.outputs.shape == (1, 11, 2) and listed.loss.shape == (1,)


@pytest.mark.parametrize("hidden_slope", [0.0, 0.2])
def test_sequential_leaky_relus_keep_their_slopes(client, hidden_slope):
    """Each LeakyReLU's own slope reaches the server, 0 included (the wire's 0 means the
    default 0.01, so the client sends a 0-slope leaky_relu as the relu it equals)."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Linear(3, 6), nn.LeakyReLU(hidden_slope), nn.Linear(6, 6), nn.LeakyReLU(hidden_slope),
        nn.Linear(6, 2), nn.LeakyReLU(0.5),
    )  # fmt: skip
    x, y = torch.randn(11, 3), torch.randn(11, 2)
    result = client.compute(net, x, y)
    for k, g in torch_grads(net, x, y).items():
        torch.testing.assert_close(result.gradients[k], g, rtol=1e-5, atol=1e-6)


def test_list_of_sequentials_returns_a_list_of_gradient_dicts(client):
    nets = [make_net(s) for s in range(3)]
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    result = client.compute(nets, x, y)
    assert result.loss.shape == (3,)
    assert isinstance(result.gradients, list) and len(result.gradients) == 3
    for net, grads in zip(nets, result.gradients, strict=True):
        for k, g in torch_grads(net, x, y).items():
            torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6)


def assert_gradients_per_model(result, params, nets, x, y):
    """A stack_module_state dict's gradients: its keys, each model's torch's own."""
    assert set(result.gradients) == set(params)
    for i, net in enumerate(nets):
        for k, g in torch_grads(net, x[i], y[i]).items():
            torch.testing.assert_close(result.gradients[k][i], g, rtol=1e-5, atol=1e-6)


def test_stack_module_state_dict_round_trips_its_keys(client):
    nets = [make_net(s, nn.GELU) for s in range(4)]
    params, _ = torch.func.stack_module_state(nets)
    params = {k: v.detach() for k, v in params.items()}
    x, y = torch.randn(4, 7, 3), torch.randn(4, 7, 2)
    result = client.compute(params, x, y, hidden_activation="gelu")
    assert_gradients_per_model(result, params, nets, x, y)


def named_net(seed: int) -> nn.Sequential:
    """Named and nested modules: stack_module_state keys `hidden.0.weight`, `out.weight`."""
    torch.manual_seed(seed)
    hidden = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.Tanh())
    return nn.Sequential(OrderedDict(hidden=hidden, out=nn.Linear(5, 2)))


def test_stack_module_state_of_named_modules_round_trips_its_keys(client):
    """Keys that are no one prefix and a layer index: the layers in the keys' order (the
    modules' order, as stack_module_state gives them)."""
    nets = [named_net(s) for s in range(3)]
    params, _ = torch.func.stack_module_state(nets)
    params = {k: v.detach() for k, v in params.items()}
    assert list(params) == ["hidden.0.weight", "hidden.0.bias", "hidden.2.weight",
                            "out.weight", "out.bias"]  # fmt: skip
    x, y = torch.randn(3, 9, 3), torch.randn(3, 9, 2)
    result = client.compute(params, x, y, hidden_activation="tanh")
    assert_gradients_per_model(result, params, nets, x, y)


@pytest.mark.parametrize(
    "keys, message",
    [
        (["hidden.weight", "hidden.scale"], "'hidden.scale' is not '<module>.weight' or"),
        (["weight", "bias"], "'weight' is not '<module>.weight' or"),
        (["hidden.weight", "out.bias"], "layer 'out.bias' has a bias but no weight"),
    ],
)
def test_dict_keys_that_name_no_layers_are_refused(client, keys, message):
    params = {k: torch.randn(2, 4, 4) if k.endswith("weight") else torch.randn(2, 4) for k in keys}
    with pytest.raises(ValueError, match=re.escape(message)):
        client.compute(params, torch.randn(5, 4), torch.randn(5, 4))


@pytest.mark.parametrize("shape", [(4,), (2, 4), (2, 1, 4, 1)])
def test_a_dict_weight_that_is_not_stacked_matrices_is_refused_naming_its_key(shape):
    """Any layer's weight, not only the first's (a later one's shape was read as if it had
    three axes: IndexError); no server listens at this address."""
    params = {"0.weight": torch.randn(2, 4, 3), "0.bias": torch.randn(2, 4),
              "2.weight": torch.randn(*shape), "2.bias": torch.randn(2, 1)}  # fmt: skip
    message = f"2.weight: stacked weights must be [M, d_out, d_in], got shape {list(shape)}"
    with GradientClient("127.0.0.1:1", retry=NO_RETRIES) as dead:
        with pytest.raises(ValueError, match=re.escape(message)):
            dead.compute(params, torch.randn(5, 3), torch.randn(5, 1))


def test_a_network_on_the_meta_device_is_refused_naming_its_parameter():
    net = nn.Sequential(nn.Linear(3, 2, device="meta"))
    with GradientClient("127.0.0.1:1", retry=NO_RETRIES) as dead:
        with pytest.raises(TypeError, match="0.weight: a tensor on the meta device"):
            dead.compute(net, torch.randn(4, 3), torch.randn(4, 2))


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensors_are_sent_as_the_values_they_hold(client, layout):
    """Inputs, targets, sample weights and parameters given as sparse tensors (a third of
    their values zero) give the results of their dense twins, bit for bit."""
    nets = [make_net(3), make_net(4)]
    params = {k: v.detach() for k, v in torch.func.stack_module_state(nets)[0].items()}
    g = torch.Generator().manual_seed(9)

    def thinned(t):
        return t * (torch.rand(t.shape, generator=g) > 1 / 3)

    x, y = thinned(torch.randn(7, 3, generator=g)), thinned(torch.randn(7, 2, generator=g))
    w = thinned(torch.rand(7, generator=g))
    params["2.weight"] = thinned(params["2.weight"])

    def sparse(t):
        if layout == "csr" and t.dim() == 2:  # CSR holds matrices only
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch: "CSR support is in beta state"
                return t.to_sparse_csr()
        return t.to_sparse()

    expected = client.compute(params, x, y, sample_weights=w, hidden_activation="tanh")
    params["2.weight"] = sparse(params["2.weight"])
    x, y, w = sparse(x), sparse(y), sparse(w)
    got = client.compute(params, x, y, sample_weights=w, hidden_activation="tanh")
    # sharded: each shard's slice of the models cut from the (dense) parameters
    shards = client.compute_sharded(params, x, y, sample_weights=w, hidden_activation="tanh",
                                    shards=2)  # fmt: skip
    for result in (got, shards):
        assert torch.equal(result.loss, expected.loss)
        for name, grad in expected.gradients.items():
            assert torch.equal(result.gradients[name], grad), name


def test_a_masked_array_without_masked_entries_is_its_values(client):
    x, y = np.random.default_rng(3).random((2, 6, 3)), np.random.default_rng(4).random((6, 2))
    params = {k: v.detach().numpy() for k, v in torch.func.stack_module_state(
        [make_net(1), make_net(2)])[0].items()}  # fmt: skip
    expected = client.compute(params, x, y, hidden_activation="tanh")
    got = client.compute(params, np.ma.masked_array(x, mask=False), y, hidden_activation="tanh")
    np.testing.assert_array_equal(got.loss, expected.loss)


def test_numpy_in_numpy_out(client):
    rng = np.random.default_rng(0)
    params = {
        "layers.0.weight": rng.standard_normal((2, 4, 3), dtype=np.float32),
        "layers.0.bias": rng.standard_normal((2, 4), dtype=np.float32),
        "layers.1.weight": rng.standard_normal((2, 1, 4), dtype=np.float32),
        "layers.1.bias": rng.standard_normal((2, 1), dtype=np.float32),
    }
    result = client.compute(params, rng.standard_normal((5, 3)), rng.standard_normal((5, 1)))
    assert all(isinstance(v, np.ndarray) for v in result.gradients.values())
    assert result.gradients["layers.0.weight"].shape == (2, 4, 3)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("precision", ["float32", "float16", "float64"])
def test_float64_arrays_travel_as_float32_to_jobs_that_compute_in_float32(client, kind, precision):
    """numpy's default dtype: the engines round float64 to float32 first for every precision
    but float64, so the client sends float32 (half the bytes) and the results are the same
    bits; float64 jobs get every float64 bit, and values past float32's range still reach
    the server, which names them."""
    rng = np.random.default_rng(11)
    job = {
        "model": {
            "layers.0.weight": rng.standard_normal((2, 5, 3)),
            "layers.0.bias": rng.standard_normal((2, 5)),
            "layers.1.weight": rng.standard_normal((2, 2, 5)),
            "layers.1.bias": rng.standard_normal((2, 2)),
        },
        "inputs": rng.standard_normal((7, 3)) * 1e-3 + 1 / 3,  # bits beyond float32's
        "targets": rng.standard_normal((2, 7, 2)),
        "sample_weights": rng.random(7),
    }
    convert = torch.from_numpy if kind == "torch" else np.asarray
    float64 = {k: convert(v) if k != "model" else {n: convert(p) for n, p in v.items()}
               for k, v in job.items()}  # fmt: skip
    float32 = {k: convert(v.astype(np.float32)) if k != "model"
               else {n: convert(p.astype(np.float32)) for n, p in v.items()}
               for k, v in job.items()}  # fmt: skip
    options = dict(precision=precision, input_gradients=True, per_sample_losses=True)
    wide, narrow = client.compute(**float64, **options), client.compute(**float32, **options)
    elements = sum(np.size(v) for v in [*job["model"].values(), *list(job.values())[1:]])
    if precision == "float64":
        assert wide.summary["bytes_received"] == 8 * elements
        assert wide.tensors["loss"].dtype == (torch.float64 if kind == "torch" else np.float64)
    else:
        assert wide.summary["bytes_received"] == narrow.summary["bytes_received"]
        assert wide.summary["bytes_received"] == 4 * elements
        for name, value in narrow.tensors.items():
            np.testing.assert_array_equal(np.asarray(wide.tensors[name]), np.asarray(value))
    beyond = dict(float64, inputs=convert(np.full((7, 3), -1e39)))
    with pytest.raises(GradserveError, match="beyond float32's range") as err:
        client.compute(**beyond, precision="float32")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_lone_linear_and_a_list_of_them_are_one_layer_networks(client):
    torch.manual_seed(4)
    nets = [nn.Linear(3, 2) for _ in range(2)]
    x, y = torch.randn(7, 3), torch.randn(7, 2)
    single = client.compute(nets[0], x, y)
    for k, g in torch_grads(nets[0], x, y).items():
        torch.testing.assert_close(single.gradients[k], g, rtol=1e-5, atol=1e-6)
    listed = client.compute(nets, x, y)
    for net, grads in zip(nets, listed.gradients, strict=True):
        for k, g in torch_grads(net, x, y).items():
            torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "build",
    [
        # blocks: Sequentials nested in the Sequential, their modules in their place
        lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 5), nn.Tanh()),
                              nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.Linear(4, 2)),
        # nn.Identity computes nothing: a configurable activation or output set to none
        lambda: nn.Sequential(nn.Linear(3, 5), nn.Identity(), nn.Tanh(), nn.Linear(5, 4),
                              nn.Tanh(), nn.Identity(), nn.Linear(4, 2), nn.Identity()),
        lambda: nn.Sequential(nn.Linear(3, 5), nn.Identity(), nn.Linear(5, 2)),
    ],
)  # fmt: skip
def test_nested_sequentials_and_identities_are_the_network_they_compute(client, build):
    torch.manual_seed(12)
    nets = [build() for _ in range(2)]
    x, y = torch.randn(7, 3), torch.randn(7, 2)
    single = client.compute(nets[0], x, y)
    listed = client.compute(nets, x, y)
    for net, grads in [(nets[0], single.gradients), *zip(nets, listed.gradients, strict=True)]:
        expected = torch_grads(net, x, y)
        assert set(grads) == set(expected)  # the Sequential's own parameter names
        for k, g in expected.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6)


def bias_free_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6, bias=False), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, 2, bias=False))  # fmt: skip


def test_layers_without_bias_in_every_form(client):
    """nn.Linear(..., bias=False) as torch computes it: no bias is sent and none comes back,
    for a Sequential, a list of them, their stack_module_state and a dict of arrays."""
    nets = [bias_free_net(20 + k) for k in range(2)]
    x, y = torch.randn(7, 3), torch.randn(7, 2)
    single = client.compute(nets[0], x, y)
    assert set(single.gradients) == {"0.weight", "2.weight", "2.bias", "4.weight"}
    listed = client.compute(nets, x, y)
    params, _ = torch.func.stack_module_state(nets)
    stacked = client.compute(dict(params), x, y, hidden_activation="tanh")
    arrays = {f"layers.{i}.weight": params[f"{2 * i}.weight"].detach().numpy() for i in range(3)}
    arrays["layers.1.bias"] = params["2.bias"].detach().numpy()
    numpy = client.compute(arrays, x.numpy(), y.numpy(), hidden_activation="tanh")
    assert single.summary["bytes_received"] == 4 * (18 + 30 + 5 + 10 + 21 + 14)
    for k, net in enumerate(nets):
        expected = torch_grads(net, x, y)
        got = [listed.gradients[k], {n: g[k] for n, g in stacked.gradients.items()},
               {n: torch.from_numpy(numpy.gradients[f"layers.{int(n[0]) // 2}.{n[2:]}"][k])
                for n in expected}]  # fmt: skip
        if k == 0:
            got.append(single.gradients)
        for grads in got:
            assert set(grads) == set(expected)
            for n, g in expected.items():
                torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6)


def test_training_a_network_with_layers_without_bias(client):
    net = bias_free_net(22)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    result = client.compute(net, x, y, optimizer="adam", learning_rate=0.01, steps=5,
                            return_optimizer_state=True)  # fmt: skip
    assert set(result.parameters) == {"0.weight", "2.weight", "2.bias", "4.weight"}
    assert not any(".bias" in n and not n.startswith("layers.1.") for n in result.optimizer_state)
    optim = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(5):
        optim.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optim.step()
    for n, p in net.named_parameters():
        torch.testing.assert_close(result.parameters[n], p.detach(), rtol=1e-4, atol=1e-6)


def test_per_sample_norms_of_a_network_with_layers_without_bias(client):
    """Each sample's gradient norm over the parameters it has (torch.func per-sample)."""
    net = bias_free_net(23)
    x, y = torch.randn(9, 3), torch.randn(9, 2)
    result = client.compute(net, x, y, per_sample_gradient_norms=True)
    params = {n: p.detach() for n, p in net.named_parameters()}

    def own_loss(p, xn, yn):  # a sample's contribution to the mean loss
        out = torch.func.functional_call(net, p, (xn[None],))
        return nn.functional.mse_loss(out, yn[None], reduction="sum") / (9 * 2)

    grads = torch.func.vmap(torch.func.grad(own_loss), in_dims=(None, 0, 0))(params, x, y)
    want = sum(g.reshape(9, -1).square().sum(1) for g in grads.values()).sqrt()
    torch.testing.assert_close(result.per_sample_grad_norm, want, rtol=1e-5, atol=1e-8)


def test_bfloat16_parameters_and_samples_cross_the_wire_as_their_values(client):
    """bfloat16 tensors are sent as bfloat16 (2 bytes each) and widened on the server: the
    result equals the job sent as the same values in float32, bit for bit."""
    net = make_net(6).to(torch.bfloat16)
    x, y = torch.randn(9, 3, dtype=torch.bfloat16), torch.randn(9, 2, dtype=torch.bfloat16)
    half = client.compute(net, x, y)
    full = client.compute(net.float(), x.float(), y.float())
    torch.testing.assert_close(half.loss, full.loss, rtol=0, atol=0)
    for k, g in full.gradients.items():
        torch.testing.assert_close(half.gradients[k], g, rtol=0, atol=0)


@pytest.mark.parametrize(
    "model, error, message",
    [
        ([], ValueError, "list of models is empty"),
        ({}, ValueError, "parameter dict is empty"),
        ([nn.Linear(3, 2), "layer"], TypeError, "got str"),
        (nn.Conv1d(1, 1, 3), TypeError, "got Conv1d"),
        # what training returns for a list of Sequentials: the models' state dicts
        (
            [dict(nn.Linear(3, 2).state_dict())],
            TypeError,
            r"got dict\); to continue from a result's parameters, load them into the models",
        ),
    ],
)
def test_an_ensemble_that_is_empty_or_no_network_is_named_before_sending(
    client, model, error, message
):
    with pytest.raises(error, match=message):
        client.compute(model, torch.randn(4, 3), torch.randn(4, 2))


def test_zero_samples_are_the_servers_invalid_argument_not_a_client_crash(client):
    import grpc

    with pytest.raises(GradserveError) as err:
        client.compute(make_net(8), torch.randn(0, 3), torch.randn(0, 2))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in err.value.details


def test_unsupported_module_is_rejected_before_sending(client):
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 1))
    with pytest.raises(ValueError, match="Dropout"):
        client.compute(net, torch.randn(3, 2), torch.randn(3, 1))


def test_a_layer_used_twice_is_refused_not_given_one_uses_gradient(client):
    """torch sums a shared parameter's gradient over its uses; one Linear stands for one
    layer here, so a Sequential that reuses one (or ties two layers' weights) is refused."""
    shared = nn.Linear(4, 4)
    reused = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 2))
    tied = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    tied[4].weight = tied[2].weight
    for net in (reused, tied):
        with pytest.raises(ValueError, match="used by more than one Linear layer"):
            client.compute(net, torch.randn(5, 3), torch.randn(5, net[-1].out_features))
    # The same network twice in an ensemble is two models, each with its own gradients.
    net = make_net(5)
    twice = client.compute([net, net], torch.randn(5, 3), torch.randn(5, 2))
    for name in twice.gradients[0]:
        assert torch.equal(twice.gradients[0][name], twice.gradients[1][name])


class ScaledLinear(nn.Linear):
    """An adapter-style Linear whose forward() computes something else."""

    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.parametrize(
    "first_layer, message",
    [
        (lambda: ScaledLinear(3, 4), "ScaledLinear has a forward() of its own"),
        (lambda: torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)),
         "ParametrizedLinear's weight is computed from other parameters"),
        (lambda: torch.nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)),
         "ParametrizedLinear's weight is computed from other parameters"),
        (lambda: torch.nn.utils.spectral_norm(nn.Linear(3, 4)),  # the older hook-based one
         "Linear's weight is computed from other parameters"),
        (lambda: nn.LazyLinear(4), "LazyLinear has no parameters until it has run once"),
    ],
)  # fmt: skip
def test_linears_that_compute_something_else_are_refused_before_sending(first_layer, message):
    """Sent as plain Linears, their gradients came back wrong (the subclass's own forward
    ignored) or failed with a KeyError (a computed weight is no parameter of the module)."""
    net = nn.Sequential(first_layer(), nn.Tanh(), nn.Linear(4, 2))
    with GradientClient("127.0.0.1:1", retry=NO_RETRIES) as dead:
        with pytest.raises(ValueError, match=re.escape(message)):
            dead.compute(net, torch.randn(5, 3), torch.randn(5, 2))


def test_a_linear_subclass_that_computes_what_linear_does_is_taken(client):
    """torch's own NonDynamicallyQuantizableLinear (nn.MultiheadAttention's out_proj)
    keeps nn.Linear's forward()."""
    net = nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(3, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    result = client.compute(net, x, y)
    torch.nn.functional.mse_loss(net(x), y).backward()
    assert torch.allclose(result.gradients["0.weight"], net[0].weight.grad, atol=1e-6)


def test_mixed_hidden_activations_are_rejected(client):
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    with pytest.raises(ValueError, match="hidden activations"):
        client.compute(net, torch.randn(3, 2), torch.randn(3, 1))


@pytest.mark.parametrize(
    "option",
    [
        dict(hidden_activation="relu"),
        dict(output_activation="sigmoid"),
        dict(hidden_activation=("leaky_relu", 0.3)),
    ],
)
def test_activation_options_contradicting_the_sequential_are_rejected(client, option):
    """The modules say what the network computes: an option naming another activation is
    refused, not applied over them."""
    net = nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(0.2), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="contradicts the model's own"):
        client.compute(net, torch.randn(3, 2), torch.randn(3, 1), **option)


def test_activation_options_agreeing_with_the_sequential_are_accepted(client):
    net = nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(0.2), nn.Linear(3, 1))
    x, y = torch.randn(5, 2), torch.randn(5, 1)
    result = client.compute(net, x, y, hidden_activation="leaky_relu", output_activation="identity")
    for k, g in torch_grads(net, x, y).items():
        torch.testing.assert_close(result.gradients[k], g, rtol=1e-5, atol=1e-6)


def test_async_client_matches_sync_client(server, client):
    net = make_net(5)
    x, y = torch.randn(9, 3), torch.randn(9, 2)
    sync = client.compute(net, x, y)

    async def run():
        async with AsyncGradientClient(server.address) as aclient:
            return await asyncio.gather(*(aclient.compute(net, x, y) for _ in range(4)))

    for result in asyncio.run(run()):
        for k, g in sync.gradients.items():
            torch.testing.assert_close(result.gradients[k], g, rtol=0, atol=0)


def test_errors_carry_the_status_code(client):
    import grpc

    net = make_net(1)
    with pytest.raises(GradserveError) as err:
        client.compute(net, torch.randn(4, 5), torch.randn(4, 2))  # d0 is 3, not 5
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs" in err.value.details


def test_deadline_exceeded_surfaces_as_its_code(server):
    import grpc

    net = make_net(2)
    training = dict(optimizer="sgd", learning_rate=0.01, steps=100_000)  # minutes here
    with GradientClient(server.address) as c:
        with pytest.raises(GradserveError) as err:
            c.compute(net, torch.randn(4, 3), torch.randn(4, 2), timeout=0.5, **training)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_compute_many_returns_results_and_errors_in_order(client):
    good = {"model": make_net(7), "inputs": torch.randn(6, 3), "targets": torch.randn(6, 2)}
    bad = dict(good, inputs=torch.randn(6, 4))  # wrong input width
    results = client.compute_many([good, bad, good], max_in_flight=3)
    assert [type(r).__name__ for r in results] == [
        "ComputeResult",
        "GradserveError",
        "ComputeResult",
    ]
    import grpc

    assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT
    for k, g in results[0].gradients.items():
        torch.testing.assert_close(results[2].gradients[k], g, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [GradientClient, AsyncGradientClient])
@pytest.mark.parametrize(
    "spoil, error, message",
    [
        (lambda job: {**job, "loss": "hinge"}, ValueError, "job 1: unknown loss 'hinge'"),
        (lambda job: {**job, "lr": 0.1}, TypeError, "job 1: .*unexpected keyword argument 'lr'"),
        (lambda job: {**job, "timeout": 0}, ValueError, "job 1: timeout"),
        (
            lambda job: {k: v for k, v in job.items() if k != "targets"},
            TypeError,
            "job 1: missing compute.. argument.s. targets",
        ),
        (lambda job: tuple(job.values()), TypeError, "job 1: compute_many takes dicts"),
    ],
)
def test_compute_many_checks_every_job_before_sending_any(server, cls, spoil, error, message):
    """A job the client refuses raises, naming its place, before the good jobs run (they
    would otherwise run and their results be dropped with the exception)."""
    sent = []
    good = {
        "model": make_net(7), "inputs": torch.randn(6, 3), "targets": torch.randn(6, 2),
        "on_progress": lambda *progress: sent.append(progress),
    }  # fmt: skip
    bad = spoil(good)
    jobs = [good, bad, good]

    async def run_async():
        async with cls(server.address) as aclient:
            return await aclient.compute_many(jobs)

    with pytest.raises(error, match=message):
        if cls is GradientClient:
            with cls(server.address) as c:
                c.compute_many(jobs)
        else:
            asyncio.run(run_async())
    assert sent == []  # no job's bytes went out


@pytest.mark.parametrize("cls", [GradientClient, AsyncGradientClient])
@pytest.mark.parametrize("max_in_flight", [0, -1, 1.5])
def test_compute_many_refuses_a_max_in_flight_below_one(cls, max_in_flight):
    async def run_async():
        async with cls("127.0.0.1:1") as aclient:
            return await aclient.compute_many([], max_in_flight=max_in_flight)

    with pytest.raises(ValueError, match="max_in_flight"):
        if cls is GradientClient:
            cls("127.0.0.1:1").compute_many([], max_in_flight=max_in_flight)
        else:
            asyncio.run(run_async())


def test_async_compute_many_matches_sync(server, client):
    jobs = [
        {"model": make_net(s), "inputs": torch.randn(5, 3), "targets": torch.randn(5, 2)}
        for s in range(6)
    ]
    sync = client.compute_many(jobs)

    async def run():
        async with AsyncGradientClient(server.address) as aclient:
            return await aclient.compute_many(jobs, max_in_flight=4)

    for a, s in zip(asyncio.run(run()), sync, strict=True):
        torch.testing.assert_close(a.loss, s.loss, rtol=0, atol=0)


def test_errors_name_the_offending_field(client):
    net = make_net(1)
    with pytest.raises(GradserveError) as err:
        client.compute(net, torch.randn(4, 5), torch.randn(4, 2))  # d0 is 3, not 5
    field, description = err.value.violations[0]
    assert field == "tensors[inputs].shape" and "expected [4, 3]" in description


@pytest.mark.parametrize("cls", [GradientClient, AsyncGradientClient])
@pytest.mark.parametrize(
    "settings",
    [dict(timeout=0), dict(timeout=-3), dict(chunk_bytes=64), dict(chunk_bytes=1 << 30)],
)
def test_unusable_client_settings_are_refused_at_construction(cls, settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        cls("127.0.0.1:1", **settings)


@pytest.mark.parametrize("cls", [GradientClient, AsyncGradientClient])
@pytest.mark.parametrize(
    "address", ["", [], ["127.0.0.1:1", " "], [None], "::1:50051", ["[::1]:1", "fe80::1"]]
)
def test_missing_or_unreadable_addresses_are_refused_at_construction(cls, address):
    with pytest.raises(ValueError, match="address"):
        cls(address)


def test_a_call_timeout_of_zero_is_refused_not_taken_for_the_default(client):
    net = make_net(3)
    with pytest.raises(ValueError, match="timeout"):
        client.compute(net, torch.randn(4, 3), torch.randn(4, 2), timeout=0)


@pytest.mark.parametrize(
    "options, message",
    [
        # the wire's huber_delta 0 means "the default, 1.0": it would run another loss
        (dict(loss="huber", huber_delta=0.0), "huber_delta"),
        (dict(loss="huber", huber_delta=float("nan")), "huber_delta"),
        # training options without an optimizer would be dropped, returning plain gradients
        (dict(steps=5), "steps.*needs optimizer"),
        (dict(learning_rate=0.1), "learning_rate.*needs optimizer"),
        (dict(momentum=0.9, return_optimizer_state=True), "return_optimizer_state, momentum"),
        (dict(betas=(0.8, 0.9)), "betas.*needs optimizer"),
        (dict(on_step=print), "on_step.*needs optimizer"),
        # an option of the other optimiser would be ignored by this one
        (dict(optimizer="adam", learning_rate=0.1, momentum=0.9), "momentum: not options"),
        (dict(optimizer="adamw", learning_rate=0.1, nesterov=True), "nesterov: not options"),
        (dict(optimizer="sgd", learning_rate=0.1, eps=1e-6), "eps: not options"),
        (dict(clip_norm=1.0, noise_multiplier=1.0, noise_seed=-1), "noise_seed"),
        (dict(clip_norm=1.0, noise_multiplier=1.0, noise_seed=1 << 64), "noise_seed"),
    ],
)
def test_options_the_job_would_not_honour_are_refused_before_sending(options, message):
    """No server listens at this address: each refusal happens before a byte is sent."""
    net = make_net(3)
    with GradientClient("127.0.0.1:1", retry=NO_RETRIES) as dead:
        with pytest.raises(ValueError, match=message):
            dead.compute(net, torch.randn(4, 3), torch.randn(4, 2), **options)


@pytest.mark.parametrize("field", ["inputs", "targets", "sample_weights"])
def test_a_ragged_list_is_refused_naming_the_tensor(field):
    """Not in numpy's words ("setting an array element with a sequence"), which name
    nothing; no server listens at this address."""
    job = dict(inputs=torch.randn(4, 3), targets=torch.randn(4, 2), sample_weights=None)
    job[field] = [[0.5] * 2, [0.5] * 3, [0.5], [0.5] * 2]
    with GradientClient("127.0.0.1:1", retry=NO_RETRIES) as dead:
        with pytest.raises(ValueError, match=f"{field}: its rows differ in shape"):
            dead.compute(make_net(3), **job)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(micro_batch_samples=2.5), "micro_batch_samples must be a whole number, got 2.5"),
        (dict(optimizer="sgd", learning_rate=0.1, steps=2.0), "steps must be a whole number"),
        (dict(optimizer="sgd", learning_rate=0.1, steps=True), "steps must be a whole number"),
        (dict(optimizer="sgd", learning_rate=0.1, steps=1 << 63), "steps must be a whole"),
        (dict(optimizer="sgd", learning_rate="0.1"), "learning_rate must be a number, got '0.1'"),
        (dict(loss="huber", huber_delta="1"), "huber_delta must be a number"),
        (dict(clip_norm=[1.0]), "clip_norm must be a number"),
        (dict(clip_norm=1.0, noise_seed=7.0), "noise_seed must be a whole number"),
        (dict(optimizer="adam", learning_rate=0.1, betas=0.9), "betas must be a pair"),
        (dict(optimizer="adam", learning_rate=0.1, betas=(0.9, "0.99")), "betas must be a pair"),
        (dict(input_gradients="yes"), "input_gradients must be True or False, got 'yes'"),
        (dict(per_sample_losses=None), "per_sample_losses must be True or False"),
        (dict(hidden_activation=("leaky_relu", "0.2")), "an activation is a name or"),
        (dict(output_activation=["tanh"]), "an activation is a name or"),
    ],
)
def test_options_of_the_wrong_kind_are_refused_naming_the_option(options, message):
    """Not by protobuf's "'float' object cannot be interpreted as an integer" as the
    header is filled; no server listens at this address."""
    net = torch.func.stack_module_state([make_net(3)])[0]  # a dict: activations by option
    with GradientClient("127.0.0.1:1", retry=NO_RETRIES) as dead:
        with pytest.raises(TypeError, match=re.escape(message)):
            dead.compute(net, torch.randn(4, 3), torch.randn(4, 2), **options)


def test_numbers_of_numpy_and_torch_kinds_are_taken_as_options(client):
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    expected = client.compute(net, x, y, optimizer="adam", learning_rate=0.5, steps=2,
                              betas=(0.5, 0.75), return_optimizer_state=True)  # fmt: skip
    got = client.compute(net, x, y, optimizer="adam", learning_rate=torch.tensor(0.5),
                         steps=np.int64(2), betas=[np.float32(0.5), 0.75],
                         return_optimizer_state=np.bool_(True))  # fmt: skip
    for name in expected.parameters:
        assert torch.equal(got.parameters[name], expected.parameters[name]), name


@pytest.mark.parametrize(
    "field, value, message",
    [
        # casting would drop the imaginary part (numpy and torch only warn)
        ("inputs", torch.randn(4, 3, dtype=torch.complex64), "inputs: complex tensors"),
        ("targets", np.ones((4, 2), np.complex128), "targets: dtype complex128"),
        ("inputs", [["1", "2", "3"]] * 4, "inputs: dtype <U1"),
        ("targets", np.array([[{"x": 1}, 1.0]] * 4, dtype=object), "targets: holds values that"),
        ("sample_weights", np.array(["2026-11-28"] * 4, "datetime64[D]"), "sample_weights"),
        # the networks compute in floating point (as torch's nn.Linear refuses these); the
        # error names the caller's dtype, not the int64 a bool array would go as
        ("inputs", torch.rand(4, 3) > 0.5, "inputs: dtype torch.bool"),
        ("inputs", np.ones((4, 3), np.uint8), "inputs: dtype uint8"),
        ("inputs", [[1, 2, 3]] * 4, "inputs: dtype int64"),
        # a tensor with a shape but no values (not numpy's "Cannot copy out of meta tensor")
        ("inputs", torch.empty(4, 3, device="meta"), "inputs: a tensor on the meta device"),
        # numpy would send what the masked entries hold
        (
            "inputs",
            np.ma.masked_array(np.ones((4, 3)), mask=[[0, 1, 0]] * 4),
            "inputs: a masked array with masked entries",
        ),
        ("sample_weights", np.ma.masked_less(np.arange(4.0), 1), "sample_weights: a masked array"),
    ],
)
def test_tensors_of_values_that_are_no_real_numbers_are_refused_before_sending(
    field, value, message
):
    """No server listens at this address: the TypeError names the tensor, before a byte
    is sent."""
    net = make_net(3)
    job = dict(inputs=torch.randn(4, 3), targets=torch.randn(4, 2), sample_weights=None)
    job[field] = value
    with GradientClient("127.0.0.1:1", retry=NO_RETRIES) as dead:
        with pytest.raises(TypeError, match=message):
            dead.compute(net, **job)


@pytest.mark.parametrize(
    "weights",
    [
        torch.tensor([2, 0, 1, 3]),  # a bootstrap's counts
        np.array([[2, 0, 1, 3], [1, 1, 1, 1]], np.int32),  # per model
        np.array([True, False, True, True]),  # a mask
    ],
    ids=["torch_counts", "numpy_counts_per_model", "mask"],
)
def test_integer_and_bool_sample_weights_are_the_floats_they_equal(client, weights):
    """As torch's loss * weights promotes them: the same results as float weights."""
    nets = [make_net(3), make_net(4)]
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    expected = client.compute(nets, x, y, sample_weights=torch.as_tensor(weights).double())
    got = client.compute(nets, x, y, sample_weights=weights)
    for g, e in zip(got.gradients, expected.gradients, strict=True):
        for name in e:
            assert torch.equal(g[name], e[name]), name


def test_integer_parameters_and_optimizer_state_are_refused_before_sending():
    """Integer weights (a dict of numpy arrays) or optimiser state would be refused by the
    server as INT64 after the upload: the client names the tensor and its dtype first."""
    params = {"layers.0.weight": np.ones((1, 2, 3), np.int32), "layers.0.bias": np.ones((1, 2))}
    x, y = np.random.rand(4, 3), np.random.rand(4, 2)
    state = {"layers.0.weight.momentum_buffer": np.ones((1, 2, 3), np.int64),
             "layers.0.bias.momentum_buffer": np.zeros((1, 2))}  # fmt: skip
    with GradientClient("127.0.0.1:1", retry=NO_RETRIES) as dead:
        with pytest.raises(TypeError, match="layers.0.weight: dtype int32"):
            dead.compute(params, x, y)
        params["layers.0.weight"] = np.ones((1, 2, 3))
        with pytest.raises(TypeError, match="momentum_buffer: dtype int64"):
            dead.compute(params, x, y, optimizer="sgd", momentum=0.9, learning_rate=0.1,
                         optimizer_state=state, start_step=1)  # fmt: skip


def test_float8_tensors_are_sent_as_the_float32_they_equal(client):
    """numpy has no float8: such tensors are widened, exactly, before they are sent."""
    net = make_net(3)
    x = torch.randn(4, 3).to(torch.float8_e4m3fn)
    y = torch.randn(4, 2).to(torch.float8_e5m2)
    expected = client.compute(net, x.float(), y.float())
    got = client.compute(net, x, y)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_a_list_of_numbers_and_zero_dim_tensors_is_still_sent_as_numbers(client):
    net = make_net(3)
    x = torch.randn(4, 3)
    targets = [[torch.tensor(0.5), 1.0]] * 4  # numpy makes this an object array
    expected = client.compute(net, x, torch.tensor([[0.5, 1.0]] * 4))
    got = client.compute(net, x, targets)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sample_weights", torch.tensor(2.0), "'sample_weights' has shape [], expected [1]"),
        ("targets", torch.tensor(1), "'targets' has shape [], expected [1]"),
        ("inputs", torch.tensor(1.0), "got [1, 4, 3] and []"),
    ],
)
def test_zero_dim_tensors_are_sent_as_zero_dim_and_refused(client, field, value, message):
    """A 0-d tensor for one sample is not the [1] the job takes (numpy's ascontiguousarray
    made it [1] on its way to the wire, and the server took it)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    job = dict(inputs=torch.randn(1, 3), targets=torch.tensor([1]), sample_weights=None)
    job[field] = value
    with pytest.raises(GradserveError) as err:
        client.compute(net, **job, loss="cross_entropy")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details


def test_targets_of_the_wrong_kind_for_the_loss_are_explained(client):
    """One-hot or probability targets, as torch's CrossEntropyLoss also takes."""
    params = {
        "layers.0.weight": np.ones((2, 4, 3), np.float32),
        "layers.0.bias": np.zeros((2, 4), np.float32),
    }
    targets = np.full((5, 4), 0.25, np.float32)
    with pytest.raises(GradserveError) as err:
        client.compute(params, np.ones((5, 3), np.float32), targets, loss="cross_entropy")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cross_entropy takes class indices" in err.value.details
    assert "allowed: DATA_TYPE_" in err.value.details


@pytest.mark.parametrize("loss", ["mse", "l1", "huber", "bce_with_logits"])
@pytest.mark.parametrize(
    "kind", ["numpy_int64", "numpy_bool_per_model", "torch_uint8", "list_of_ints"]
)
def test_whole_number_targets_of_a_loss_on_real_values_are_the_floats_they_equal(
    client, loss, kind
):
    """0/1 labels for bce_with_logits or whole-number regression targets, as torch's
    mse_loss promotes them (its bce and huber refuse them: the values are exact either way)
    rather than an INT64 refusal naming a dtype a bool array never had."""
    nets = [make_net(3), make_net(4)]
    x = torch.randn(6, 3)
    labels = np.random.default_rng(3).integers(0, 2, (2, 6, 2))
    targets = {
        "numpy_int64": labels[0],
        "numpy_bool_per_model": labels.astype(bool),
        "torch_uint8": torch.as_tensor(labels[1], dtype=torch.uint8),
        "list_of_ints": labels[1].tolist(),
    }[kind]
    expected = client.compute(nets, x, torch.as_tensor(np.asarray(targets), dtype=torch.float32),
                              loss=loss)  # fmt: skip
    got = client.compute(nets, x, targets, loss=loss)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    for g, e in zip(got.gradients, expected.gradients, strict=True):
        for name in e:
            assert torch.equal(g[name], e[name]), name


@pytest.mark.parametrize("asynchronous", [False, True])
def test_closing_the_client_ends_its_running_jobs_with_cancelled(server, asynchronous):
    """The job's caller gets GradserveError(CANCELLED), as from any failed job; the asyncio
    client used to raise CancelledError into a task nobody had cancelled."""
    import threading

    net = make_net(4)
    x, y = torch.randn(512, 3), torch.randn(512, 2)
    training = dict(optimizer="sgd", learning_rate=0.01, steps=100_000)

    async def run_async():
        client = AsyncGradientClient(server.address)
        job = asyncio.ensure_future(client.compute(net, x, y, **training))
        await asyncio.sleep(0.5)
        await client.close()
        return await asyncio.wait_for(job, 30)

    def run_sync():
        client = GradientClient(server.address)
        outcome = {}

        def job():
            try:
                outcome["result"] = client.compute(net, x, y, **training)
            except GradserveError as e:
                outcome["error"] = e

        thread = threading.Thread(target=job)
        thread.start()
        time.sleep(0.5)
        client.close()
        thread.join(30)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    with pytest.raises(GradserveError) as err:
        asyncio.run(run_async()) if asynchronous else run_sync()
    assert err.value.code == grpc.StatusCode.CANCELLED
    assert err.value.details == "the client was closed while the job ran"


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_closed_client_answers_each_call_with_cancelled(server, asynchronous):
    """Not gRPC's own ValueError / UsageError about channels; compute_many returns the
    error for each job, as for any failed job."""
    net = make_net(4)
    job = dict(model=net, inputs=torch.randn(5, 3), targets=torch.randn(5, 2))

    async def calls_async():
        client = AsyncGradientClient(server.address)
        await client.compute(**job)  # the channel has been used
        await client.close()
        for call in (client.compute(**job), client.server_info(), client.health(),
                     client.compute_sharded(**job)):  # fmt: skip
            with pytest.raises(GradserveError) as err:
                await call
            yield err.value
        for outcome in await client.compute_many([job, job]):
            yield outcome

    def calls_sync():
        client = GradientClient(server.address)
        client.compute(**job)
        client.close()
        for call in (lambda: client.compute(**job), client.server_info, client.health,
                     lambda: client.compute_sharded(**job)):  # fmt: skip
            with pytest.raises(GradserveError) as err:
                call()
            yield err.value
        yield from client.compute_many([job, job])

    async def collect():
        return [e async for e in calls_async()]

    errors = asyncio.run(collect()) if asynchronous else list(calls_sync())
    assert len(errors) == 6
    for e in errors:
        assert isinstance(e, GradserveError)
        assert e.code == grpc.StatusCode.CANCELLED
        assert e.details == "the client was closed before this call"


def test_numpy_scalars_are_taken_for_numbers(client):
    """Options computed with numpy (np.float32, np.int64) are accepted like Python's."""
    net = make_net(5)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    result = client.compute(net, x, y, loss="huber", huber_delta=np.float32(0.5))
    net.zero_grad()
    nn.functional.huber_loss(net(x), y, delta=0.5).backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(result.gradients[k], p.grad, rtol=1e-5, atol=1e-6)
    job = {"model": net, "inputs": x, "targets": y}
    assert len(client.compute_many([job, job], max_in_flight=np.int64(2))) == 2
    assert client.compute_sharded(net, x, y, shards=np.int64(1)).loss.shape == ()
