"""The one error type for checkpoints that cannot be loaded as they are.

Every torchq loader raises :class:`CheckpointError` for a file that is truncated, whose
header or metadata is corrupt, whose format version is unknown, whose tensors contradict
their metadata (shapes, dtypes, code ranges, non-finite scales) or whose data fails its
checksum. It is a ``ValueError``: code that caught ``ValueError`` keeps working.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """``file: tensor: problem. fix`` - what is wrong, where, and what to do about it."""

    def __init__(self, problem: str, *, file: Optional[str] = None, tensor: Optional[str] = None,
                 fix: str = "re-download or re-save the checkpoint; if it came from an older or newer torchq, "
                 "load it with that version and save it again"):
        self.file, self.tensor, self.problem, self.fix = file, tensor, problem, fix
        where = ": ".join(str(p) for p in (file, tensor) if p)
        super().__init__(f"{where + ': ' if where else ''}{problem}. {fix}" if fix else f"{where}: {problem}")

    def located(self, file: Optional[str] = None, tensor: Optional[str] = None) -> "CheckpointError":
        """The same error with the file / tensor filled in where it was unknown."""
        return CheckpointError(self.problem, file=self.file or file, tensor=self.tensor or tensor, fix=self.fix)
