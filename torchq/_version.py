"""torchq's version (its own module, so that subpackages can read it without importing torchq)."""

__version__ = "0.1.0"
