"""torchq: PyTorch-native low-precision inference for LLMs, CPU first.

Public API::

    import torchq
    report = torchq.quantize_(model, torchq.int4_weight_only(group_size=64))
    torchq.explain(model)
    torchq.save_file(model.state_dict(), "model.safetensors")
    out = torchq.generate(model, input_ids, max_new_tokens=128)  # fused CPU decoding
"""

from torchq._version import __version__
from torchq._compile_cache import tag_compile_caches as _tag_compile_caches
from torchq import kernels  # noqa: F401  (registers reference kernels before any tensor is built)
from torchq.quantize.api import LayerReport, QuantizationReport, quantize_
from torchq.algorithms import (
    AWQ,
    AWQConfig,
    AutoRound,
    AutoRoundConfig,
    GPTQ,
    GPTQConfig,
    HQQ,
    HQQConfig,
    SmoothQuant,
    SmoothQuantConfig,
    calibration_data,
)
from torchq.formats.affine.config import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    int4_weight_only,
    int8_dynamic_activation_int4_weight,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
    intx_weight_only,
)
from torchq.quantize.configs import QuantConfig, config_from_dict, config_from_json, register_config
from torchq.formats.codebook4.config import (
    Codebook4WeightOnlyConfig,
    codebook4_weight_only,
    FP4WeightOnlyConfig,
    NF4WeightOnlyConfig,
    fp4_e2m1,
    fp4_e2m1_bnb,
    fp4_weight_only,
    nf4_weight_only,
)
from torchq.formats.affine import handler as _affine_handler  # noqa: F401  (registers the affine handlers)
from torchq.formats.codebook4 import handler as _codebook4_handler  # noqa: F401  (the NF4 / FP4 handlers)
from torchq.quantize.explain import explain, explain_rows
from torchq.runtime import generate
from torchq.quantize.handlers import register_handler
from torchq.quantize.api import register_after_quantize as _register_after_quantize
from torchq.integrations import install_transformers_hook as _install_transformers_hook
from torchq.integrations import mark_transformers_model as _mark_transformers_model
from torchq.quantize.schemes import config_from_scheme, register_scheme, scheme_names
from torchq.errors import CheckpointError
from torchq.primitives.codebook import register_codebook
from torchq.formats.serialization import load_file, save_file
from torchq.formats import AffineQuantizedTensor, Codebook4Tensor, TorchqTensor


# transformers finds torchq checkpoints (quant_method "torchq") once torchq is imported;
# the registration itself waits until transformers loads its quantizer registry.
_install_transformers_hook()
_tag_compile_caches()  # compiled graphs cached by another torchq are never reused
_register_after_quantize(_mark_transformers_model)


def __getattr__(name: str):
    if name == "TorchqConfig":  # imports transformers' quantizer registry: only when asked for
        from torchq.integrations.transformers import TorchqConfig

        return TorchqConfig
    raise AttributeError(f"module 'torchq' has no attribute {name!r}")


def load_gguf(path, **kwargs):
    """A GGUF file as a transformers causal LM with torchq weights (see :mod:`torchq.interop.gguf`).

    Imported lazily: ``import torchq`` does not need ``gguf`` / ``accelerate``.
    """
    from torchq.interop.gguf import load_gguf as _load_gguf

    return _load_gguf(path, **kwargs)


def from_pretrained(path, **kwargs):
    """A GPTQ / AutoAWQ / compressed-tensors / torchq checkpoint directory or a GGUF file as a
    transformers model on torchq's kernels (see :mod:`torchq.interop.load`)."""
    from torchq.interop.load import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)


def save_pretrained(model, out_dir, format="torchq", **kwargs):
    """Write a torchq-quantized model as torchq, awq-gemm, awq-gemv, gptq or compressed-tensors
    (see :mod:`torchq.interop.save`)."""
    from torchq.interop.save import save_pretrained as _save_pretrained

    return _save_pretrained(model, out_dir, format, **kwargs)


def save_gguf(model, path, **kwargs):
    """Write a Llama-family torchq model as a llama.cpp GGUF file (see :mod:`torchq.interop.gguf_export`)."""
    from torchq.interop.gguf_export import save_gguf as _save_gguf

    return _save_gguf(model, path, **kwargs)


__all__ = [
    "quantize_",
    "save_gguf",
    "from_pretrained",
    "save_pretrained",
    "QuantizationReport",
    "LayerReport",
    "explain",
    "explain_rows",
    "save_file",
    "CheckpointError",
    "load_file",
    "load_gguf",
    "AffineQuantizedTensor",
    "Codebook4Tensor",
    "TorchqTensor",
    "QuantConfig",
    "register_config",
    "register_handler",
    "TorchqConfig",
    "config_from_scheme",
    "register_scheme",
    "scheme_names",
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
    "NF4WeightOnlyConfig",
    "FP4WeightOnlyConfig",
    "nf4_weight_only",
    "fp4_weight_only",
    "fp4_e2m1",
    "fp4_e2m1_bnb",
    "Codebook4WeightOnlyConfig",
    "codebook4_weight_only",
    "register_codebook",
    "calibration_data",
    "GPTQ",
    "GPTQConfig",
    "AWQ",
    "AWQConfig",
    "AutoRound",
    "AutoRoundConfig",
    "HQQ",
    "HQQConfig",
    "SmoothQuant",
    "SmoothQuantConfig",
]
