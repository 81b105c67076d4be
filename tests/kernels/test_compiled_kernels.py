"""The process keeps a bounded number of compiled Triton kernels (kernels.compiled_kernels)."""

import pytest

from gradserve.kernels import compiled_kernels, triton_engine
from gradserve.server.config import parse_config
from tests.jobs import ensemble_job, random_job
from tests.kernels.uninterpreted import run_module


@pytest.mark.timeout(300)
def test_compiled_kernels_beyond_the_limit_are_dropped():
    """Against Triton's own caches, filled by its launcher compiling for sm_90."""
    done = run_module("tests.kernels.compiled_kernels_check", timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "stay within the limit" in done.stdout


@pytest.mark.skipif(not triton_engine.interpreted(), reason="about Triton's interpreter")
def test_the_interpreter_holds_no_compiled_kernels():
    sizes = (5, 13, 3)
    triton_engine.run(ensemble_job(random_job(sizes, 2, 9, seed=1), sizes), "cpu")
    assert compiled_kernels.held() == 0 and not compiled_kernels.enforce()


def test_the_limit_is_at_least_one():
    with pytest.raises(ValueError, match=">= 1"):
        compiled_kernels.set_limit(0)
    assert compiled_kernels.limit() >= 1


def test_the_server_sets_the_limit_from_its_flag_or_environment():
    assert parse_config([], environ={}).max_compiled_kernels == compiled_kernels.DEFAULT_LIMIT
    config = parse_config([], environ={"GRADSERVE_MAX_COMPILED_KERNELS": "8"})
    assert config.max_compiled_kernels == 8
    with pytest.raises(SystemExit):
        parse_config(["--max-compiled-kernels", "0"], environ={})
