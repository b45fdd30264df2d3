"""Keep torch.compile's on-disk caches from serving graphs built by another torchq.

Inductor's FX-graph and AOTAutograd caches key a compiled graph on the traced program, and
the code a quantized weight runs (``torch.ops.torchq.*`` calls, their arguments) is traced
*through* torchq's Python: a cache written by another torchq version would hand back calls
to ops whose schemas have changed. torchq appends a digest of its own sources to
``torch.compiler.config.cache_key_tag`` (which both caches include in their keys), once, at
import. A tag the user set before importing torchq is kept in front of it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

__all__ = ["source_digest", "tag_compile_caches"]

_PACKAGE = Path(__file__).resolve().parent


def source_digest() -> str:
    """A short hash of every torchq source file (Python and C++), names and contents."""
    h = hashlib.sha256()
    for path in sorted(p for p in _PACKAGE.rglob("*") if p.suffix in (".py", ".cpp", ".h")):
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def tag_compile_caches() -> str:
    """Add ``torchq-<digest>`` to torch.compile's cache key tag (idempotent); returns the tag."""
    tag = f"torchq-{source_digest()}"
    current = torch.compiler.config.cache_key_tag or ""
    if tag not in current:
        torch.compiler.config.cache_key_tag = f"{current}|{tag}" if current else tag
    return tag
