"""Build, load and configure torchq's C++ CPU kernels (``torch.ops.torchq.*``).

The sources in ``csrc/`` are compiled on first use with
``torch.utils.cpp_extension.load`` (ninja) into a cache directory keyed by a hash of the
sources, the compiler flags and the torch / Python versions:
``$TORCH_EXTENSIONS_DIR/torchq_cpu_<hash>`` if that variable is set, else
``~/.cache/torchq/torchq_cpu_<hash>``. Later processes load the cached library directly.
It is built with ``-O3 -fopenmp`` (and linked with OpenMP) so that ``at::parallel_for``
really runs on all ``torch.get_num_threads()`` threads.

One build runs on any x86-64 machine: per-ISA units (AVX-512 with VNNI, AVX2 + FMA + F16C,
portable) are chosen at run time from ``cpuid``. The ``amx`` path is the AVX-512 kernels
plus the oneDNN route for large M (library GEMMs on AMX tiles); it exists only where
cpuid has AMX-TILE/BF16/INT8, the OS enables tile state and Linux grants the process the
tile-data permission (``arch_prctl(ARCH_REQ_XCOMP_PERM)``), so it can never SIGILL.
``TORCHQ_ISA=amx|avx512|avx2|scalar`` forces a path (an error if this CPU lacks it);
:func:`force_isa` does the same in a ``with`` block. ``TORCHQ_TUNE=name=value,...`` sets kernel tunables at load (:func:`apply_tunables`);
``TORCHQ_SANITIZE=1`` builds (and caches separately) an AddressSanitizer/UBSan extension.
If the build fails, torchq warns once and the reference kernels are used
(:func:`available` returns False). A fresh build must also pass :func:`check_library` (it
formats an error message in a child process): a compiler that links its own copy of the
C++ runtime builds kernels that crash or garble messages under PyTorch's, and that counts
as a failed build.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

__all__ = [
    "available",
    "load",
    "build_error",
    "check_library",
    "ISAS",
    "supported_isas",
    "current_isa",
    "set_isa",
    "force_isa",
    "apply_tunables",
    "after_load",
]

ISAS = ("scalar", "avx2", "avx512", "amx")
_CSRC = Path(__file__).with_name("csrc")
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wno-unknown-pragmas"]
_LDFLAGS = ["-fopenmp"]
# TORCHQ_SANITIZE=1: AddressSanitizer + UBSan build (its own cache entry). Run Python with
# LD_PRELOAD="$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0 (README).
_SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
if os.environ.get("TORCHQ_SANITIZE") == "1":
    _CFLAGS = [f for f in _CFLAGS if f != "-O3"] + ["-O1", "-g"] + _SANITIZE
    _LDFLAGS = _LDFLAGS + _SANITIZE

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None}


def _sources() -> list[Path]:
    return sorted(p for p in _CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def _build_key() -> str:
    h = hashlib.sha256()
    for p in _sources():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.split()[0].encode())
    return h.hexdigest()[:16]


def _build_dir(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "torchq"
    return base / name


def _load() -> None:
    name = f"torchq_cpu_{_build_key()}"
    build_dir = _build_dir(name)
    lib = build_dir / f"{name}.so"
    if lib.exists():
        torch.ops.load_library(str(lib))
    else:
        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in _sources() if p.suffix == ".cpp"],
            extra_cflags=list(_CFLAGS),  # copies: load() appends torch's libraries to the
            extra_ldflags=list(_LDFLAGS),  # lists it gets, which would change _build_key()
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=bool(os.environ.get("TORCHQ_BUILD_VERBOSE")),
        )
        check_library(lib)
    for hook in _AFTER_LOAD:
        hook()


_AFTER_LOAD: list = []

# Loads a built library in a fresh interpreter and has it format an integer into an error
# message (TORCH_CHECK -> c10::str -> std::ostream).
_SELF_TEST = """
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.torchq._set_isa(987654)
except RuntimeError as e:
    print("987654" in str(e))
