"""GPTQ checkpoints (AutoGPTQ / GPTQModel, ``checkpoint_format`` "gptq" = v1 and "gptq_v2").

Per quantized linear ``prefix``:

* ``qweight`` int32 ``(K * bits / 32, N)``: ``32 / bits`` consecutive input rows per word,
  lowest bits first;
* ``qzeros`` int32 ``(G, N * bits / 32)``: zero points packed along N, lowest bits first.
  v1 stores ``z - 1`` (AutoGPTQ subtracted 1 before packing and adds it back after
  unpacking each field); v2 stores ``z``. Symmetric GPTQ still writes zeros, all ``2**(bits-1)``;
* ``scales`` fp16 ``(G, N)``; ``g_idx`` int32 ``(K,)``: group of each input row (act-order /
  ``desc_act``: not ``k // group_size``); ``G = ceil(K / group_size)``, so a last partial
  group (K=576 at group 128) is normal;
* ``w[:, k] = (q[k] - z[g_idx[k]]) * s[g_idx[k]]``.

``quantization_config`` (config.json, also written as quantize_config.json): ``quant_method:
"gptq"``, ``bits``, ``group_size`` (-1: per channel), ``sym``, ``desc_act``,
``checkpoint_format``. 3-bit packing (fields straddle words) is refused with an error.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from torchq.interop.bitpack import pack_int32, per_word, unpack_int32
from torchq.interop.intweight import IntWeight, bytes_as_words, words_as_bytes

__all__ = ["read_gptq", "write_gptq", "gptq_config", "CHECKPOINT_FORMATS", "TENSOR_NAMES"]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")


def _version(qcfg: Mapping) -> str:
    fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"GPTQ checkpoint_format {fmt!r} is not supported (known: {list(CHECKPOINT_FORMATS)}); "
            "marlin/bitblas repacked checkpoints must be saved in the gptq format first"
        )
    return fmt


def read_gptq(get: Callable[[str], torch.Tensor], prefix: str, qcfg: Mapping) -> IntWeight:
    """The :class:`IntWeight` of GPTQ linear ``prefix``; ``get(name)`` reads one stored tensor."""
    bits = int(qcfg["bits"])
    p = per_word(bits)
    version = _version(qcfg)
    qweight, qzeros, scales = get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales")
    k, n = qweight.shape[0] * p, qweight.shape[1]
    g = int(qcfg.get("group_size", -1))
    g = k if g in (-1, 0) else g
    groups = -(-k // g)
    if tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n // p):
        raise ValueError(
            f"{prefix}: GPTQ tensors do not match bits={bits}, group_size={g}: qweight {tuple(qweight.shape)} "
            f"(K={k}, N={n}) needs scales {(groups, n)} and qzeros {(groups, n // p)}, got "
            f"{tuple(scales.shape)} and {tuple(qzeros.shape)}"
        )
    z = unpack_int32(qzeros, bits, dim=1).t()
    if version == "gptq":
        if bool((z == 2**bits - 1).any()):
            raise ValueError(
                f"{prefix}: a GPTQ v1 zero point is stored as {2**bits - 1} (z - 1 = {2**bits - 1}, z = {2**bits}, "
                "out of range: a v1 writer overflowed on z = 0, and AutoGPTQ and GPTQModel read it differently); "
                "re-export the model with checkpoint_format='gptq_v2'"
            )
        z = z + 1
    g_idx = None
    try:
        g_idx = get(f"{prefix}.g_idx").long()
    except KeyError:
        pass
    if bits == 4:  # a word's bytes hold rows 8r+2b (low nibble) and 8r+2b+1: torchq's byte order
        w = IntWeight(None, scales.t().contiguous(), z.contiguous(), bits, g, g_idx, words_as_bytes(qweight.t()), k)
    else:
        w = IntWeight(unpack_int32(qweight, bits, dim=0).t().contiguous(), scales.t().contiguous(), z.contiguous(), bits, g, g_idx)
    w.validate(prefix)
    return w


def write_gptq(w: IntWeight, prefix: str, qcfg: Mapping) -> dict[str, torch.Tensor]:
    """GPTQ tensors of one linear (``qcfg`` as returned by :func:`gptq_config`)."""
    version = _version(qcfg)
    n, k = w.shape
    p = per_word(w.bits)
    if k % p or n % p:
        raise ValueError(f"{prefix}: GPTQ packs {p} codes per int32: K={k} and N={n} must be multiples of {p}")
    z = w.zeros()
    if version == "gptq":
        if bool((z == 0).any()):
            raise ValueError(
                f"{prefix}: GPTQ v1 stores z - 1 and cannot hold a zero point of 0; "
                "save with checkpoint_format='gptq_v2' (torchq.save_pretrained(..., format='gptq', "
                "checkpoint_format='gptq_v2'))"
            )
        z = z - 1
    return {
        f"{prefix}.qweight": bytes_as_words(w.packed()).t().contiguous() if w.bits == 4 else pack_int32(w.codes().t(), w.bits, dim=0),
        f"{prefix}.qzeros": pack_int32(z.t(), w.bits, dim=1),
        f"{prefix}.scales": w.scale.t().contiguous().to(torch.float16),
        f"{prefix}.g_idx": w.group_index().to(torch.int32),
    }


def gptq_config(weights: Mapping[str, IntWeight], checkpoint_format: str = "gptq") -> dict:
    """``quantization_config`` for ``weights`` (one bits/group size for all; -1 = per channel)."""
    _version({"checkpoint_format": checkpoint_format})
    bits = {w.bits for w in weights.values()}
    per_channel = all(w.group_size == w.shape[1] for w in weights.values())
    groups = {-1} if per_channel else {w.group_size for w in weights.values()}
    if len(bits) != 1 or len(groups) != 1:
        raise ValueError(
            f"GPTQ needs one bit width and one group size for all layers; this model has bits {sorted(bits)} and "
            f"group sizes {sorted(groups)}: quantize every linear with the same config"
        )
    sym = all(w.zero is None or bool((w.zero == 2 ** (w.bits - 1)).all()) for w in weights.values())
    desc_act = any(w.g_idx is not None for w in weights.values())
    return {
        "quant_method": "gptq",
        "bits": bits.pop(),
        "group_size": groups.pop(),
        "sym": sym,
        "desc_act": desc_act,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["torchq"]},
    }
