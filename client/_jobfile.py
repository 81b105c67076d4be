"""Job files for the CLI: tensors plus a JSON job description, in safetensors or npz.

safetensors: the JSON lies in the header metadata under "gradserve.job".
npz: the JSON is a 0-d string array named "gradserve.job" (loaded with allow_pickle=False).
Tensor names are the wire names: layers.{i}.weight, layers.{i}.bias, inputs, targets,
sample_weights. Results files are alike, with the job's summary under "gradserve.summary".
"""

from __future__ import annotations

import json
import math
import zipfile
from typing import Any

import numpy as np

from gradserve.client import _safetensors

JOB_KEY = "gradserve.job"
SUMMARY_KEY = "gradserve.summary"


def strict_json(value: Any) -> str:
    """JSON that every parser reads: a NaN or infinite number (the loss of a job that
    allows non-finite inputs) becomes null, as JavaScript writes it, where Python's json
    would write the bare NaN / Infinity that strict parsers (jq, browsers) refuse."""

    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), allow_nan=False)


def save_job(path: str, tensors: dict[str, np.ndarray], job: dict[str, Any]) -> None:
    if path.endswith(".npz"):
        np.savez(path, **tensors, **{JOB_KEY: np.array(json.dumps(job))})
    else:
        _safetensors.save(tensors, path, {JOB_KEY: json.dumps(job)})


def load_job(path: str, key: str = JOB_KEY) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, job description); ValueError (or OSError) for a file that is none. With
    `key` SUMMARY_KEY it reads a results file: (tensors, summary)."""
    if path.endswith(".npz"):
        # np.load tries anything that is not a zip archive as a pickle (refused, with a
        # message about pickles); say what is wrong instead.
        if not zipfile.is_zipfile(path):
            open(path, "rb").close()  # a missing file: the OSError that names it
            raise ValueError(f"{path}: not an npz file (no zip archive)")
        try:
            with np.load(path, allow_pickle=False) as f:
                tensors = {k: _npz_array(path, f, k) for k in f.files}
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: not an npz file ({e})") from None
        job = str(tensors.pop(key)) if key in tensors else "{}"
        for name, a in tensors.items():
            if a.dtype.kind not in "fiub":
                raise ValueError(f"{path}: array {name!r} has dtype {a.dtype}; "
                                 "job files hold real numbers")  # fmt: skip
    else:
        tensors, metadata = _safetensors.load(path)
        job = metadata.get(key, "{}")
    return tensors, _job_object(path, job, key)


def _npz_array(path: str, npz, name: str) -> np.ndarray:
    try:
        return npz[name]
    except ValueError:  # numpy's "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{path}: array {name!r} holds Python objects; "
                         "job files hold real numbers") from None  # fmt: skip


def _job_object(path: str, text: str, key: str) -> dict[str, Any]:
    what = "job description" if key == JOB_KEY else "summary"
    try:
        job = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {what} ({key}) is no JSON: {e}") from None
    if not isinstance(job, dict):
        raise ValueError(f"{path}: the {what} ({key}) is no JSON object")
    return job


def save_results(
    path: str, tensors: dict[str, np.ndarray], summary: dict[str, Any], bfloat16=()
) -> None:
    """safetensors, or npz for a path ending in .npz; the summary as JSON beside the tensors
    (safetensors metadata, or a string array), as in job files. `bfloat16`: names of
    tensors that came as bfloat16 (widened to float32 in numpy), stored as bfloat16 in
    safetensors; npz, which has no such dtype, keeps them float32."""
    if path.endswith(".npz"):
        np.savez(path, **tensors, **{SUMMARY_KEY: np.array(strict_json(summary))})
    else:
        _safetensors.save(tensors, path, {SUMMARY_KEY: strict_json(summary)}, bfloat16)
