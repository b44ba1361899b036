"""Peak memory of one stage: resident set (RSS) of this process, and GPU memory on CUDA.

``getrusage``'s ``ru_maxrss`` is the peak of the whole process lifetime, so a later stage
would inherit an earlier one's peak. Per stage, in order of preference:

* Linux: reset the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) at the
  stage's start and read ``VmHWM`` from ``/proc/self/status`` at its end — exact, no
  overhead;
* else (no writable ``clear_refs``, other systems): a daemon thread samples the RSS every
  ``interval`` seconds (``/proc/self/status`` or ``psutil`` if installed) and keeps the
  maximum — a lower bound, missing spikes shorter than the interval;
* neither available: ``None`` (the figure is left out).

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors the
caching allocator handed out, on the current device; not the allocator's reserve).
Child processes (``ddp_spawn`` ranks, data-loader workers) are not counted.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

MB = 1 << 20
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def current_rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where not possible."""
    if _status_kb("VmHWM") is None:
        return False
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.rss_mb`` (peak RSS inside, MiB, or None) and
    ``m.gpu_mb`` (peak CUDA memory allocated inside, MiB; None without CUDA)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.rss_mb: float | None = None
        self.gpu_mb: float | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False

    def _sample(self) -> None:
        while True:
            rss = current_rss_bytes()
            if rss is not None:
                self._peak = max(self._peak, rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        self._hwm = _reset_hwm()
        if not self._hwm and current_rss_bytes() is not None:
            self._thread = threading.Thread(target=self._sample, name="vaa-peak-rss", daemon=True)
            self._thread.start()
        self._cuda = _cuda_ready()
        if self._cuda:
            import torch
            torch.cuda.reset_peak_memory_stats()
        return self

    def start(self) -> "PeakMemory":  # the same as ``with``, for code that cannot indent
        return self.__enter__()

    def stop(self) -> "PeakMemory":
        self.__exit__(None, None, None)
        return self

    def __exit__(self, *exc) -> None:
        if self._hwm:
            kb = _status_kb("VmHWM")
            self.rss_mb = None if kb is None else round(kb / 1024, 1)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = current_rss_bytes()
            self._peak = max(self._peak, rss or 0)
            self.rss_mb = round(self._peak / MB, 1) if self._peak else None
        if self._cuda or _cuda_ready():
            import torch
            self.gpu_mb = round(torch.cuda.max_memory_allocated() / MB, 1)


def _cuda_ready() -> bool:
    """CUDA is in use in this process (never initialises it just to ask)."""
    import torch
    return torch.cuda.is_available() and torch.cuda.is_initialized()
