"""Integrations with other libraries, registered lazily.

``import torchq`` must make ``AutoModelForCausalLM.from_pretrained(torchq_checkpoint)``
work, but importing transformers' quantizer registry costs seconds (it imports every
quantization backend installed, torchao included) that a user of plain ``nn.Module``s or
of ``torchq --help`` should not pay. So :func:`install_transformers_hook` registers torchq
with transformers at the moment transformers itself imports its quantizer registry
(``transformers.quantizers.auto``, which every ``from_pretrained`` goes through), or at once
if it is already imported. ``torchq.TorchqConfig`` imports the integration directly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["install_transformers_hook", "mark_transformers_model"]

_REGISTRY_MODULE = "transformers.quantizers.auto"


def _register() -> None:
    from torchq.integrations import transformers as _hf  # noqa: F401  (registers on import)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' quantizer registry with the other finders and registers torchq
    right after that module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once: from here on the registry imports normally
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _register()

        loader.exec_module = exec_module
        return spec


def mark_transformers_model(model, config, report) -> None:
    """After ``torchq.quantize_`` on a transformers model: record the quantization on the
    model (``hf_quantizer``, ``config.quantization_config``) so that ``save_pretrained``
    writes a torchq checkpoint that ``from_pretrained`` reloads. Models of other libraries
    are left alone; transformers is never imported here for them."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is None or not isinstance(model, modeling_utils.PreTrainedModel):
        return
    if report.count("skipped") == len(report.layers):
        return
    from torchq.integrations.transformers import TorchqConfig, mark_quantized

    current = getattr(model.config, "quantization_config", None)
    if isinstance(current, TorchqConfig) and getattr(model, "hf_quantizer", None) is not None:
        return  # already a torchq model (quantized while loading, or marked before)
    mark_quantized(model, config)


def install_transformers_hook() -> None:
    """Register torchq's quantizer with transformers now or when transformers loads its registry."""
    if _REGISTRY_MODULE in sys.modules:
        _register()
        return
    if importlib.util.find_spec("transformers") is None:
        return  # transformers is not installed: nothing to integrate with
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
