"""Splitting one ensemble across several servers and merging the results.

Models are independent, so the M models of a job can be cut into contiguous slices, sent
to different servers at once, and their results concatenated back along the model axis:
the same numbers as one server computing all of them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from gradserve.client._job import (
    ComputeResult,
    JobOptions,
    WireJob,
    build_job,
    check_options,
    result_from_tensors,
    whole_number,
)
from gradserve.client._models import Ensemble, as_array, normalize
from gradserve.client._tensors import is_torch
from gradserve.v1.shapes import is_per_model


def sharded_jobs(model, inputs, targets, sample_weights, shards: int,
                 options: dict) -> tuple[Ensemble, list[WireJob]]:  # fmt: skip
    """One job per contiguous slice of the ensemble's models (at most `shards`), and the
    ensemble, for merge_results."""
    ensemble = normalize(model)
    opts = JobOptions(**options)
    check_options(opts)  # before the options are sliced by shard
    bounds = shard_bounds(ensemble.params["layers.0.weight"].shape[0], shards)
    jobs = [build_job(*slice_job(ensemble, inputs, targets, sample_weights, opts.loss, a, b),
                      shard_options(opts, i, a, b))
            for i, (a, b) in enumerate(bounds)]  # fmt: skip
    return ensemble, jobs


def shard_count(shards: int | None, addresses: int) -> int:
    """compute_sharded's `shards`: one per address unless given, and then at least 1."""
    if shards is None:
        return addresses
    if not whole_number(shards) or shards < 1:
        raise ValueError(f"shards must be a whole number >= 1 (or None), got {shards!r}")
    return shards


def shard_bounds(num_models: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [begin, end) model ranges of near-equal size, none empty."""
    shards = max(1, min(shards, num_models))
    edges = np.linspace(0, num_models, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def slice_job(ensemble: Ensemble, inputs, targets, sample_weights, loss: str,
              begin: int, end: int):  # fmt: skip
    """The models [begin, end) of a job: their parameters, and their rows of any per-model
    inputs, targets and sample weights (shared ones are sent whole)."""
    inputs, targets = as_array(inputs, "inputs"), as_array(targets, "targets")
    sample_weights = None if sample_weights is None else as_array(sample_weights, "sample_weights")
    part = replace(
        ensemble, params={k: v[begin:end] for k, v in ensemble.params.items()}, form="dict"
    )

    def models(name: str, value):
        per_model = value is not None and is_per_model(name, value.shape, loss == "cross_entropy")
        return value[begin:end] if per_model else value

    return (
        part,
        models("inputs", inputs),
        models("targets", targets),
        models("sample_weights", sample_weights),
    )


def shard_options(opts, index: int, begin: int, end: int):
    """A shard's job options: its models' slice of any incoming optimiser state, and its
    own DP noise seed (seed + shard index: the shards' noise is independent, not that of an
    unsharded job, whose noise is drawn for all M models at once)."""
    for callback in ("on_step", "on_progress"):
        if getattr(opts, callback) is not None:
            raise ValueError(f"{callback} is not supported by compute_sharded; use compute")
    changes = {}
    if opts.optimizer_state:
        changes["optimizer_state"] = {
            k: as_array(v, k)[begin:end] for k, v in opts.optimizer_state.items()
        }
    if opts.noise_seed is not None:
        changes["noise_seed"] = (opts.noise_seed + index) % 2**64
    return replace(opts, **changes)


def _concat(values: list, axis: int):
    if is_torch(values[0]):
        import torch

        return torch.cat(values, dim=axis)
    return np.concatenate(values, axis=axis)


def merge_results(ensemble: Ensemble, parts: list[ComputeResult]) -> ComputeResult:
    """Concatenate per-shard results along the model axis, in the caller's form."""
    tensors = {
        name: _concat([p.tensors[name] for p in parts], 1 if name == "losses" else 0)
        for name in parts[0].tensors
    }  # losses are [steps, M]
    summary = {
        key: sum(p.summary[key] for p in parts) for key in ("flops", "bytes_received", "bytes_sent")
    }
    for key in ("upload_seconds", "queue_seconds", "compute_seconds", "download_seconds"):
        summary[key] = max(p.summary[key] for p in parts)  # the shards ran side by side
    summary["shards"] = len(parts)
    return result_from_tensors(
        ensemble,
        tensors,
        wire_dtypes=parts[0].wire_dtypes,
        job_id=",".join(p.job_id for p in parts),
        engine=",".join(sorted({p.engine for p in parts})),
        device=",".join(sorted({p.device for p in parts})),
        summary=summary,
    )
