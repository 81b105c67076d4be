"""The gradserve-client CLI against a real server, run as a real subprocess."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from gradserve.client import _safetensors
from tests.oracle import assert_close_per_model, oracle
from tests.process_memory import memory_bytes


def cli(*args, check=True):
    out = subprocess.run(
        [sys.executable, "-m", "gradserve.client", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_example_jobs_compute_the_oracle_gradients(server, tmp_path, fmt):
    cli("example", str(tmp_path), "--format", fmt)
    from gradserve.client._jobfile import load_job

    for name, hidden, output in [
        ("notebook-2-2-1", "sigmoid", "sigmoid"),
        ("ensemble-64x16-32-32-1", "tanh", "identity"),
    ]:
        job_path = tmp_path / f"{name}.{fmt}"
        out_path = tmp_path / f"{name}.out.safetensors"
        printed = cli(
            "--address", server.address, "compute", str(job_path), str(out_path), "--json"
        )
        summary = json.loads(printed.stdout)
        assert summary["engine"] == "torch"
        results = safetensors.numpy.load_file(str(out_path))  # the reference reader
        tensors, job = load_job(str(job_path))
        t = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
        ref = oracle(job["layer_sizes"], t, t["inputs"], t["targets"], hidden=hidden, output=output)
        # The float32 norm (worst model here: 3.7e-6). This test caught a fault: the first
        # tanh of a fresh process, split across torch's threads, sometimes came back with
        # one thread's share of the models ~800x less accurate (torch_engine._prime_cpu_math).
        tol = 1e-5
        assert_close_per_model("loss", results["loss"], ref.loss, "float32", tol)
        for k, g in ref.grads.items():
            assert_close_per_model(k, results[k], g, "float32", tol)


def test_cli_flags_override_the_job_file(server, tmp_path):
    cli("example", str(tmp_path))
    job = tmp_path / "notebook-2-2-1.safetensors"
    out = cli(
        "--address",
        server.address,
        "compute",
        str(job),
        "--json",
        "--loss",
        "l1",
        "--per-sample-losses",
        "--precision",
        "float64",
    )
    summary = json.loads(out.stdout)
    base = json.loads(cli("--address", server.address, "compute", str(job), "--json").stdout)
    assert summary["loss"] != base["loss"]


def test_streamed_per_sample_outputs_are_printed_and_written(server, tmp_path):
    """Every result tensor gets a line of the text output (the per-sample ones had none),
    and a streamed job's per-sample results are the one-shot job's."""
    cli("example", str(tmp_path))
    job = str(tmp_path / "ensemble-64x16-32-32-1.safetensors")
    flags = ("--per-sample-losses", "--forward-outputs", "--per-sample-gradient-norms")
    written = {}
    for name, more in (("whole", ()), ("streamed", ("--micro-batch-samples", "50"))):
        out = str(tmp_path / f"{name}.safetensors")
        printed = cli("--address", server.address, "compute", job, out, *flags, *more).stdout
        for tensor in ("per_sample_loss", "outputs", "per_sample_grad_norm", "layers.0.bias.grad"):
            assert f"  {tensor} " in printed, (tensor, printed)
        written[name] = safetensors.numpy.load_file(out)
    for tensor in ("per_sample_loss", "outputs", "per_sample_grad_norm"):
        np.testing.assert_allclose(written["streamed"][tensor], written["whole"][tensor],
                                   rtol=1e-5, atol=1e-7)  # fmt: skip


def test_dp_flags_clip_and_seed_the_noise(server, tmp_path):
    cli("example", str(tmp_path))
    job = str(tmp_path / "ensemble-64x16-32-32-1.safetensors")
    base = ("--address", server.address, "compute", job)
    dp = ("--clip-norm", "0.05", "--noise-multiplier", "0.8", "--noise-seed", "11")
    runs = {}
    for name, flags in [("plain", ()), ("clipped", dp[:2]), ("a", dp), ("b", dp)]:
        cli(*base, str(tmp_path / f"{name}.safetensors"), *flags)
        runs[name] = safetensors.numpy.load_file(str(tmp_path / f"{name}.safetensors"))
    for k in runs["plain"]:
        if k == "loss":
            continue
        assert not np.array_equal(runs["plain"][k], runs["clipped"][k])
        assert not np.array_equal(runs["clipped"][k], runs["a"][k])
        assert np.array_equal(runs["a"][k], runs["b"][k])
    refused = cli(*base, "--noise-multiplier", "1", check=False)
    assert refused.returncode == 2 and "clip_norm" in refused.stderr


def test_training_flags_print_each_step_and_write_parameters(server, tmp_path):
    cli("example", str(tmp_path))
    job = str(tmp_path / "ensemble-64x16-32-32-1.safetensors")
    out = str(tmp_path / "trained.safetensors")
    printed = cli(
        "--address", server.address, "compute", job, out, "--optimizer", "adam",
        "--steps", "4", "--learning-rate", "0.01", "--return-optimizer-state",
    ).stdout  # fmt: skip
    assert [line.split(":")[0] for line in printed.splitlines()[:4]] == [
        f"step {k}" for k in range(4)
    ]
    results = safetensors.numpy.load_file(out)
    assert results["losses"].shape == (4, 64)
    assert results["layers.0.weight"].shape == (64, 32, 16)
    assert results["layers.2.bias.exp_avg_sq"].shape == (64, 1)
    assert (results["losses"][-1] < results["losses"][0]).mean() > 0.9  # it trains


# Adam options of the training runs that continue one another.
TRAIN = ["--optimizer", "adam", "--learning-rate", "0.01", "--return-optimizer-state"]


def example_job_on(server, tmp_path) -> tuple[str, list[str]]:
    """The sample ensemble's job file, and the CLI words that compute it on `server`."""
    cli("example", str(tmp_path))
    job = str(tmp_path / "ensemble-64x16-32-32-1.safetensors")
    return job, ["--address", server.address, "compute", job]


