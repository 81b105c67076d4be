"""Server configuration: flags, GRADSERVE_* variables, defaults."""

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
