"""A process's memory as Linux reports it (/proc/PID/status), for memory-bound tests."""

from __future__ import annotations


def memory_bytes(pid: int, field: str = "VmRSS") -> int:
    """A /proc/PID/status memory field in bytes: VmRSS (resident now), VmHWM (its peak),
    RssAnon (resident memory not backed by a file)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)
