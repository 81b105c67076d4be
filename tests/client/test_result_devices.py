"""Torch results come back on the device of the caller's model, as torch gives them."""

import pytest
import torch
from torch import nn

from gradserve.client._tensors import accelerator_of


def test_the_first_torch_tensor_names_the_device():
    cpu, meta = torch.zeros(2), torch.empty(2, device="meta")
    assert accelerator_of(cpu, meta) is None  # the model's parameters come first
    assert accelerator_of([1.0], meta, cpu) == torch.device("meta")
    assert accelerator_of(None, [[1.0]]) is None


def test_cpu_models_get_cpu_results(client):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(9, 4, requires_grad=True)
    result = client.compute(net, x, torch.randn(9, 2), input_gradients=True)
    assert result.loss.device.type == "cpu" and result.input_gradients.device.type == "cpu"


@pytest.mark.gpu
def test_cuda_models_get_their_results_on_their_device(client):
    """Gradients, loss and input gradients on the model's CUDA device, the same values as
    for the same model on the CPU; optimiser steps' losses and parameters too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(9, 4), torch.randn(9, 2)
    on_cpu = client.compute(net, x, y, input_gradients=True)
    device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = client.compute(net.to(device), x.to(device), y.to(device), input_gradients=True)
    for name, grad in on_gpu.gradients.items():
        assert grad.device == device, name
        assert torch.equal(grad.cpu(), on_cpu.gradients[name]), name
    assert on_gpu.loss.device == device and on_gpu.input_gradients.device == device
    steps = []
    trained = client.compute(
        net, x.to(device), y.to(device), optimizer="sgd", steps=2, learning_rate=0.1,
        on_step=lambda k, loss: steps.append(loss),
    )  # fmt: skip
    assert all(loss.device == device for loss in steps)
    assert all(p.device == device for p in trained.parameters.values())
