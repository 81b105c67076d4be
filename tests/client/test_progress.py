"""Transfer progress: compute(on_progress=...) through a real server, the CLI's bar, and the
bar's drawing alone (with a fake clock)."""

import asyncio
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from gradserve.client import AsyncGradientClient, GradientClient
from gradserve.client._progress import ProgressBar

M, N, SIZES = 4, 3000, [40, 24, 3]  # about 2 MiB of tensors, results about 16 KiB
CHUNK = 256 << 10


def job():
    rng = np.random.default_rng(0)
    params = {}
    for i, (d_in, d_out) in enumerate(zip(SIZES, SIZES[1:], strict=False)):
        params[f"layers.{i}.weight"] = rng.standard_normal((M, d_out, d_in), dtype=np.float32)
        params[f"layers.{i}.bias"] = rng.standard_normal((M, d_out), dtype=np.float32)
    inputs = rng.standard_normal((M, N, SIZES[0]), dtype=np.float32)
    targets = rng.standard_normal((M, N, SIZES[-1]), dtype=np.float32)
    sent = sum(a.nbytes for a in params.values()) + inputs.nbytes + targets.nbytes
    return params, inputs, targets, sent


def check_reports(reports, result, sent):
    by_phase = {p: [(d, t) for q, d, t in reports if q == p] for p in ("upload", "download")}
    up, down = by_phase["upload"], by_phase["download"]
    assert len(up) >= sent // CHUNK  # one report per message at least
    assert up[-1] == (sent, sent) and {t for _, t in up} == {sent}
    assert [d for d, _ in up] == sorted(d for d, _ in up)
    received = sum(np.asarray(v).nbytes for v in result.tensors.values())
    assert down[-1] == (received, received) and {t for _, t in down} == {received}
    assert [d for d, _ in down] == sorted(d for d, _ in down)


def test_progress_counts_every_tensor_byte_up_and_down(server):
    params, inputs, targets, sent = job()
    reports = []
    with GradientClient(server.address, chunk_bytes=CHUNK) as client:
        result = client.compute(
            params, inputs, targets, on_progress=lambda *r: reports.append(r), forward_outputs=True
        )
    check_reports(reports, result, sent)


def test_async_client_reports_progress_alike(server):
    params, inputs, targets, sent = job()
    reports = []

    async def run():
        async with AsyncGradientClient(server.address, chunk_bytes=CHUNK) as client:
            return await client.compute(
                params, inputs, targets, on_progress=lambda *r: reports.append(r)
            )

    check_reports(reports, asyncio.run(run()), sent)


def test_a_streamed_jobs_rows_coming_during_its_upload_keep_the_phases_apart(server):
    """Per-sample outputs of a streamed job come back while its upload goes on: the reports
    stay one phase after the other, the download's from the first result after the
    upload's end."""
    params, inputs, targets, _ = job()
    n = 300_000  # 48 MB of shared inputs up, 192 MB of their gradients down: past the windows
    inputs = np.random.default_rng(1).standard_normal((n, SIZES[0]), dtype=np.float32)
    targets = np.resize(targets, (M, n, SIZES[-1]))
    reports = []
    with GradientClient(server.address, chunk_bytes=CHUNK) as client:
        result = client.compute(params, inputs, targets, on_progress=lambda *r: reports.append(r),
                                input_gradients=True, micro_batch_samples=20_000)  # fmt: skip
    phases = [p for p, _, _ in reports]
    assert phases == sorted(phases, key=("upload", "download").index), phases
    received = sum(np.asarray(v).nbytes for v in result.tensors.values())
    assert reports[-1] == ("download", received, received)


def test_compute_sharded_refuses_a_progress_callback(server):
    params, inputs, targets, _ = job()
    with GradientClient([server.address, server.address]) as client:
        with pytest.raises(ValueError, match="on_progress"):
            client.compute_sharded(params, inputs, targets, on_progress=print)


def test_cli_progress_flag_draws_both_phases_on_stderr_and_keeps_json_clean(server, tmp_path):
    from gradserve.client._jobfile import save_job

    params, inputs, targets, _ = job()
    path = tmp_path / "job.safetensors"
    save_job(str(path), {**params, "inputs": inputs[0], "targets": targets[0]}, {})
    out = subprocess.run(
        [sys.executable, "-m", "gradserve.client", "--address", server.address, "compute",
         str(path), "--json", "--progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["engine"] == "torch"
    lines = out.stderr.splitlines()
    assert any(line.startswith("upload") and "100.0%" in line for line in lines), lines
    assert any(line.startswith("download") and "100.0%" in line for line in lines), lines


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_into_a_file_writes_a_line_a_second_and_always_the_last():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressBar(out, clock=clock)
    for step in range(1, 31):  # 30 reports over 3 seconds
        clock.now = step * 0.1
        bar("upload", step << 20, 30 << 20)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # at 0.1 s (the first), 1.1 s, 2.1 s, and the finished one
    assert lines[-1].startswith("upload   [" + "#" * 30 + "] 100.0%  30.0/30.0 MiB")
    assert lines[-1].endswith("   10.0 MiB/s")  # 29 MiB in the 2.9 s since the first report


def test_bar_on_a_terminal_redraws_in_place_and_ends_each_phase_with_a_newline():
    clock, out = FakeClock(), Terminal()
    bar = ProgressBar(out, clock=clock)
    for phase in ("upload", "download"):
        for done in (1, 2, 4):
            clock.now += 0.5
            bar(phase, done << 20, 4 << 20)
    text = out.getvalue()
    assert text.count("\n") == 2 and text.count("\r") == 6
    upload, download, rest = text.split("\n")
    assert upload.startswith("\rupload") and "\rdownload" in download and rest == ""
    assert upload.endswith("] 100.0%  4.0/4.0 MiB      3.0 MiB/s") and "\rupload" in upload[1:]


def test_bar_stays_silent_for_transfers_under_its_threshold():
    out = io.StringIO()
    bar = ProgressBar(out, min_bytes=16 << 20, clock=FakeClock())
    bar("upload", 1 << 20, 1 << 20)
    bar("download", 0, 15 << 20)
    assert out.getvalue() == ""


class CallbackFailed(Exception):
    pass


def failing_in(phase):
    def on_progress(reported, done, total):
        if reported == phase:
            raise CallbackFailed(phase)

    return on_progress


@pytest.mark.parametrize("phase", ["upload", "download"])
def test_a_failing_progress_callback_reaches_the_caller_as_itself(server, phase):
    """In the upload, gRPC calls the callback while taking request messages and would answer
    UNKNOWN "Exception iterating requests!" (asyncio: a bare CancelledError) in its place."""
    params, inputs, targets, _ = job()
    with GradientClient(server.address, chunk_bytes=CHUNK) as client:
        with pytest.raises(CallbackFailed, match=phase):
            client.compute(params, inputs, targets, on_progress=failing_in(phase))

    async def run():
        async with AsyncGradientClient(server.address, chunk_bytes=CHUNK) as client:
            with pytest.raises(CallbackFailed, match=phase):
                await client.compute(params, inputs, targets, on_progress=failing_in(phase))
            return await client.compute(params, inputs, targets)  # the client still works

    assert asyncio.run(run()).loss.shape == (M,)
