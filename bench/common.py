"""Timing and memory helpers the benchmark scripts share (Linux: /proc/self)."""
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
def peak_rss():
    """Yields a dict that gets 'peak' = the rise of the peak resident set (MiB) over the block."""
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