def test_streamed_training_takes_a_step_a_run_continued_by_parameters_from(server, tmp_path):
    """Two streamed runs (--micro-batch-samples), the second from the first's results, are
    the two steps of one job: equal up to float32 sums in another grouping."""
    _, adam = example_job_on(server, tmp_path)
    first, second, whole = (str(tmp_path / f"{n}.safetensors") for n in ("a", "b", "whole"))
    streamed = ["--micro-batch-samples", "50"]
    cli(*adam, first, *TRAIN, *streamed)
    printed = cli(*adam, second, *TRAIN, *streamed, "--parameters-from", first).stdout
    assert printed.splitlines()[0].startswith("step 1:")
    cli(*adam, whole, *TRAIN, "--steps", "2")
    continued, straight = safetensors.numpy.load_file(second), safetensors.numpy.load_file(whole)
    assert set(continued) == set(straight)
    np.testing.assert_allclose(continued["losses"][0], straight["losses"][1], rtol=1e-5)
    for name, want in straight.items():  # parameters and Adam's state, by relative L2 error
        if name != "losses":
            error = np.linalg.norm(continued[name] - want) / np.linalg.norm(want)
            assert error < 1e-5, (name, error)
    assert results_summary(second)["trained_steps"] == 2


def test_parameters_from_continues_training_where_it_ended(server, tmp_path):
    job, adam = example_job_on(server, tmp_path)
    first, second, whole = (str(tmp_path / f"{n}.safetensors") for n in ("a", "b", "whole"))
    cli(*adam, first, *TRAIN, "--steps", "3")
    printed = cli(*adam, second, *TRAIN, "--steps", "2", "--parameters-from", first).stdout
    assert [line.split(":")[0] for line in printed.splitlines()[:2]] == ["step 3", "step 4"]
    cli(*adam, whole, *TRAIN, "--steps", "5")
    continued, straight = safetensors.numpy.load_file(second), safetensors.numpy.load_file(whole)
    assert set(continued) == set(straight)
    for name in straight:  # 3 + 2 steps are the 5 steps, Adam's bias correction included
        expected = straight[name][3:] if name == "losses" else straight[name]
        assert np.array_equal(continued[name], expected), name
    summaries = [results_summary(p) for p in (first, second, whole)]
    assert [s["trained_steps"] for s in summaries] == [3, 5, 5]

    # Without an optimiser, the trained parameters' loss and gradients: those of a job file
    # that holds them.
    from gradserve.client._job import is_parameter
    from gradserve.client._jobfile import load_job, save_job

    trained = dict(safetensors.numpy.load_file(job))
    trained.update({k: v for k, v in continued.items() if is_parameter(k)})

    save_job(str(tmp_path / "trained.safetensors"), trained, load_job(job)[1])
    grads = [str(tmp_path / f"g{i}.npz") for i in range(2)]
    cli(*adam, grads[0], "--parameters-from", second)
    cli("--address", server.address, "compute", str(tmp_path / "trained.safetensors"), grads[1])
    a, b = (dict(np.load(g)) for g in grads)
    for name in a:
        if name != "gradserve.summary":
            assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_a_run_continued_into_the_results_file_it_continues_from(server, tmp_path, fmt):
    """--parameters-from and the results path the same file: the job file's tensors are
    views of the mapped file, and the results go beside it, then over it."""
    from gradserve.client._jobfile import SUMMARY_KEY, load_job

    _, adam = example_job_on(server, tmp_path)
    first, second, run = (str(tmp_path / f"{n}.{fmt}") for n in ("a", "b", "run"))
    cli(*adam, first, *TRAIN, "--steps", "3")
    cli(*adam, second, *TRAIN, "--steps", "2", "--parameters-from", first)
    shutil.copyfile(first, run)
    cli(*adam, run, *TRAIN, "--steps", "2", "--parameters-from", run)
    (continued, summary), (expected, _) = load_job(run, SUMMARY_KEY), load_job(second, SUMMARY_KEY)
    assert set(continued) == set(expected)
    for name in expected:
        assert np.array_equal(continued[name], expected[name]), name
    assert summary["trained_steps"] == 5
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_an_interrupted_save_leaves_the_old_file_whole(tmp_path):
    from gradserve.client._files import replacing

    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old results")
    with pytest.raises(KeyboardInterrupt), replacing(str(path)) as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt  # Ctrl-C while writing
    assert path.read_bytes() == b"old results" and os.listdir(tmp_path) == ["out.safetensors"]


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_a_job_file_streams_from_disk_through_bounded_client_memory(server, tmp_path, fmt):
    """A job file (safetensors, or npz as np.savez writes it) is mapped, not read: a
    streamed job of 240 MB of inputs goes out with the CLI's own (anonymous) memory growing
    far less than that, its samples read from the file as they are sent. The loss is that
    of every sample (float64 numpy)."""
    n, d = 600_000, 100
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, d), dtype=np.float32)
    y = rng.standard_normal((n, 1), dtype=np.float32)
    params = {
        "layers.0.weight": rng.standard_normal((1, 8, d), dtype=np.float32) / 10,
        "layers.0.bias": rng.standard_normal((1, 8), dtype=np.float32),
        "layers.1.weight": rng.standard_normal((1, 1, 8), dtype=np.float32) / 3,
        "layers.1.bias": rng.standard_normal((1, 1), dtype=np.float32),
    }
    from gradserve.client._jobfile import save_job

    job = str(tmp_path / f"big.{fmt}")
    save_job(job, {**params, "inputs": x, "targets": y}, {"layer_sizes": [d, 8, 1]})
    h = np.maximum(x.astype(np.float64) @ params["layers.0.weight"][0].T.astype(np.float64)
                   + params["layers.0.bias"][0], 0)  # fmt: skip
    out = h @ params["layers.1.weight"][0].T.astype(np.float64) + params["layers.1.bias"][0]
    expected_loss = np.mean((out - y) ** 2)
    del x, y, h, out
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradserve.client", "--address", server.address, "compute",
         job, "--micro-batch-samples", "50000", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, memory_bytes(proc.pid, "RssAnon"))
        except (OSError, KeyError):
            pass  # it has just ended
        time.sleep(0.01)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    np.testing.assert_allclose(summary["loss"], [expected_loss], rtol=1e-5)
    # Measured here: 29 MiB (the whole process), both formats; reading the file whole, as
    # the CLI did: 260 (safetensors).
    assert peak < n * d * 4 / 2, f"the CLI's anonymous memory peaked at {peak >> 20} MiB"


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_job_files_load_as_written_mapped_or_not(tmp_path, save):
    """np.savez's members (stored) are views of the mapped file, np.savez_compressed's read
    whole: either way every array as written, Fortran order, 0-d and empty ones too."""
    from gradserve.client._jobfile import load_job

    rng = np.random.default_rng(5)
    arrays = {
        "layers.0.weight": rng.standard_normal((2, 3, 5), dtype=np.float32),
        "inputs": np.asfortranarray(rng.standard_normal((7, 5))),
        "targets": rng.integers(0, 3, 7),
        "sample_weights": np.zeros((0,), np.float32),
        "layers.0.bias": np.float32(1.5) * np.ones((), np.float32),
    }
    path = str(tmp_path / "job.npz")
    save(path, **arrays, **{"gradserve.job": np.array(json.dumps({"loss": "cross_entropy"}))})
    tensors, job = load_job(path)
    assert job == {"loss": "cross_entropy"} and set(tensors) == set(arrays)
    for name, a in arrays.items():
        got = tensors[name]
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a), name
    mapped = not tensors["inputs"].flags.writeable  # a view of the read-only mapping
    assert mapped == (save is np.savez)


