"""compressed-tensors checkpoints (llm-compressor, vLLM): ``pack-quantized`` (W4A16 and
other weight-only int) and ``int-quantized`` / ``naive-quantized`` (W8A8 int8), checked
against compressed-tensors 0.20 ``compressors/pack_quantized`` and ``quantization``.

Codes are *signed* (``[-2**(b-1), 2**(b-1) - 1]``, also for asymmetric weights) and
``w = (q - zp) * scale`` (zero point absent when symmetric):

* ``pack-quantized``: ``weight_packed`` int32 ``(N, ceil(K*b/32))`` holding ``q + 2**(b-1)``,
  packed densely along K lowest bits first (K padded to a multiple of 32 elements with
  zeros, then the unused words dropped); ``weight_shape`` int64 ``[N, K]``; ``weight_scale``
  ``(N, G)`` (``(N, 1)`` per channel) in the model's float dtype; ``weight_zero_point`` only if
  asymmetric: ``zp + 2**(b-1)`` packed along dim 0 (N), int32 ``(ceil(N*b/32), G)``;
  ``weight_g_idx`` (K,) in files written with the since-removed ``actorder: "group"``.
* ``int-quantized``: ``weight`` int8 ``(N, K)`` signed codes, ``weight_scale``, unpacked int8
  ``weight_zero_point`` if asymmetric. With ``input_activations`` int8 dynamic per token
  (W8A8), imported as torchq ``w8a8``.

``config.json`` ``quantization_config``: ``quant_method: "compressed-tensors"``, ``format``,
``config_groups`` (each: ``targets``, ``weights`` {num_bits, type, symmetric, strategy,
group_size, actorder}, ``input_activations``) and ``ignore``; targets/ignore match a module
by exact name, ``re:`` regex (``re.match``) or class name, as the library does.
compressed-tensors 0.20 rejects groups that do not divide K and act-order groups, so the
export refuses those with an error naming the format that holds them (gptq).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

import torch

from torchq.interop.bitpack import pack_int32, per_word, unpack_int32
from torchq.interop.intweight import IntWeight, bytes_as_words, words_as_bytes

__all__ = [
    "read_ct",
    "write_ct",
    "ct_config",
    "match_target",
    "scheme_for",
    "FORMATS",
    "weight_args",
    "activation_is_int8_token",
]

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")


def match_target(name: str, module_class_names: tuple[str, ...], target: str) -> bool:
    """compressed-tensors' rule: ``re:`` prefix -> ``re.match`` on the name, else exact name or class name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in module_class_names


def scheme_for(name: str, class_names: tuple[str, ...], qcfg: Mapping) -> Optional[Mapping]:
    """The config group that quantizes module ``name`` (None: ignored or not targeted)."""
    if any(match_target(name, class_names, t) for t in qcfg.get("ignore") or ()):
        return None
    for group in (qcfg.get("config_groups") or {}).values():
        if any(match_target(name, class_names, t) for t in group.get("targets") or ()):
            return group
    return None


def activation_is_int8_token(group: Mapping) -> bool:
    """True for W8A8-style dynamic per-token int8 activations (torchq's w8a8 / w4a8)."""
    act = group.get("input_activations")
    if not act:
        return False
    if act.get("type", "int") != "int" or int(act.get("num_bits", 8)) != 8 or act.get("strategy") != "token":
        raise ValueError(
            f"compressed-tensors input_activations {dict(act)} are not supported; torchq runs dynamic per-token "
            "int8 activations (strategy 'token', num_bits 8, type int) or none"
        )
    return True


