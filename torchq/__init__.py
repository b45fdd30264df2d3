"""torchq: PyTorch-native low-precision inference for LLMs, CPU first.

Public API::

    import torchq
    report = torchq.quantize_(model, torchq.int4_weight_only(group_size=64))
    torchq.explain(model)
    torchq.save_file(model.state_dict(), "model.safetensors")
"""

from . import kernels  # noqa: F401  (registers reference kernels before any tensor is built)
from .api import LayerReport, QuantizationReport, quantize_
from .configs import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    QuantConfig,
    config_from_dict,
    config_from_json,
    int4_weight_only,
    int8_dynamic_activation_int4_weight,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
    intx_weight_only,
    register_config,
)
from .explain import explain
from .handlers import register_handler
from .serialization import load_file, save_file
from .tensors import AffineQuantizedTensor, TorchqTensor

__version__ = "0.1.0"


def load_gguf(path, **kwargs):
    """A GGUF file as a transformers causal LM with torchq weights (see :mod:`torchq.interop.gguf`).

    Imported lazily: ``import torchq`` does not need ``gguf`` / ``accelerate``.
    """
    from .interop.gguf import load_gguf as _load_gguf

    return _load_gguf(path, **kwargs)


__all__ = [
    "quantize_",
    "QuantizationReport",
    "LayerReport",
    "explain",
    "save_file",
    "load_file",
    "load_gguf",
    "AffineQuantizedTensor",
    "TorchqTensor",
    "QuantConfig",
    "register_config",
    "register_handler",
    "config_from_dict",
    "config_from_json",
    "Int8WeightOnlyConfig",
    "Int4WeightOnlyConfig",
    "IntxWeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "Int8DynamicActivationInt4WeightConfig",
    "int8_weight_only",
    "int4_weight_only",
    "intx_weight_only",
    "int8_dynamic_activation_int8_weight",
    "int8_dynamic_activation_int4_weight",
]