def test_a_reader_that_stops_early_ends_the_cli_quietly(server, tmp_path):
    """`gradserve-client compute ... | head -1`: exit as a shell command ended by SIGPIPE
    does, with no error message or traceback."""
    cli("example", str(tmp_path))
    job = str(tmp_path / "ensemble-64x16-32-32-1.safetensors")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradserve.client", "--address", server.address, "compute", job,
         "--optimizer", "sgd", "--learning-rate", "0.01", "--steps", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().startswith("step 0:")
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == ""


def results_summary(path: str) -> dict:
    with safetensors.safe_open(path, "np") as f:
        return json.loads(f.metadata()["gradserve.summary"])


def test_parameters_from_files_that_cannot_continue_are_refused(server, tmp_path):
    cli("example", str(tmp_path))
    job = str(tmp_path / "ensemble-64x16-32-32-1.safetensors")
    other = str(tmp_path / "notebook-2-2-1.safetensors")
    base = ["--address", server.address, "compute", job]
    adam = ["--optimizer", "adam", "--learning-rate", "0.01", "--steps", "2"]
    grads, trained = str(tmp_path / "grads.safetensors"), str(tmp_path / "t.safetensors")
    cli(*base, grads)
    cli(*base, trained, *adam, "--return-optimizer-state")

    refused = cli(*base, *adam, "--parameters-from", grads, check=False)
    assert refused.returncode == 2 and "holds no parameters" in refused.stderr
    refused = cli("--address", server.address, "compute", other, "--parameters-from", trained,
                  check=False)  # fmt: skip
    assert refused.returncode == 2
    assert "do not fit" in refused.stderr and "layers.0.weight [64, 32, 16] vs [1, 2, 2]" in (
        refused.stderr
    )
    # A results file whose summary lost the step count: its state cannot be continued
    # without being told how far it got.
    tensors = safetensors.numpy.load_file(trained)
    bare = str(tmp_path / "bare.safetensors")
    safetensors.numpy.save_file(tensors, bare)
    refused = cli(*base, *adam, "--parameters-from", bare, check=False)
    assert refused.returncode == 2 and "give --start-step" in refused.stderr
    cli(*base, *adam, "--parameters-from", bare, "--start-step", "2")
    # Trained without its state: training starts afresh from the trained parameters.
    stateless = str(tmp_path / "stateless.safetensors")
    cli(*base, stateless, *adam)
    assert "step 0:" in cli(*base, *adam, "--parameters-from", stateless).stdout


