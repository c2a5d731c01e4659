"""Memory readings shared by the benchmark scripts (Linux /proc)."""
from __future__ import annotations

from pathlib import Path

MB = 2**20


def _status_kb(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def rss_now_bytes() -> int:
    """Current resident set (VmRSS) of this process."""
    return _status_kb("VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident set of this process's address space (VmHWM).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: across fork + exec that keeps the high-water mark of
    the forked copy of the PARENT, so a child started by a big parent reports the parent's size.
    """
    peak = _status_kb("VmHWM")
    if peak is None:
        raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")
    return peak
