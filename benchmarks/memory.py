"""Memory readings shared by the benchmark scripts (Linux /proc)."""
from __future__ import annotations

import threading
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


def anon_now_bytes() -> int:
    """Current resident ANONYMOUS memory (RssAnon): heap, numpy/torch buffers; not memory-mapped files."""
    value = _status_kb("RssAnon")
    if value is None:
        raise RuntimeError("no RssAnon in /proc/self/status: this benchmark needs Linux >= 4.5")
    return value


def peak_rss_bytes() -> int:
    """Peak resident set of this process's address space (VmHWM).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: across fork + exec that keeps the high-water mark of
    the forked copy of the PARENT, so a child started by a big parent reports the parent's size.
    VmHWM counts file-backed pages too (a memory-mapped target file read once counts in full).
    """
    peak = _status_kb("VmHWM")
    if peak is None:
        raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")
    return peak


class AnonPeak:
    """Peak of RssAnon while the context is open, sampled by a thread every ``interval`` seconds.

    The kernel keeps no high-water mark of the anonymous part alone (VmHWM includes file-backed
    pages), hence the sampling; the numpy/torch work releases the GIL, so the sampler keeps
    running during long BLAS/LAPACK calls.  An allocation that lives shorter than ``interval``
    can be missed; ``samples`` says how many readings were taken.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, anon_now_bytes())
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "AnonPeak":
        self.peak = anon_now_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_now_bytes())