@pytest.mark.parametrize(
    "flags, options",
    [
        (["--loss", "huber", "--huber-delta", "0.3"], dict(loss="huber", huber_delta=0.3)),
        (
            ["--hidden-activation", "leaky_relu", "--negative-slope", "0.3"],
            dict(hidden_activation="leaky_relu", negative_slope=0.3),
        ),
        (
            ["--optimizer", "sgd", "--momentum", "0.9", "--dampening", "0.5"],
            dict(optimizer="sgd", momentum=0.9, dampening=0.5),
        ),
        (
            ["--optimizer", "sgd", "--momentum", "0.9", "--nesterov"],
            dict(optimizer="sgd", momentum=0.9, nesterov=True),
        ),
        (
            ["--optimizer", "adam", "--betas", "0.5", "0.6", "--eps", "0.01"],
            dict(optimizer="adam", betas=(0.5, 0.6), eps=0.01),
        ),
    ],
)
def test_option_flags_run_the_job_the_client_runs_with_those_options(
    server, tmp_path, flags, options
):
    from gradserve.client import GradientClient
    from gradserve.client._jobfile import load_job

    cli("example", str(tmp_path))
    job = str(tmp_path / "ensemble-64x16-32-32-1.safetensors")
    training = ["--steps", "3", "--learning-rate", "0.05"] if "--optimizer" in flags else []
    if training:
        options.update(steps=3, learning_rate=0.05)
    cli("--address", server.address, "compute", job, str(tmp_path / "out.npz"), *flags, *training)
    with np.load(tmp_path / "out.npz") as f:
        got = {k: f[k] for k in f.files if k != "gradserve.summary"}
    tensors, meta = load_job(job)
    params = {k: v for k, v in tensors.items() if k.startswith("layers.")}
    job_options = {k: v for k, v in meta.items() if k != "layer_sizes"}
    with GradientClient(server.address) as client:
        want = client.compute(
            params, tensors["inputs"], tensors["targets"], **{**job_options, **options}
        ).tensors
        # the flags matter: without their values (the defaults) the results differ
        plain = {k: v for k, v in options.items() if k in ("loss", "hidden_activation")}
        if training:
            plain.update(optimizer=options["optimizer"], steps=3, learning_rate=0.05)
        default = client.compute(
            params, tensors["inputs"], tensors["targets"], **{**job_options, **plain}
        ).tensors
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-9, err_msg=k)
    assert any(not np.allclose(default[k], v) for k, v in want.items())


def test_output_and_switch_flags_turn_on_and_off_what_the_job_file_says(server, tmp_path):
    from gradserve.client._jobfile import load_job, save_job

    cli("example", str(tmp_path))
    tensors, job = load_job(str(tmp_path / "ensemble-64x16-32-32-1.safetensors"))
    path = str(tmp_path / "job.safetensors")
    save_job(path, tensors, dict(job, input_gradients=True))

    def names(*flags):
        out = str(tmp_path / "out.safetensors")
        cli("--address", server.address, "compute", path, out, *flags)
        return set(safetensors.numpy.load_file(out))

    grads = {f"layers.{i}.{kind}.grad" for i in range(3) for kind in ("weight", "bias")}
    assert names() == {"loss", "inputs.grad", *grads}
    assert names("--no-input-gradients") == {"loss", *grads}
    assert names("--no-parameter-gradients", "--forward-outputs") == {
        "loss",
        "inputs.grad",
        "outputs",
    }
    # NaN inputs: refused unless allowed
    models = tensors["layers.0.weight"].shape[0]
    tensors["inputs"] = np.repeat(tensors["inputs"][None], models, axis=0)
    tensors["inputs"][1, 2, 3] = np.nan
    save_job(path, tensors, job)
    refused = cli("--address", server.address, "compute", path, check=False)
    assert refused.returncode != 0 and "allow_non_finite" in refused.stderr
    assert "grad" in cli("--address", server.address, "compute", path, "--allow-non-finite",
                         "--tag", "nan-run-7").stdout  # fmt: skip
    deadline = time.monotonic() + 10
    while not any("nan-run-7" in line for line in server.log):  # the job's log line
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_training_flag_without_optimizer_is_refused(server, tmp_path):
    cli("example", str(tmp_path))
    job = str(tmp_path / "notebook-2-2-1.safetensors")
    refused = cli("--address", server.address, "compute", job, "--momentum", "0.9", check=False)
    assert refused.returncode == 2 and "needs optimizer" in refused.stderr, refused.stderr


