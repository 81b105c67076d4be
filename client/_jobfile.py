"""Job files for the CLI: tensors plus a JSON job description, in safetensors or npz.

safetensors: the JSON lies in the header metadata under "gradserve.job".
npz: the JSON is a 0-d string array named "gradserve.job" (loaded with allow_pickle=False).
Tensor names are the wire names: layers.{i}.weight, layers.{i}.bias, inputs, targets,
sample_weights. Results files are alike, with the job's summary under "gradserve.summary".
Both formats are memory-mapped where their bytes are stored as they are (not compressed):
the tensors are read-only views, read from disk as they are used.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import zipfile
from typing import Any

import numpy as np

from gradserve.client import _safetensors
from gradserve.client._files import replacing

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
        with replacing(path) as f:
            np.savez(f, **tensors, **{JOB_KEY: np.array(json.dumps(job))})
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
            tensors = _npz_tensors(path)
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


def _npz_tensors(path: str) -> dict[str, np.ndarray]:
    """An npz archive's arrays: those stored uncompressed (np.savez's, the CLI's) as
    read-only views of the memory-mapped file, read from disk as they are used (a streamed
    job's samples as they are sent), as safetensors files are; compressed ones
    (np.savez_compressed's) read whole."""
    with open(path, "rb") as f, np.load(path, allow_pickle=False) as npz:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        members = {i.filename: i for i in npz.zip.infolist()}
        tensors = {}
        for name in npz.files:
            info = members.get(f"{name}.npy")
            array = None if info is None else _mapped_member(f, mapped, info)
            tensors[name] = array if array is not None else _npz_array(path, npz, name)
        return tensors


def _mapped_member(f, mapped: mmap.mmap, info: zipfile.ZipInfo) -> np.ndarray | None:
    """An .npy member stored as it is (no compression, no encryption) as a view of the
    mapped archive, or None where it must be read through numpy."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
        return None
    f.seek(info.header_offset)
    local = f.read(30)  # the member's local header: its data follows its name and extra field
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_length + extra_length)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)  # fmt: skip
        if read_header is None:
            return None
        shape, fortran_order, dtype = read_header(f)
    except ValueError:
        return None  # numpy's own reading says what is wrong
    if dtype.hasobject or (count := math.prod(shape)) == 0:
        return None
    offset = f.tell()
    if offset + count * dtype.itemsize > len(mapped):
        return None
    array = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


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
        with replacing(path) as f:
            np.savez(f, **tensors, **{SUMMARY_KEY: np.array(strict_json(summary))})
    else:
        _safetensors.save(tensors, path, {SUMMARY_KEY: strict_json(summary)}, bfloat16)
