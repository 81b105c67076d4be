"""Server configuration: flags, GRADSERVE_* variables, defaults."""

from dataclasses import fields

import pytest

from gradserve.server.config import ServerConfig, env_name, parse_config


def test_defaults_without_flags_or_environment():
    assert parse_config([], environ={}) == ServerConfig()


def test_environment_variables_set_options():
    config = parse_config(
        [], environ={"GRADSERVE_PORT": "6000", "GRADSERVE_BATCH_MAX_DELAY_MS": "7.5"}
    )
    assert config.port == 6000 and config.batch_max_delay_ms == 7.5


def test_flags_win_over_the_environment():
    config = parse_config(["--port", "7000"], environ={"GRADSERVE_PORT": "6000"})
    assert config.port == 7000


def test_every_option_has_an_environment_variable_name():
    assert env_name("max_job_bytes") == "GRADSERVE_MAX_JOB_BYTES"


def test_chunk_size_above_the_accepted_maximum_is_refused():
    with pytest.raises(SystemExit):
        parse_config(["--chunk-bytes", "100", "--max-chunk-bytes", "10"], environ={})


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "99999"],
        ["--port", "-2"],
        ["--metrics-port", "70000"],
        ["--max-models", "-1"],
        ["--max-samples", "0"],
        ["--batch-max-jobs", "0"],
        ["--batch-max-delay-ms", "-5"],
        ["--upload-idle-timeout-s", "0"],
        ["--upload-idle-timeout-s", "nan"],
        ["--min-upload-bytes-per-s", "-1"],
        ["--drain-grace-s", "inf"],
        ["--max-compiled-kernels", "0"],
        ["--max-kernel-cache-bytes", "-1"],
        ["--stream-window-bytes", "-1"],
        ["--stream-window-bytes", "1024"],  # below HTTP/2's default window: a slow upload
        ["--stream-window-bytes", str(2**31)],  # beyond HTTP/2's largest window
        ["--heap-ceiling-bytes", str(2**25 + 1)],  # beyond glibc's largest mmap threshold
        ["--heap-ceiling-bytes", "-1"],
        ["--device", "foo"],
        ["--device", "cuda:x"],
        ["--log-level", "LOUD"],
        ["--float32-matmul", "fast"],
        ["--host", ""],  # gRPC would fail to bind ":50051", naming no flag
        ["--host", " "],
    ],
)
def test_option_values_no_server_can_work_with_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv, environ={})
    assert argv[0] in capsys.readouterr().err  # the message names the flag


def test_a_malformed_environment_variable_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        parse_config([], environ={"GRADSERVE_PORT": "fifty"})
    assert "GRADSERVE_PORT='fifty' is not a whole number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config([], environ={"GRADSERVE_BATCH_MAX_DELAY_MS": "soon"})
    assert "GRADSERVE_BATCH_MAX_DELAY_MS='soon' is not a number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "0"],
        ["--metrics-port", "-1"],
        ["--batch-max-delay-ms", "0"],
        ["--reuse-buffer-bytes", "0"],
        ["--max-connection-age-s", "0"],
        ["--stream-window-bytes", "0"],
        ["--min-upload-bytes-per-s", "0"],  # no minimum
        ["--stream-window-bytes", "65535"],
        ["--stream-window-bytes", str(2**31 - 1)],
        ["--device", "cuda:1"],
        ["--log-level", "debug"],
        ["--float32-matmul", "tf32x3"],
    ],
)
def test_boundary_values_are_accepted(argv):
    parse_config(argv, environ={})


def test_gluon_float32_matmul_needs_triton_with_gluon(monkeypatch, capsys):
    from gradserve.server import config as server_config

    assert parse_config(["--float32-matmul", "gluon"], environ={}).float32_matmul == "gluon"
    monkeypatch.setattr(server_config, "gluon_available", lambda: False)
    with pytest.raises(SystemExit):
        parse_config([], environ={"GRADSERVE_FLOAT32_MATMUL": "gluon"})
    assert "--float32-matmul gluon needs Triton with Gluon" in capsys.readouterr().err


def test_every_option_is_in_the_readmes_flag_table():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `--")]
    for f in fields(ServerConfig):
        flag = "`--" + f.name.replace("_", "-") + "`"
        assert any(row.split(" | ")[0].count(flag) for row in rows), f"{flag} is not in the table"
