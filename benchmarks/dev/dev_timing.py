"""Dev-only timing helpers for kernel tuning (not the benchmark harness): cache flush,
DRAM read bandwidth, median latency."""
import time, statistics, torch

_FLUSH = torch.empty(64 * 2**20 // 4, dtype=torch.float32)
_BIG = torch.ones(2**30 // 4, dtype=torch.float32)


def flush():
    _FLUSH.add_(1.0)


def dram_gbps(reps=3):
    best = 0.0
    for _ in range(reps):
        flush()
        t = time.perf_counter(); _BIG.sum(); dt = time.perf_counter() - t
        best = max(best, _BIG.numel() * 4 / dt / 1e9)
    return best


def bench(fn, reps=15, warm=2, cold=True, stat="min"):
    """Latency of fn() in seconds (min by default: the host is shared and noisy)."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        if cold:
            flush()
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return min(ts) if stat == "min" else statistics.median(ts)