def _unpack_dense(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    return unpack_int32(words, bits, dim).narrow(dim, 0, count)


def _pack_dense(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    p = per_word(bits)
    n = q.shape[dim]
    pad = -n % 32
    if pad:
        q = torch.nn.functional.pad(q.movedim(dim, -1), (0, pad)).movedim(-1, dim)
    words = pack_int32(q, bits, dim)
    return words.narrow(dim, 0, -(-n * bits // 32)).contiguous()


def read_ct(get: Callable[[str], torch.Tensor], prefix: str, group: Mapping, fmt: str) -> IntWeight:
    """The :class:`IntWeight` of compressed-tensors linear ``prefix`` quantized by config ``group``."""
    args = group.get("weights") or {}
    if args.get("type", "int") != "int":
        raise ValueError(f"{prefix}: compressed-tensors {args.get('type')} weights have no torchq integer form")
    bits = int(args.get("num_bits", 8))
    half = 2 ** (bits - 1)
    sym = bool(args.get("symmetric", True))
    scale = get(f"{prefix}.weight_scale")
    q = packed4 = None
    if fmt == "pack-quantized":
        n, k = (int(v) for v in get(f"{prefix}.weight_shape").tolist())
        words = get(f"{prefix}.weight_packed")
        if bits == 4:  # sequential nibbles, low first: the words' bytes are torchq's byte order
            packed4 = words_as_bytes(words)[:, : -(-k // 2)]
        else:
            q = _unpack_dense(words, bits, k, 1)
    elif fmt in ("int-quantized", "naive-quantized"):
        raw = get(f"{prefix}.weight")
        if raw.dtype != torch.int8:
            raise ValueError(f"{prefix}: {fmt} weight must be int8 codes, got {raw.dtype}")
        n, k = raw.shape
        q = raw.to(torch.int32) + half
    else:
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (supported: {list(FORMATS)})")
    if scale.dim() == 0 or scale.numel() == 1:  # per tensor: one scale for every row
        scale = scale.reshape(1, 1).expand(n, 1)
    scale = scale.reshape(n, -1)
    if scale.dtype == torch.bfloat16:
        scale = scale.float()  # exact; torchq keeps fp16 or fp32 scales
    groups = scale.shape[1]
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "channel")
    g = int(args["group_size"]) if strategy == "group" else k
    if groups != -(-k // g):
        raise ValueError(f"{prefix}: weight_scale has {groups} groups per row, strategy {strategy!r} with K={k} needs {-(-k // g)}")
    zero = None
    if not sym:
        zp = get(f"{prefix}.weight_zero_point")
        if fmt == "pack-quantized":  # stored zp + 2**(b-1): already the unsigned zero
            zero = _unpack_dense(zp, bits, n, 0).reshape(n, groups)
        else:
            zero = zp.to(torch.int32).reshape(n, groups) + half
    g_idx = None
    try:
        g_idx = get(f"{prefix}.weight_g_idx").long()
    except KeyError:
        pass
    w = IntWeight(q.contiguous() if q is not None else None, scale.contiguous(), zero, bits, g, g_idx, packed4, k)
    w.validate(prefix)
    return w


def weight_args(w: IntWeight) -> dict:
    """The ``weights`` quantization args describing ``w``."""
    per_channel = w.group_size == w.shape[1]
    return {
        "num_bits": w.bits,
        "type": "int",
        "symmetric": w.zero is None,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else w.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "block_structure": None,
    }


_INT8_TOKEN = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "strategy": "token",
    "dynamic": True,
    "group_size": None,
    "actorder": None,
    "observer": None,
    "block_structure": None,
}


def write_ct(w: IntWeight, prefix: str, fmt: str) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one linear in format ``fmt``."""
    n, k = w.shape
    if w.g_idx is not None:
        raise ValueError(
            f"{prefix}: act-order (g_idx) weights cannot be written as compressed-tensors (0.20 removed "
            "actorder='group'); export them with format='gptq'"
        )
    if k % w.group_size:
        raise ValueError(
            f"{prefix}: compressed-tensors needs K={k} to be a multiple of group_size={w.group_size}; "
            "export with format='gptq' (which holds a last partial group) or quantize with a group size dividing K"
        )
    half = 2 ** (w.bits - 1)
    out = {f"{prefix}.weight_scale": w.scale.contiguous()}
    if fmt == "pack-quantized":
        out[f"{prefix}.weight_packed"] = bytes_as_words(w.packed()) if w.bits == 4 else _pack_dense(w.codes(), w.bits, 1)
        out[f"{prefix}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if w.zero is not None:
            out[f"{prefix}.weight_zero_point"] = _pack_dense(w.zero, w.bits, 0)
    elif fmt == "int-quantized":
        if w.bits != 8:
            raise ValueError(f"{prefix}: int-quantized holds 8-bit weights, this one has {w.bits} bits")
        out[f"{prefix}.weight"] = (w.codes() - half).to(torch.int8)
        if w.zero is not None:
            out[f"{prefix}.weight_zero_point"] = (w.zero - half).to(torch.int8)
    else:
        raise ValueError(f"cannot write compressed-tensors format {fmt!r} (supported: pack-quantized, int-quantized)")
    return out


def ct_config(groups: Mapping[str, tuple[dict, Optional[dict], list[str]]], ignore: list[str], fmt: str) -> dict:
    """``quantization_config`` from ``{group name: (weights args, input activation args, targets)}``."""
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            name: {
                "targets": targets,
                "weights": wargs,
                "input_activations": act,
                "output_activations": None,
                "format": fmt,
            }
            for name, (wargs, act, targets) in groups.items()
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.0",
    }


INT8_TOKEN_ACTIVATIONS = _INT8_TOKEN
