"""Freed job memory stays mapped for the next job (glibc), within the configured bound."""

import subprocess
import sys
import textwrap

import pytest

# Allocate and fill 64 MiB, free it, and report how much of it stayed resident.
PROBE = textwrap.dedent(
    """
    import re, sys
    import numpy as np
    from gradserve.server.memory import retain_freed_memory

    def rss():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmRSS:\\s+(\\d+) kB", f.read())[1]) << 10

    took = retain_freed_memory(int(sys.argv[1]))
    before = rss()
    buffer = np.empty(64 << 20, dtype=np.uint8)
    buffer.fill(1)
    del buffer
    print(took, (rss() - before) >> 20)
    """
)


def kept_mib(limit_bytes: int) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(limit_bytes)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc")
def test_freed_job_memory_is_kept_up_to_the_bound():
    assert kept_mib(256 << 20) == ("True", pytest.approx(64, abs=4))
    # Over the bound, a freed buffer goes back to the system as with the defaults.
    assert kept_mib(32 << 20) == ("True", pytest.approx(0, abs=4))
    assert kept_mib(0) == ("False", pytest.approx(0, abs=4))