@pytest.mark.parametrize("bootstrap", [False, True])
def test_micro_batch_flag_streams_the_same_job(server, tmp_path, bootstrap):
    """The example job as it is (shared samples), and with per-model bootstrap weights."""
    cli("example", str(tmp_path))
    job = str(tmp_path / "ensemble-64x16-32-32-1.safetensors")
    if bootstrap:
        with safetensors.safe_open(job, "np") as f:
            metadata = f.metadata()
        tensors = safetensors.numpy.load_file(job)
        counts = np.random.default_rng(5).poisson(1.0, size=(64, 128))
        tensors["sample_weights"] = counts.astype(np.float32)
        safetensors.numpy.save_file(tensors, job, metadata=metadata)
    base = ("--address", server.address, "compute", job)
    cli(*base, str(tmp_path / "whole.safetensors"))
    cli(*base, str(tmp_path / "streamed.safetensors"), "--micro-batch-samples", "50")
    whole = safetensors.numpy.load_file(str(tmp_path / "whole.safetensors"))
    streamed = safetensors.numpy.load_file(str(tmp_path / "streamed.safetensors"))
    for k, v in whole.items():
        np.testing.assert_allclose(streamed[k], v, rtol=1e-4, atol=1e-7)


def triton_version() -> str:
    import triton

    return triton.__version__


def test_info_json_lists_engines_and_limits(server):
    info = json.loads(cli("--address", server.address, "info", "--json").stdout)
    assert info["engines"][0]["name"] == "torch"
    # how each engine multiplies float32: the Triton engine's is the server's option
    matmuls = {e["name"]: e["float32_matmul"] for e in info["engines"]}
    assert matmuls == {"torch": "", "triton": "ieee"}  # triton: the interpreter's, in tests
    # and the library versions they compute with (the server runs in this environment)
    libraries = {e["name"]: e["library"] for e in info["engines"]}
    assert libraries == {
        "torch": f"torch {torch.__version__}",
        "triton": f"triton {triton_version()}",
    }
    assert "cross_entropy" in info["losses"] and "gelu" in info["activations"]
    assert info["limits"]["default_chunk_bytes"] == 1 << 20
    assert info["limits"]["max_optimizer_steps"] == 100_000
    # what a job may need beside its tensors, and how long its upload may stall
    assert info["limits"]["max_work_bytes"] == 8 << 30
    assert info["limits"]["upload_idle_timeout_seconds"] == 60
    assert info["limits"]["min_upload_bytes_per_second"] == 16384
    assert info["limits"]["stream_window_bytes"] == 0  # gRPC's adaptive window
    assert info["batching"]["max_jobs"] == 256 and "float32" in info["dtypes"]
    assert info["stats"]["inflight_jobs"] == 0


def test_info_text_is_for_people(server):
    lines = cli("--address", server.address, "info").stdout.splitlines()
    assert lines[0].startswith("gradserve ") and lines[1].startswith("engine torch on cpu: ")
    triton = [line for line in lines if line.startswith("engine triton ")]
    assert len(triton) == 1
    assert triton[0].endswith(f" (triton {triton_version()}; float32 matmul: ieee)")
    assert lines[1].endswith(f" (torch {torch.__version__})")
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert rows["max_job_bytes"].split(None, 1)[1] == "2147483648 (2 GiB)"
    assert rows["max_delay_seconds"].split(None, 1)[1] == "2 ms"
    assert rows["upload_idle_timeout_seconds"].split(None, 1)[1] == "60 s"
    assert rows["min_upload_bytes_per_second"].split(None, 1)[1] == "16384 (16 KiB/s)"
    assert rows["stream_window_bytes"].split(None, 1)[1] == "0 (gRPC's adaptive window)"
    # every value in one column, past the longest name
    assert len({len(row) - len(row.split(None, 1)[1]) for row in rows.values()}) == 1


def test_health_exit_codes(server):
    assert cli("--address", server.address, "health").stdout.strip() == "SERVING"
    down = cli("--address", "127.0.0.1:1", "--timeout", "2", "health", check=False)
    assert down.returncode == 1 and "NOT_SERVING" in down.stdout


def test_compute_reports_server_errors_with_their_code(server, tmp_path):
    cli("example", str(tmp_path))
    out = cli(
        "--address",
        server.address,
        "compute",
        str(tmp_path / "notebook-2-2-1.safetensors"),
        "--loss",
        "cross_entropy",
        check=False,
    )
    assert out.returncode == 2 and "INVALID_ARGUMENT" in out.stderr


