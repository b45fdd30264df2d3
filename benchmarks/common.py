"""Shared benchmark plumbing: cache flush, budgeted timing, DRAM bandwidth, SQNR, machine facts.

Why each piece exists (details in benchmarks/README.md):

* :class:`CacheFlusher` evicts the last-level cache before every timed call, so a decode-size
  weight (e.g. 4096x4096 int4 = 8 MiB) is read from DRAM as in a real model, not from L3.
* :func:`time_call` times calls one at a time (flush excluded) and caps the repetitions by a
  time budget, so a slow reference kernel costs one call, not ten.
* :class:`BandwidthProbe` measures DRAM read bandwidth (sum over a 1 GiB tensor) *in the same
  run*, sampled between kernel measurements: the host is shared and drifts, so a roofline
  only means something against bandwidth measured alongside the kernel.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = [
    "use_threads",
    "CacheFlusher",
    "Timing",
    "time_call",
    "BandwidthProbe",
    "sqnr_db",
    "llc_bytes",
    "machine_info",
    "machine_summary",
    "replace_marked_section",
]


@contextlib.contextmanager
def use_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def llc_bytes() -> Optional[int]:
    """Size of the largest CPU cache level of cpu0 (sysfs), or None when unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = None
    try:
        for entry in os.listdir(base):
            path = os.path.join(base, entry, "size")
            if not entry.startswith("index") or not os.path.exists(path):
                continue
            text = open(path).read().strip().upper()
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                size = int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
                best = max(best or 0, size)
    except OSError:
        return None
    return best


class CacheFlusher:
    """Read and write a buffer larger than the last-level cache (evicts the weights)."""

    def __init__(self, mib: int):
        if mib <= 0:
            raise ValueError(f"flush buffer must be positive, got {mib} MiB")
        self.mib = mib
        self.buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buf.add_(1.0)


@dataclass
class Timing:
    """Per-call latencies (seconds) of one measurement and what was done to get them."""

    samples: list[float]
    output: Any = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def _timed(fn: Callable[[Any], Any], arg: Any, flush: Optional[Callable[[], None]]) -> tuple[float, Any]:
    if flush is not None:
        flush()
    t0 = time.perf_counter()
    out = fn(arg)
    return time.perf_counter() - t0, out


