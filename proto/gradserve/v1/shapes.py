"""Shape rules of the wire that client and server both apply."""

from __future__ import annotations

SAMPLE_TENSORS = ("inputs", "targets", "sample_weights")
# Results with a row per sample ([M, N, ...]): a streamed job's are sent micro-batch by
# micro-batch, each model's rows a run of their own, before the other results.
PER_SAMPLE_RESULTS = ("per_sample_loss", "per_sample_grad_norm", "outputs", "inputs.grad")


def shared_dims(name: str, cross_entropy: bool) -> int:
    """Dimensions of a sample tensor shared by all models: inputs [N, d0], targets [N, dL]
    (cross-entropy class indices [N]), sample_weights [N]."""
    return {"inputs": 2, "targets": 1 if cross_entropy else 2, "sample_weights": 1}[name]


def is_per_model(name: str, shape, cross_entropy: bool) -> bool:
    """Whether a sample tensor of this shape is given per model ([M, N, ...]) rather than
    shared by all models ([N, ...]): one dimension more."""
    return len(shape) == shared_dims(name, cross_entropy) + 1
