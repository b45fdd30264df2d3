"""How each linear weight enters the fused decoder: a registration table from the kernel a
weight runs (``weight.kernel``) to the decoder's weight kind, and the spec entry (integers +
the weight's own tensors, never copies of the packed codes) that csrc/decode.cpp reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from torchq.kernels.cpu_codebook4 import CODEBOOK4_KERNELS
from torchq.formats import AffineQuantizedTensor, Codebook4Tensor
from torchq.runtime.errors import UnsupportedModelError

__all__ = ["DecoderWeightKind", "register_decoder_kind", "decoder_kind", "linear_spec", "ACTIVATIONS", "check_activations"]

# Kinds and flags of csrc/decode.cpp (LinKind, LinFlag).
DENSE, INT4, INT8, W4A8, W8A8, CB4 = range(6)
FLAG_ZERO, FLAG_BIAS, FLAG_LUT, FLAG_ACT_SCALE, FLAG_PERM = 1, 2, 4, 8, 16


@dataclass(frozen=True)
class DecoderWeightKind:
    """A weight format the fused decoder runs: its kind number in decode.cpp and a label."""

    kind: int
    label: str


_KINDS: dict[str, DecoderWeightKind] = {}


def register_decoder_kind(kernel_name: str, kind: DecoderWeightKind) -> None:
    """Weights that run kernel ``kernel_name`` enter the decoder as ``kind``."""
    _KINDS[kernel_name] = kind


for _name, _kind in (
    ("cpu.int4_weight_only", DecoderWeightKind(INT4, "int4 weight-only")),
    ("cpu.int8_weight_only", DecoderWeightKind(INT8, "int8 weight-only")),
    ("cpu.intx_weight_only", DecoderWeightKind(INT8, "intx weight-only")),
    ("cpu.w4a8", DecoderWeightKind(W4A8, "W4A8")),
    ("cpu.w8a8", DecoderWeightKind(W8A8, "W8A8")),
):
    register_decoder_kind(_name, _kind)
for _k in CODEBOOK4_KERNELS:
    register_decoder_kind(_k.name, DecoderWeightKind(CB4, f"{_k.scheme} codebook"))


def decoder_kind(weight: torch.Tensor, where: str) -> DecoderWeightKind:
    """The decoder kind of ``weight`` (layer ``where``), or a clear error."""
    if isinstance(weight, (AffineQuantizedTensor, Codebook4Tensor)):
        kind = _KINDS.get(weight.kernel)
        if kind is None:
            raise UnsupportedModelError(
                f"{where}: its weight runs kernel {weight.kernel!r}, which the fused decoder does not run "
                f"(it runs {sorted(_KINDS)}). Build the C++ kernels (torchq.kernels.cpu_ext.available()) or use "
                "model.generate."
            )
        if isinstance(weight, Codebook4Tensor) and weight.double_quant:
            raise UnsupportedModelError(
                f"{where}: double-quantized codebook scales are not supported by the fused decoder; quantize "
                "with double_quant=False or use model.generate"
            )
        return kind
    if type(weight) is not nn.Parameter and type(weight) is not torch.Tensor:
        raise UnsupportedModelError(f"{where}: weights of type {type(weight).__name__} are not supported")
    if weight.dtype != torch.float32:
        raise UnsupportedModelError(
            f"{where}: float weights must be float32 (the decoder computes in fp32), got {weight.dtype}; "
            "call model.float() first or quantize the layer"
        )
    return DecoderWeightKind(DENSE, "fp32 dense")


def _f32(t: torch.Tensor) -> torch.Tensor:
    """fp32 contiguous (no copy when it already is)."""
    return t.detach().to(torch.float32).contiguous()

#: ``activations`` choices of the fused decoder: "auto" keeps every weight's own numerics;
#: "int8" also runs int4 weight-only layers (integer zero point or symmetric) on per-token
#: int8 activations with integer dot products, exactly as W4A8 layers run (same tiled codes).
ACTIVATIONS = ("auto", "int8")


def check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")


def linear_spec(linear: nn.Module, where: str, activations: str = "auto") -> tuple[list[int], list[torch.Tensor], str]:
    """Spec integers, tensors and label of one Linear for csrc/decode.cpp (read_linear)."""
    w = linear.weight
    kind = decoder_kind(w, where)
    float_zero = getattr(w, "zero_point", None) is not None and w.zero_point.dtype != torch.int8
    if activations == "int8" and kind.kind == INT4 and not float_zero:
        kind = DecoderWeightKind(W4A8, "int4 weight-only, int8 activations")
    n, k_in = w.shape
    bias = getattr(linear, "bias", None)
    tensors: list[torch.Tensor] = []
    flags = 0
    if kind.kind == DENSE:
        tensors.append(w.detach().contiguous())
        ints = [kind.kind, k_in, k_in, 0, 0]
    elif isinstance(w, Codebook4Tensor):
        tensors += [w.qdata, w.scale]
        ints = [kind.kind, k_in, w.padded_in_features, w.block_size, 0]
    else:
        tensors += [w.qdata, w.scale]
        if w.zero_point is not None:
            tensors.append(w.zero_point)
            flags |= FLAG_ZERO
        # the int4 layouts store u = q - quant_min; int8 codes are stored as they are (as the ops take them)
        qmin = w.quant_min if kind.kind in (INT4, W4A8) else 0
        ints = [kind.kind, k_in, w.padded_in_features, w.group_size, qmin]
    if bias is not None:
        tensors.append(_f32(bias))
        flags |= FLAG_BIAS
    if kind.kind == CB4:
        tensors.append(w.lut)
        flags |= FLAG_LUT
    act_scale: Optional[torch.Tensor] = getattr(w, "act_scale", None)
    perm: Optional[torch.Tensor] = getattr(w, "perm", None)
    if act_scale is not None:
        tensors.append(_f32(act_scale))
        flags |= FLAG_ACT_SCALE
    if perm is not None:
        tensors.append(perm.detach().to(torch.int64).contiguous())
        flags |= FLAG_PERM
    return ints + [flags], tensors, kind.label