def test_our_safetensors_files_are_read_by_the_reference_library(tmp_path):
    import numpy as np

    from gradserve.client import _safetensors

    data = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, 2], np.int64),
        "loss": np.array(0.25, np.float32),  # 0-d: a single model's loss, stored as [] not [1]
        "f": np.asfortranarray(np.arange(6.0).reshape(3, 2)),
    }
    _safetensors.save(data, str(tmp_path / "x.safetensors"), {"k": "v"})
    back = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
    for k, v in data.items():
        np.testing.assert_array_equal(back[k], v, strict=True)  # strict: shapes too
    # (the reference library writes a Fortran-order array's memory as it lies: given C order)
    c_order = {k: np.asarray(v, order="C") for k, v in data.items()}
    safetensors.numpy.save_file(c_order, str(tmp_path / "y.safetensors"))
    ours, _ = _safetensors.load(str(tmp_path / "y.safetensors"))
    for k, v in data.items():
        np.testing.assert_array_equal(ours[k], v, strict=True)
    # float32 that holds bfloat16 values is stored as BF16; anything else is refused
    bf16 = {"g": torch.randn(3, 5).to(torch.bfloat16)}
    _safetensors.save({"g": bf16["g"].float().numpy()}, str(tmp_path / "z.safetensors"),
                      bfloat16={"g"})  # fmt: skip
    torch.testing.assert_close(safetensors.torch.load_file(str(tmp_path / "z.safetensors")),
                               bf16, rtol=0, atol=0)  # fmt: skip
    with pytest.raises(ValueError, match="not bfloat16"):
        _safetensors.save({"a": data["a"] / 3}, str(tmp_path / "w.safetensors"), bfloat16={"a"})


def test_bfloat16_gradients_are_written_as_bfloat16(server, tmp_path):
    """--gradient-dtype bfloat16 halves the gradients' bytes on the wire, and in the
    safetensors file too (torch reads them as bfloat16); npz has no bfloat16: float32."""
    cli("example", str(tmp_path))
    job = str(tmp_path / "ensemble-64x16-32-32-1.safetensors")
    paths = {name: str(tmp_path / name) for name in ("f32.safetensors", "bf16.safetensors",
                                                      "bf16.npz")}  # fmt: skip
    cli("--address", server.address, "compute", job, paths["f32.safetensors"])
    for name in ("bf16.safetensors", "bf16.npz"):
        cli("--address", server.address, "compute", job, paths[name],
            "--gradient-dtype", "bfloat16")  # fmt: skip
    full = safetensors.torch.load_file(paths["f32.safetensors"])
    half = safetensors.torch.load_file(paths["bf16.safetensors"])
    widened = np.load(paths["bf16.npz"])
    assert half["loss"].dtype == torch.float32
    torch.testing.assert_close(half["loss"], full["loss"], rtol=0, atol=0)
    grads = [k for k in full if k.endswith(".grad")]
    assert len(grads) == 6
    for k in grads:
        assert half[k].dtype == torch.bfloat16 and widened[k].dtype == np.float32
        torch.testing.assert_close(half[k], full[k].to(torch.bfloat16), rtol=0, atol=0)
        np.testing.assert_array_equal(widened[k], half[k].float().numpy())
    size = {name: os.path.getsize(path) for name, path in paths.items()}
    grad_bytes = sum(full[k].numel() * 4 for k in grads)
    assert size["f32.safetensors"] - size["bf16.safetensors"] > 0.45 * grad_bytes


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as jq and browsers do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_stays_json_when_a_loss_is_nan(server, tmp_path):
    """A job that allows non-finite inputs can have a NaN loss: --json and the results
    file's summary write it as null (Python's json would write a bare NaN)."""
    from gradserve.client._jobfile import load_job, save_job

    cli("example", str(tmp_path))
    tensors, job = load_job(str(tmp_path / "ensemble-64x16-32-32-1.safetensors"))
    models = tensors["layers.0.weight"].shape[0]
    tensors["inputs"] = np.repeat(tensors["inputs"][None], models, axis=0)  # per model
    tensors["inputs"][0, 0, 0] = np.nan  # model 0 only
    save_job(str(tmp_path / "nan.safetensors"), tensors, dict(job, allow_non_finite=True))
    out = tmp_path / "out.safetensors"
    printed = cli("--address", server.address, "compute", str(tmp_path / "nan.safetensors"),
                  str(out), "--json").stdout  # fmt: skip
    summary = strict_loads(printed)
    assert summary["loss"][0] is None and all(isinstance(v, float) for v in summary["loss"][1:])
    with open(out, "rb") as f:
        header = strict_loads(f.read(int.from_bytes(f.read(8), "little")).decode())
    assert strict_loads(header["__metadata__"]["gradserve.summary"])["loss"][0] is None


def test_bench_reports_throughput_and_latency_percentiles(server):
    out = cli(
        "--address",
        server.address,
        "bench",
        "--concurrency",
        "4",
        "--jobs-per-client",
        "3",
        "--json",
    )
    report = json.loads(out.stdout)
    assert report["jobs"] == 12 and report["errors"] == {}
    assert report["jobs_per_second"] > 0
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    assert report["mean_jobs_per_launch"] >= 1 and report["first_error"] is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--concurrency", "0"], "--concurrency: must be at least 1, got 0"),
        (["--samples", "-1"], "--samples: must be at least 1, got -1"),
        (["--layer-sizes", "4"], "--layer-sizes: needs d0 and at least one layer width"),
        (["--layer-sizes", "4,0,1"], "--layer-sizes: must be at least 1, got 0"),
        (["--layer-sizes", "4,x"], "--layer-sizes: 'x' is no whole number"),
    ],
)
def test_bench_refuses_a_load_no_server_could_run(flags, message):
    out = cli("--address", "127.0.0.1:1", "bench", *flags, check=False)
    assert out.returncode == 2 and message in out.stderr