def time_call(
    fn: Callable[[Any], Any],
    arg: Any,
    flush: Optional[Callable[[], None]] = None,
    *,
    repeat: int = 10,
    budget_s: float = 0.5,
) -> Timing:
    """Latencies of ``fn(arg)``, the cache flushed before each call (flush untimed).

    The first call is a warm-up (first-touch allocation, primitive creation); its output is
    returned for accuracy checks and its time sets the number of timed calls:
    ``budget_s / t`` clamped to ``[1, repeat]``. If the warm-up alone took more than
    ``budget_s`` it is the only sample: a call that slow is dominated by its work, and a
    slow reference kernel then costs one call instead of ten. Callers that compile on the
    first call at a new shape make that call before (see ``Prepared.compiles``).
    """
    first, out = _timed(fn, arg, flush)
    if first > budget_s:
        return Timing([first], out, "1 call (over the time budget)")
    n = int(min(repeat, max(1, budget_s // max(first, 1e-9))))
    samples = [_timed(fn, arg, flush)[0] for _ in range(n)]
    return Timing(samples, out)


@dataclass
class BandwidthProbe:
    """DRAM read bandwidth: ``torch.sum`` over a tensor much larger than the caches.

    Every :meth:`sample` runs ``reps`` sums at ``threads`` threads and records the median
    rate; :attr:`gbps` is the median over all samples taken (the run's figure).
    """

    mib: int = 1024
    threads: int = 2
    reps: int = 3
    samples: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Same page placement as torchq's packed weights (transparent huge pages where the OS
        # allows): on 4 KiB pages the same sum reads at about half the rate on the dev host,
        # and a roofline from it would flatter kernels whose weights sit in huge pages.
        from torchq.kernels.hugepages import empty_huge, huge_bytes

        self.data = empty_huge((self.mib * 2**20 // 4,), torch.float32).fill_(1.0)
        self.huge_fraction = huge_bytes(self.data) / self.data.nbytes

    def sample(self) -> float:
        nbytes = self.data.numel() * 4
        times = []
        with use_threads(self.threads):
            self.data.sum()  # fault in / warm the code path
            for _ in range(self.reps):
                t0 = time.perf_counter()
                self.data.sum()
                times.append(time.perf_counter() - t0)
        rate = nbytes / statistics.median(times) / 1e9
        self.samples.append(rate)
        return rate

    @property
    def gbps(self) -> float:
        if not self.samples:
            self.sample()
        return statistics.median(self.samples)


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``20 log10(||ref|| / ||y - ref||)`` in fp64; ``inf`` when equal."""
    ref = ref.double()
    err = (y.double() - ref).norm()
    if err == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / err))


_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", "", "x86_64"):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, flags


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    """Facts a benchmark table must carry to be comparable: CPU, ISA, caches, software."""
    model, flags = _cpuinfo()
    llc = llc_bytes()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu": model,
        "isa": [f for f in _ISA_FLAGS if f in flags],
        "cores": cores,
        "llc_mib": None if llc is None else llc / 2**20,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torchao": _version("torchao"),
        "bitsandbytes": _version("bitsandbytes"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **_torchq_paths(),
    }


def _torchq_paths() -> dict[str, Any]:
    """torchq's kernel paths on this CPU and the one in use (empty if the kernels did not build)."""
    try:
        from torchq.kernels import cpu_ext

        if cpu_ext.available():
            return {"torchq_paths": cpu_ext.supported_isas(), "torchq_path": cpu_ext.current_isa()}
    except Exception:  # noqa: BLE001 - a header fact, never a reason to stop a benchmark
        pass
    return {}


#: kinds of CPU that get a README table each, best first: (kind, torchq path that defines it, title)
CPU_KINDS = (
    ("amx", "amx", "AVX-512 with AMX"),
    ("avx512", "avx512", "AVX-512 (no AMX)"),
    ("avx2", "avx2", "AVX2 only"),
    ("scalar", "scalar", "no AVX2"),
)


def cpu_kind(info: dict[str, Any]) -> tuple[str, str]:
    """(kind, title) of the machine in ``machine_info`` output: its best torchq kernel path."""
    paths = info.get("torchq_paths") or []
    for kind, path, title in CPU_KINDS:
        if path in paths:
            return kind, title
    return "unknown", "kernels unavailable"


def machine_summary(info: dict[str, Any]) -> str:
    """One markdown line describing the machine (``machine_info`` output)."""
    isa = " ".join(info["isa"]) or "none of the tracked flags"
    missing = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16") if f not in info["isa"]]
    extra = f" (no {', '.join(missing)})" if missing else ""
    llc = f", LLC {info['llc_mib']:.0f} MiB" if info.get("llc_mib") else ""
    peers = ", ".join(f"{k} {info[k]}" for k in ("torchao", "bitsandbytes") if info.get(k))
    path = f"; torchq kernel path {info['torchq_path']} of {'/'.join(info['torchq_paths'])}" if info.get("torchq_path") else ""
    return (
        f"{info['cpu']}, {info['cores']} cores{llc}; ISA: {isa}{extra}{path}; torch {info['torch']} "
        f"(cpu capability {info['torch_cpu_capability']}), Python {info['python']}"
        + (f"; {peers}" if peers else "")
        + f"; {info['date']}"
    )


def upsert_marked_section(text: str, name: str, body: str, before: str) -> str:
    """Replace section ``name`` (see :func:`replace_marked_section`), or insert it, marked, right
    before the line ``before`` when it does not exist yet (other sections stay untouched)."""
    if f"<!-- {name}:start -->" in text:
        return replace_marked_section(text, name, body)
    i = text.find(before)
    if i < 0:
        raise ValueError(f"neither section {name!r} nor the anchor {before!r} is in the text; add the anchor")
    block = f"<!-- {name}:start -->\n{body.strip(chr(10))}\n<!-- {name}:end -->\n\n"
    return text[:i] + block + text[i:]


def replace_marked_section(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``text``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(
            f"markers {start} ... {end} not found (in this order); add them where the section should go"
        )
    return text[: i + len(start)] + "\n" + body.strip("\n") + "\n" + text[j:]
