"""Sample jobs written by `gradserve-client example`."""

from __future__ import annotations

import numpy as np


def notebook_network() -> tuple[dict[str, np.ndarray], dict]:
    """The textbook 2-input, 2-hidden, 1-output sigmoid network, trained on XOR with MSE."""
    tensors = {
        "layers.0.weight": np.array([[[0.15, 0.20], [0.25, 0.30]]], dtype=np.float32),
        "layers.0.bias": np.array([[0.35, 0.35]], dtype=np.float32),
        "layers.1.weight": np.array([[[0.40, 0.45]]], dtype=np.float32),
        "layers.1.bias": np.array([[0.60]], dtype=np.float32),
        "inputs": np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32),
        "targets": np.array([[0], [1], [1], [0]], dtype=np.float32),
    }
    job = {
        "layer_sizes": [2, 2, 1],
        "hidden_activation": "sigmoid",
        "output_activation": "sigmoid",
        "loss": "mse",
    }
    return tensors, job


def ensemble_network(m: int = 64, n: int = 128, seed: int = 0) -> tuple[dict, dict]:
    """An ensemble of m [16, 32, 32, 1] tanh networks fitting sin of a sum, shared inputs."""
    rng = np.random.default_rng(seed)
    sizes = [16, 32, 32, 1]
    tensors: dict[str, np.ndarray] = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = 1 / np.sqrt(a)
        tensors[f"layers.{i}.weight"] = rng.uniform(-bound, bound, (m, b, a)).astype(np.float32)
        tensors[f"layers.{i}.bias"] = rng.uniform(-bound, bound, (m, b)).astype(np.float32)
    x = rng.standard_normal((n, sizes[0])).astype(np.float32)
    tensors["inputs"] = x
    tensors["targets"] = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
    job = {"layer_sizes": sizes, "hidden_activation": "tanh", "loss": "mse"}
    return tensors, job