def test_bench_that_only_failed_says_why_and_exits_nonzero():
    out = cli("--address", "127.0.0.1:1", "bench", "--concurrency", "2", "--jobs-per-client",
              "1", check=False)  # fmt: skip
    assert out.returncode == 1 and "errors {'UNAVAILABLE': 2}" in out.stdout
    assert "first error: UNAVAILABLE: " in out.stderr


def _safetensors_bytes(header, data_bytes: int = 0) -> bytes:
    """A safetensors file of `header` and `data_bytes` bytes of data (ones)."""
    import json
    import struct

    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\x01" * data_bytes


def _npz_bytes(inputs: np.ndarray) -> bytes:
    """An npz job whose inputs are `inputs`, its other arrays fine."""
    import io

    f = io.BytesIO()
    np.savez(f, inputs=inputs, targets=np.ones((2, 1), np.float32),
             **{"layers.0.weight": np.ones((1, 1, 1), np.float32)})  # fmt: skip
    return f.getvalue()


@pytest.mark.parametrize(
    "name, content",
    [
        ("short.safetensors", b"abc"),
        ("length.safetensors", b"\xff" * 8 + b"{}"),
        ("notjson.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{x"),
        ("list.safetensors", _safetensors_bytes([1, 2])),
        ("nokeys.safetensors", _safetensors_bytes({"inputs": {"dtype": "F32"}})),
        ("outside.safetensors", _safetensors_bytes(
            {"inputs": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})),
        ("jobnotobject.safetensors",
         _safetensors_bytes({"__metadata__": {"gradserve.job": "[1]"}})),
        ("jobnottext.safetensors",
         _safetensors_bytes({"__metadata__": {"gradserve.job": {"layer_sizes": [1, 1]}}})),
        # shapes the bytes do not fit (numpy's "cannot reshape", naming nothing)
        ("shapebytes.safetensors", _safetensors_bytes(
            {"inputs": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8)),
        ("bf16bytes.safetensors", _safetensors_bytes(
            {"inputs": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 3]}}, 8)),
        # JSON values of the wrong kind where a dtype name or a shape list goes
        ("dtypelist.safetensors", _safetensors_bytes(
            {"inputs": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, 8)),
        ("shapedict.safetensors", _safetensors_bytes(
            {"inputs": {"dtype": "F32", "shape": {"2": 1}, "data_offsets": [0, 8]}}, 8)),
        ("broken.npz", b"PK\x03\x04 not really a zip"),
        ("text.npz", b"inputs,targets\n1,2\n"),
        # arrays that are no real numbers: a pickle numpy will not load, and values that
        # converting would garble (an imaginary part dropped) or fail on deep in numpy
        ("objects.npz", _npz_bytes(np.array([{"x": 1}, None], dtype=object))),
        ("strings.npz", _npz_bytes(np.array([["1"], ["2"]]))),
        ("complex.npz", _npz_bytes(np.ones((2, 1), np.complex64))),
        # numbers, but no floating-point ones where the networks compute (only the targets
        # may be integers: class indices)
        ("bool.npz", _npz_bytes(np.ones((2, 1), bool))),
        ("int.npz", _npz_bytes(np.ones((2, 1), np.int32))),
    ],
)  # fmt: skip
def test_malformed_job_files_get_a_clear_error_not_a_traceback(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    out = cli("--address", "127.0.0.1:1", "compute", str(path), check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and str(path) in out.stderr + out.stdout
    # numpy's own message for a file that is no zip suggests loading it as a pickle
    assert "pickle" not in out.stderr


@pytest.mark.parametrize("shape", [[-1, 2], [2.5], [True, 2], ["2"]])
def test_safetensors_shapes_are_whole_numbers(tmp_path, shape):
    """numpy would infer a -1 and int() truncate 2.5: the file is refused instead."""
    path = tmp_path / "job.safetensors"
    header = {"inputs": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}
    path.write_bytes(_safetensors_bytes(header, 8))
    with pytest.raises(ValueError, match="must be whole numbers >= 0"):
        _safetensors.load(str(path))


def test_an_output_path_in_a_missing_directory_is_refused_before_the_job_runs(tmp_path):
    """The address leads nowhere: the error must come from the path, before any connection."""
    cli("example", str(tmp_path))
    job = next(tmp_path.glob("notebook-*.safetensors"))
    out_path = tmp_path / "missing" / "grads.safetensors"
    out = cli("--address", "127.0.0.1:1", "compute", str(job), str(out_path), check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no such directory" in out.stderr and "UNAVAILABLE" not in out.stderr


def tiny_job_file(tmp_path, job: dict, extra: dict | None = None):
    """A one-layer [2, 1] job file with the JSON description `job` (and `extra` tensors)."""
    from gradserve.client._jobfile import save_job

    tensors = {
        "layers.0.weight": np.ones((1, 1, 2), np.float32),
        "layers.0.bias": np.zeros((1, 1), np.float32),
        "inputs": np.ones((3, 2), np.float32),
        "targets": np.ones((3, 1), np.float32),
        **(extra or {}),
    }
    path = tmp_path / "job.safetensors"
    save_job(str(path), tensors, job)
    return path


@pytest.mark.parametrize(
    "job",
    [
        {"optimizer": "sgd", "learning_rate": 0.1, "steps": "ten"},
        {"huber_delta": True},  # JSON true is no number
        {"input_gradients": "yes"},
        {"hidden_activation": 5},
    ],
)
def test_job_file_options_of_the_wrong_type_are_named(tmp_path, job):
    path = tiny_job_file(tmp_path, job)
    out = cli("--address", "127.0.0.1:1", "compute", str(path), check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"option {next(iter(reversed(job)))!r} has the wrong type" in out.stderr


@pytest.mark.parametrize(
    "job, extra, message",
    [
        ({"reducton": "sum"}, {}, "unknown job key 'reducton'"),
        ({"layer_sizes": [3, 1]}, {}, r"layer_sizes \[3, 1\] disagree with the weights' \[2, 1\]"),
        ({}, {"sample_weight": np.ones(3, np.float32)}, "unknown tensor.s. 'sample_weight'"),
        ({}, {"layers.0.wieght": np.ones((1, 1, 2), np.float32)}, "'layers.0.wieght'"),
        # of the right JSON type, but of a form the client refuses before sending
        ({"hidden_activation": ["leaky_relu", "x"]}, {}, "an activation is a name or"),
        ({"optimizer": "adam", "learning_rate": 0.1, "betas": [0.9]}, {}, "betas must be a pair"),
        ({"reduction": "avg"}, {}, "unknown reduction 'avg'"),
        ({}, {"layers.0.bias": np.ones((1, 1), np.int32)}, "layers.0.bias: dtype int32"),
    ],
)
def test_job_file_parts_the_job_would_drop_are_refused(tmp_path, job, extra, message):
    """A misspelt key or tensor, or layer sizes the weights contradict, would be left out of
    the job that runs: refused before any connection (the address leads nowhere), naming
    the file."""
    path = tiny_job_file(tmp_path, job, extra)
    out = cli("--address", "127.0.0.1:1", "compute", str(path), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert re.search(message, out.stderr), out.stderr
    assert str(path) in out.stderr
    assert "UNAVAILABLE" not in out.stderr


def test_a_directory_as_the_output_path_is_refused_before_the_job_runs(tmp_path):
    cli("example", str(tmp_path))
    job = next(tmp_path.glob("notebook-*.safetensors"))
    out = cli("--address", "127.0.0.1:1", "compute", str(job), str(tmp_path), check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"{tmp_path}: is a directory" in out.stderr and "UNAVAILABLE" not in out.stderr


def test_results_are_not_written_over_the_job_file(tmp_path):
    cli("example", str(tmp_path))
    job = next(tmp_path.glob("notebook-*.safetensors"))
    before = job.read_bytes()
    for out_path in (job, tmp_path / "." / job.name):
        out = cli("--address", "127.0.0.1:1", "compute", str(job), str(out_path), check=False)
        assert out.returncode != 0 and "would overwrite the job file" in out.stderr
    assert job.read_bytes() == before


def test_ctrl_c_ends_a_waiting_compute_with_a_message_not_a_traceback(tmp_path):
    """The "server" accepts connections and never answers, so the job waits until the
    interrupt."""
    import signal
    import socket
    import time

    cli("example", str(tmp_path))
    job = next(tmp_path.glob("notebook-*.safetensors"))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradserve.client", "--address", address, "compute", str(job)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            conn, _ = silent.accept()  # the client is connected and waiting
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        conn.close()
    assert proc.returncode == 130 and err.strip().endswith("interrupted")
    assert "Traceback" not in err


def test_connection_flags_work_after_the_command_and_results_can_be_npz(server, tmp_path):
    """`compute job out --address HOST:PORT`, as people type it; an .npz results path gets
    npz (readable without pickle), equal to the safetensors results."""
    import numpy as np

    from gradserve.client import _safetensors

    cli("example", str(tmp_path))
    job = str(next(tmp_path.glob("ensemble-*.safetensors")))
    outs = tmp_path / "grads.safetensors", tmp_path / "grads.npz"
    for out in outs:
        cli("--address", "127.0.0.1:1", "compute", job, str(out), "--address", server.address)
    tensors, metadata = _safetensors.load(str(outs[0]))
    with np.load(outs[1], allow_pickle=False) as npz:
        assert set(npz.files) == {*tensors, "gradserve.summary"}
        for name, value in tensors.items():
            np.testing.assert_array_equal(npz[name], value)
        summary = json.loads(str(npz["gradserve.summary"]))
    assert summary["engine"] == json.loads(metadata["gradserve.summary"])["engine"]
    health = cli("health", "--address", server.address, "--timeout", "5")
    assert health.stdout.strip() == "SERVING"
