"""Timing and memory helpers the benchmark scripts share (Linux: /proc/self)."""
import ctypes
import statistics
import time
from contextlib import contextmanager


def status_mib(key):
    """A /proc/self/status field in MiB (VmRSS: resident now, VmHWM: its high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


@contextmanager
def peak_rss(trim=False):
    """Yields a dict that gets 'peak' = the rise of the peak resident set (MiB) over the block. trim: first hand the
    pages of freed blocks back to the system (glibc's malloc_trim), so the rise counts every page the block needs
    beyond what is live, not only those beyond what earlier calls left with the process."""
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out, start = {}, status_mib("VmRSS")
    yield out
    out["peak"] = status_mib("VmHWM") - start


def median_seconds(fn, reps):
    """Median wall time of reps calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