"""


def check_library(lib: Path) -> None:
    """Raise (and delete ``lib``) unless the freshly built library formats its error
    messages. Seen on a CUDA image whose ``CXX`` was a gcc that links libstdc++ statically:
    the library carried a private copy of the C++ streams, and every kernel error message
    crashed the process (a static libstdc++ here drops the numbers instead). Run in a
    child process because the failure can be a crash."""
    r = subprocess.run([sys.executable, "-c", _SELF_TEST, str(lib)], capture_output=True, text=True, timeout=600)
    if r.returncode == 0 and r.stdout.strip() == "True":
        return
    lib.unlink(missing_ok=True)  # a later process with a fixed compiler rebuilds
    what = f"exit status {r.returncode}" if r.returncode else "its error messages lose their numbers"
    raise RuntimeError(
        f"the C++ kernels built with CXX={os.environ.get('CXX', 'c++')} fail their self-test ({what}): that "
        "compiler's C++ runtime does not match the one PyTorch loaded (e.g. it links libstdc++ statically). "
        "Fix: build with the system compiler, e.g. CXX=g++ (or unset CXX)."
        + (f" Self-test output: {r.stderr.strip()[-300:]}" if r.returncode else "")
    )


def after_load(hook) -> None:
    """Call ``hook()`` once the library is loaded (at once if it already is): registrations
    that need the ops' schemas, e.g. fake implementations (:mod:`torchq.kernels.cpu_ops`)."""
    _AFTER_LOAD.append(hook)
    if _state.get("library"):
        hook()


def _apply_env_isa() -> None:
    env = os.environ.get("TORCHQ_ISA")
    if env:
        set_isa(env.strip().lower())
    tune = os.environ.get("TORCHQ_TUNE")
    if tune:
        apply_tunables(tune)


def apply_tunables(spec: str) -> None:
    """Set kernel tunables from ``"name=value,name=value"`` (the ``TORCHQ_TUNE`` variable):
    e.g. ``onednn_route=1,bf16_emulate=1`` makes this CPU take the routes an AMX or
    AVX512-BF16 host takes (slowly), so a whole test run can check them here."""
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"TORCHQ_TUNE: expected name=integer items separated by commas, got {item!r}")
        torch.ops.torchq._tune(name.strip(), int(value))


def load() -> None:
    """Build (first time) and load the extension, then apply ``TORCHQ_ISA``; raises on
    failure (a bad ``TORCHQ_ISA`` raises every time it is consulted)."""
    with _lock:
        if _state["loaded"]:
            return
        if _state["error"] is not None:
            raise RuntimeError("torchq C++ kernels failed to build earlier") from _state["error"]
        if not _state.get("library"):
            _load()
            _state["library"] = True
        _apply_env_isa()
        _state["loaded"] = True


def available() -> bool:
    """True when the C++ kernels are built and loaded. A failed build warns once and
    returns False ever after (the reference kernels are used). A ``TORCHQ_ISA`` this CPU
    cannot run raises: forcing a path is an explicit request."""
    if _state["loaded"]:
        return True
    if _state["error"] is not None:
        return False
    if not _state.get("library"):
        try:
            with _lock:
                if not _state.get("library"):
                    _load()
                    _state["library"] = True
        except Exception as e:  # noqa: BLE001 - any build/load failure means: use the references
            _state["error"] = e
            warnings.warn(
                f"torchq: building the C++ CPU kernels failed ({type(e).__name__}: {str(e).strip()[:2000]}); "
                "falling back to the plain-PyTorch reference kernels (slow). Set TORCHQ_BUILD_VERBOSE=1 for the "
                "compiler output; a C++ compiler and ninja are needed.",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
    load()
    return True


def build_error() -> Optional[BaseException]:
    """The exception of a failed build, or None."""
    return _state["error"]


def supported_isas() -> list[str]:
    """ISA paths this CPU can run, e.g. ``['scalar', 'avx2']``."""
    load()
    mask = torch.ops.torchq._supported_isas()
    return [name for i, name in enumerate(ISAS) if mask & (1 << i)]


def current_isa() -> str:
    """The ISA path the kernels use now."""
    load()
    return ISAS[torch.ops.torchq._get_isa()]


def set_isa(name: str) -> None:
    """Use ISA path ``name`` from now on (raises if unknown or unsupported here)."""
    if not _state.get("library"):
        load()
    if name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}; choose one of {ISAS} (TORCHQ_ISA)")
    ok = torch.ops.torchq._supported_isas()
    if not ok & (1 << ISAS.index(name)):
        have = [n for i, n in enumerate(ISAS) if ok & (1 << i)]
        raise RuntimeError(f"this CPU does not support the {name!r} kernels (TORCHQ_ISA); supported: {have}")
    torch.ops.torchq._set_isa(ISAS.index(name))


@contextlib.contextmanager
def force_isa(name: str) -> Iterator[None]:
    """Within the block, run the ``name`` ISA path (tests, benchmarks)."""
    load()
    old = current_isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(old)
