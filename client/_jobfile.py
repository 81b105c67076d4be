"""Job files for the CLI: tensors plus a JSON job description, in safetensors or npz.

safetensors: the JSON lies in the header metadata under "gradserve.job".
npz: the JSON is a 0-d string array named "gradserve.job" (loaded with allow_pickle=False).
Tensor names are the wire names: layers.{i}.weight, layers.{i}.bias, inputs, targets,
sample_weights.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gradserve.client import _safetensors

JOB_KEY = "gradserve.job"


def save_job(path: str, tensors: dict[str, np.ndarray], job: dict[str, Any]) -> None:
    if path.endswith(".npz"):
        np.savez(path, **tensors, **{JOB_KEY: np.array(json.dumps(job))})
    else:
        _safetensors.save(tensors, path, {JOB_KEY: json.dumps(job)})


def load_job(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            tensors = {k: f[k] for k in f.files}
        job = json.loads(str(tensors.pop(JOB_KEY))) if JOB_KEY in tensors else {}
    else:
        tensors, metadata = _safetensors.load(path)
        job = json.loads(metadata.get(JOB_KEY, "{}"))
    return tensors, job


def save_results(path: str, tensors: dict[str, np.ndarray], summary: dict[str, Any]) -> None:
    _safetensors.save(tensors, path, {"gradserve.summary": json.dumps(summary)})
