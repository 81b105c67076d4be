"""Message-sized allocations stay mapped between messages (glibc)."""

import subprocess
import sys
import textwrap

import pytest

# Allocate and fill 1 MiB messages four at a time (a stream has several in flight), free
# them, repeat, and report the minor page faults the process took: with the setting, the
# same heap memory serves every round.
PROBE = textwrap.dedent(
    """
    import resource, sys
    from gradserve.server.memory import keep_message_memory

    took = keep_message_memory(int(sys.argv[1])) if sys.argv[1] != "0" else False
    message = bytes(1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(16):  # a few messages in flight at once, then all freed
        window = [bytearray(1 << 20) for _ in range(4)]  # zero-filled: every page written
        window = None
    print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def faults(max_message_bytes: int) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(max_message_bytes)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_message_buffers_are_not_faulted_in_again_for_each_message():
    took, kept = faults(1 << 20)
    assert took == "True"
    _, default = faults(0)
    pages_per_message = (1 << 20) // 4096
    assert default > 32 * pages_per_message, default  # glibc's defaults: faulted anew
    assert kept < 5 * pages_per_message, kept  # the first window only
