"""Optimiser steps on the server: K full-batch steps of SGD, Adam or AdamW on every model of
an ensemble, each step one engine run (forward, loss, backward) and one elementwise update
of the stacked [M, ...] parameters. Models are independent and the updates elementwise, so
this equals running torch.optim on each model by itself.

The update rules follow torch.optim's single-tensor implementations step for step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from gradserve.kernels.spec import (
    EnsembleJob,
    EnsembleResult,
    Optimizer,
    OutputRequest,
    Privacy,
    compute_dtype,
)


def parameter_names(num_layers: int) -> list[str]:
    return [f"layers.{i}.weight" for i in range(num_layers)] + [
        f"layers.{i}.bias" for i in range(num_layers)
    ]


def _sgd(opt: Optimizer, p, g, state: dict) -> None:
    if opt.weight_decay:
        g = g.add(p, alpha=opt.weight_decay)
    if opt.momentum:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = g.clone()
        else:
            buf.mul_(opt.momentum).add_(g, alpha=1 - opt.dampening)
        g = g.add(buf, alpha=opt.momentum) if opt.nesterov else buf
    p.add_(g, alpha=-opt.learning_rate)


def _adam(opt: Optimizer, p, g, state: dict, step: int) -> None:
    if opt.kind == "adamw":
        p.mul_(1 - opt.learning_rate * opt.weight_decay)
    elif opt.weight_decay:
        g = g.add(p, alpha=opt.weight_decay)
    exp_avg = state.setdefault("exp_avg", torch.zeros_like(p))
    exp_avg_sq = state.setdefault("exp_avg_sq", torch.zeros_like(p))
    exp_avg.lerp_(g, 1 - opt.beta1)
    exp_avg_sq.mul_(opt.beta2).addcmul_(g, g, value=1 - opt.beta2)
    correction1 = 1 - opt.beta1**step
    correction2 = 1 - opt.beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(correction2)).add_(opt.eps)
    p.addcdiv_(exp_avg, denom, value=-opt.learning_rate / correction1)


class Steps:
    """An ensemble's parameters and optimiser state as its optimiser's steps update them,
    in the job's dtype on the device; take() applies one step's gradients."""

    def __init__(self, opt: Optimizer, num_layers: int, weights, biases, state: dict, dtype,
                 device):  # fmt: skip
        self.opt = opt
        self.weights = [w.to(device, dtype).clone() for w in weights]
        self.biases = [b.to(device, dtype).clone() for b in biases]
        self.names = parameter_names(num_layers)
        self.params = dict(zip(self.names, self.weights + self.biases, strict=True))
        self.state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.names}
        for key, t in state.items():
            name, kind = key.rsplit(".", 1)
            self.state[name][kind] = t.to(device, dtype).clone()
        self.dtype, self.device = dtype, device
        self.losses = torch.empty(opt.steps, len(self.weights[0]), dtype=dtype, device=device)

    def take(self, k: int, result: EnsembleResult) -> None:
        """Step k (from 0) of this job: record its loss, update by its gradients."""
        self.losses[k] = result.loss
        grads = dict(zip(self.names, result.weight_grads + result.bias_grads, strict=True))
        with torch.no_grad():
            for name in self.names:
                g = grads[name].to(self.device, self.dtype)
                if self.opt.kind == "sgd":
                    _sgd(self.opt, self.params[name], g, self.state[name])
                else:
                    _adam(self.opt, self.params[name], g, self.state[name],
                          self.opt.start_step + k + 1)  # fmt: skip

    def result(self) -> EnsembleResult:
        out = EnsembleResult(
            loss=self.losses[-1],
            losses=self.losses,
            weights=self.weights,
            biases=self.biases,
            device=str(self.device),
        )
        if self.opt.return_state:
            out.optimizer_state = {
                f"{name}.{kind}": self.state[name][kind]
                for name in self.names
                for kind in self.opt.state_names
            }
        return out


def step_privacy(privacy: Privacy | None, k: int) -> Privacy | None:
    """DP-SGD's options for step k (from 0): fresh noise at every step, from the seed + k."""
    if privacy is None:
        return None
    return dataclasses.replace(privacy, noise_seed=(privacy.noise_seed + k) % 2**64)


def train(job: EnsembleJob, run_step: Callable[[EnsembleJob], EnsembleResult], device):
    """Run job.optimizer's steps; `run_step` computes one step's loss and gradients."""
    opt = job.optimizer
    dtype = compute_dtype(job.precision)
    steps = Steps(opt, job.mlp.num_layers, job.weights, job.biases, job.optimizer_state, dtype,
                  device)  # fmt: skip
    for k in range(opt.steps):
        step_job = dataclasses.replace(
            job,
            weights=steps.weights,
            biases=steps.biases,
            outputs=OutputRequest(),
            privacy=step_privacy(job.privacy, k),
            optimizer=None,
            optimizer_state={},
            on_step=None,
        )
        result = run_step(step_job)
        if job.on_step is not None:
            job.on_step(k, result.loss)
        steps.take(k, result)
    return steps.result()
