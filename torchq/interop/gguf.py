"""GGUF import: a llama.cpp ``.gguf`` file as a transformers causal LM with torchq weights.

``load_gguf(path)`` parses the file with torchq's own reader (:mod:`.gguf_reader`: metadata
over a memory map, ~50 ms for SmolLM2 where gguf-py takes ~7 s), builds the transformers config
from the metadata exactly as ``AutoConfig.from_pretrained(dir, gguf_file=name)`` does
(:func:`gguf_config_dict`), builds the model on the meta device and fills it one tensor at a
time from the file's *raw blocks* (views of the mapping, whose pages are dropped again once a
tensor is converted): no float model ever exists. Block types with an exact torchq
equivalent become :class:`AffineQuantizedTensor` weights holding the very same codes and
scales (no dequantize-requantize step):

=====  ======================================  =====================================
GGUF   block of 32 along K                      torchq
=====  ======================================  =====================================
Q4_0   fp16 ``d``, 16 B; ``w = d * (q - 8)``     int4 symmetric [-8, 7], group 32
Q4_1   fp16 ``d``, fp16 ``m``, 16 B; ``d*q + m``  int4 [0, 15], group 32, float zero point
Q8_0   fp16 ``d``, 32 int8; ``w = d * q``        int8 symmetric, group 32
=====  ======================================  =====================================

Nibble order in a GGUF block: element ``j`` is the low nibble of byte ``j``, element
``j + 16`` its high nibble (torchq's canonical packing is converted here). Scales stay in
the file's fp16 (``scale_dtype=torch.float32`` widens them, also exactly).

Llama-family files store the q/k projection rows permuted for llama.cpp's rotary layout;
the inverse is a permutation of whole output rows, applied to the quantized rows. Every
other tensor type (F32 norms, F16, K-quants, ...) is dequantized exactly as transformers
does (``gguf.dequantize`` + its tensor processor) and listed in the import report. A
quantized embedding tied to the LM head is one tensor serving both the lookup and the
linear.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from torchq.errors import CheckpointError
from torchq.formats.affine.tensor import AffineQuantizedTensor
from torchq.interop.gguf_reader import GGUFReader

__all__ = [
    "load_gguf",
    "GGUFFile",
    "gguf_to_hf_names",
    "load_gguf_tokenizer",
    "GGUFImportReport",
    "GGUFTensorReport",
    "BLOCK_FORMATS",
    "decode_blocks",
    "rotary_row_permutation",
    "gguf_config_dict",
]

logger = logging.getLogger("torchq")

GROUP = 32  # every block type mapped here holds 32 weights along K


# ---------------------------------------------------------------------- block formats
@dataclass(frozen=True)
class BlockFormat:
    """How one GGUF block type maps onto an affine torchq weight.

    ``decode(blocks)`` takes the file's bytes viewed as ``(N, K/32, block_bytes)`` uint8 (numpy)
    and returns ``(qdata, scale (N, K/32) fp16, zero (N, K/32) fp16 or None)`` with
    ``qdata`` in the canonical layout of ``scheme``.
    """

    ggml_name: str
    block_bytes: int
    scheme: str
    bits: int
    quant_min: int
    quant_max: int
    zero_point_domain: str
    decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]

    def describe(self) -> str:
        zero = {"none": "symmetric", "float": "float zero point", "int": "int zero point"}[self.zero_point_domain]
        return f"{self.scheme} g{GROUP} [{self.quant_min}, {self.quant_max}] {zero}"


def _fp16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 stored at byte ``offset`` of every block: ``(N, nb)``."""
    return np.ascontiguousarray(blocks[..., offset : offset + 2]).view(np.float16)[..., 0]


def _canonical_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF 4-bit bytes -> torchq canonical packed bytes, same unsigned codes.

    GGUF: byte ``j`` of a block holds element ``j`` (low nibble) and ``j + 16`` (high).
    Canonical: byte ``i`` holds element ``2i`` (low) and ``2i + 1`` (high). Byte pairs
    ``(b0, b1) = (2i, 2i+1)`` are read as one little-endian 16-bit ``v``: output byte ``i``
    is ``(b0 & 0xF) | (b1 & 0xF) << 4`` and byte ``8 + i`` is ``b0 >> 4 | (b1 & 0xF0)``.
    ``(N, nb, 16)`` -> ``(N, nb * 16)``. (numpy: single-threaded elementwise ops are
    ~100x faster than torch's thread pool on a busy 2-core host.)
    """
    v = np.ascontiguousarray(qs).view("<u2")  # (N, nb, 8)
    out = np.empty(qs.shape, dtype=np.uint8)
    out[..., :8] = (v & 0x0F) | ((v >> 4) & 0xF0)
    out[..., 8:] = ((v >> 4) & 0x0F) | ((v >> 8) & 0xF0)
    return out.reshape(qs.shape[0], -1)


def _decode_q4_0(blocks):  # unsigned nibble u: w = d * (u - 8) = d * q with q = u - 8 in [-8, 7]
    return _canonical_nibbles(blocks[..., 2:18]), _fp16(blocks, 0), None


def _decode_q4_1(blocks):  # w = d * u + m
    return _canonical_nibbles(blocks[..., 4:20]), _fp16(blocks, 0), _fp16(blocks, 2)


def _decode_q8_0(blocks):  # w = d * q
    codes = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8)
    return codes.reshape(blocks.shape[0], -1), _fp16(blocks, 0), None


#: GGUF type name -> how it maps losslessly onto torchq. Add an entry to import a new type.
#: ``decode`` returns the canonical ``qdata`` of the scheme's layout (``packed_int4``:
#: unsigned ``q - quant_min`` two per byte; ``plain_int8``: the signed codes).
BLOCK_FORMATS: dict[str, BlockFormat] = {
    f.ggml_name: f
    for f in (
        BlockFormat("Q4_0", 18, "int4_weight_only", 4, -8, 7, "none", _decode_q4_0),
        BlockFormat("Q4_1", 20, "int4_weight_only", 4, 0, 15, "float", _decode_q4_1),
        BlockFormat("Q8_0", 34, "int8_weight_only", 8, -127, 127, "none", _decode_q8_0),
    )
}


def decode_blocks(raw: np.ndarray, ggml_name: str, k: int):
    """``(qdata, scale, zero)`` numpy arrays from ``(N, bytes_per_row)`` uint8 ``ggml_name``
    blocks: ``qdata`` in the torchq canonical layout of the format's scheme, ``scale`` and
    ``zero`` (or ``None``) fp16 ``(N, K/32)`` exactly as stored."""
    fmt = BLOCK_FORMATS[ggml_name]
    if k % GROUP or raw.shape[-1] != k // GROUP * fmt.block_bytes:
        raise ValueError(
            f"{ggml_name} rows of {k} weights take {k // GROUP * fmt.block_bytes} bytes, got {raw.shape[-1]}"
        )
    return fmt.decode(raw.reshape(raw.shape[0], k // GROUP, fmt.block_bytes))


def _quantized_weight(
    raw: np.ndarray,
    ggml_name: str,
    k: int,
    dtype: torch.dtype,
    scale_dtype: torch.dtype,
    rows: Optional[np.ndarray],
) -> AffineQuantizedTensor:
    """The torchq weight holding exactly the codes and scales of the file's blocks.

    The canonical bytes are built directly and handed to ``from_canonical`` (``from_codes``
    would unpack to one code per byte and pack again: the same result, seconds slower on a
    135M model); the tests check ``codes()`` and ``dequantize()`` against gguf-py's decoder.
    """
    fmt = BLOCK_FORMATS[ggml_name]
    qdata, scale, zero = decode_blocks(raw, ggml_name, k)
    qmin = fmt.quant_min
    if fmt.scheme == "int8_weight_only" and qdata.size and int(qdata.min()) < qmin:
        qmin = -128  # llama.cpp writes [-127, 127]; another writer may use the full int8 range
    if rows is not None:
        qdata, scale = qdata[rows], scale[rows]
        zero = zero[rows] if zero is not None else None
    to_scale = {torch.float16: np.float16, torch.float32: np.float32}.get(scale_dtype)
    if to_scale is None:
        raise ValueError(f"scale_dtype must be torch.float16 (as stored) or torch.float32 (exact), got {scale_dtype}")

    def tensor(a: Optional[np.ndarray], dt=None) -> Optional[torch.Tensor]:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a if dt is None else a.astype(dt)))

    return AffineQuantizedTensor.from_canonical(
        dict(qdata=tensor(qdata), scale=tensor(scale, to_scale), zero_point=tensor(zero, to_scale)),
        outer_shape=(qdata.shape[0], k),
        outer_dtype=dtype,
        scheme=fmt.scheme,
        bits=fmt.bits,
        group_size=GROUP,
        quant_min=qmin,
        quant_max=fmt.quant_max,
        zero_point_domain=fmt.zero_point_domain,
        padded_in_features=k,
    )


# ---------------------------------------------------------------------- row permutations
def rotary_row_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary permutation of a q or k projection.

    llama.cpp interleaves the two rotary halves of each head; transformers' loader undoes it
    on the float weight with ``w.reshape(n_head, dim, 2, K).swapaxes(1, 2)``. Rows are never
    split, so the same reorder applies to quantized rows: ``fixed = stored[perm]``.
    """
    if n_rows % (2 * n_head):
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of two rotary halves")
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(n_rows)


def _llama_rows(gguf_name: str, n_rows: int, config) -> Optional[np.ndarray]:
    if ".attn_q." in gguf_name:
        return rotary_row_permutation(n_rows, config.num_attention_heads)
    if ".attn_k." in gguf_name:
        return rotary_row_permutation(n_rows, config.num_key_value_heads)
    return None


def _no_rows(gguf_name: str, n_rows: int, config) -> None:
    return None


#: GGUF architecture -> the row reorder transformers' tensor processor applies to its
#: weights. Architectures whose transformers processor changes nothing need no entry;
#: others (not listed) are dequantized, since their processors may rewrite values.
ROW_PERMUTERS: dict[str, Callable] = {"llama": _llama_rows}


# ---------------------------------------------------------------------- report
@dataclass
class GGUFTensorReport:
    gguf_name: str
    hf_name: str
    ggml_type: str
    action: str  # quantized | float | dequantized | unused
    target: str = ""  # what it became (torchq format or float dtype)
    kind: str = ""  # linear | embedding | norm | ... (the module that holds it)
    note: str = ""  # why it was dequantized


@dataclass
class GGUFImportReport:
    path: str
    architecture: str
    tensors: list[GGUFTensorReport] = field(default_factory=list)
    tied: list[tuple[str, str]] = field(default_factory=list)

    def count(self, ggml_type: Optional[str] = None, action: Optional[str] = None, kind: Optional[str] = None) -> int:
        return sum(
            1
            for t in self.tensors
            if (ggml_type is None or t.ggml_type == ggml_type)
            and (action is None or t.action == action)
            and (kind is None or t.kind == kind)
        )

    def summary(self) -> str:
        groups = collections.Counter((t.action, t.ggml_type, t.target, t.kind) for t in self.tensors)
        parts = []
        for (action, gtype, target, kind), n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
            what = {"quantized": f"-> {target}", "float": f"-> {target}", "dequantized": f"DEQUANTIZED -> {target}",
                    "unused": "unused (no model parameter)"}[action]
            parts.append(f"{n} {gtype} {kind} {what}".replace("  ", " "))
        tied = "".join(f"; {a} tied to {b}" for a, b in self.tied)
        return f"torchq.load_gguf({os.path.basename(self.path)}, {self.architecture}): {len(self.tensors)} tensors: " + (
            ", ".join(parts) + tied
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        for t in self.tensors:
            if t.action in ("dequantized", "unused"):
                lines.append(f"  {t.action}: {t.gguf_name} ({t.ggml_type}) -> {t.hf_name or '-'} ({t.kind}): {t.note}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- config
#: GGUF architectures (or transformers model types) whose config transformers builds with
#: special cases beyond its key table: their config comes from transformers' own reader
_SPECIAL_CONFIG = ("t5", "stablelm", "qwen2moe", "gpt_oss", "gpt-oss", "qwen3moe", "minimax-m2", "minimax_m2",
                   "gemma3", "gemma4", "lfm2", "falcon", "bloom")


def gguf_config_dict(reader: GGUFReader) -> Optional[dict]:
    """The transformers config dict of a GGUF file, or None where transformers special-cases the
    architecture (then ``AutoConfig.from_pretrained(dir, gguf_file=name)`` is the reference).

    The same steps as transformers' ``load_gguf_checkpoint(..., return_tensors=False)["config"]``
    (``modeling_gguf_pytorch_utils``) for the generic architectures: its key table
    ``GGUF_CONFIG_MAPPING`` and defaults, ``mistral`` for a llama file named exactly "mistral",
    ``tie_word_embeddings`` when there is no ``output.weight``, one-element arrays as scalars, and
    the vocabulary size from the token list when no key states it. Tested against it.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    md = reader.metadata
    arch = reader.architecture
    name = md.get("general.name")
    updated = "mistral" if "llama" in arch and name == "mistral" else arch
    if any(x in arch for x in _SPECIAL_CONFIG) or (arch not in GGUF_CONFIG_MAPPING and updated not in GGUF_CONFIG_MAPPING):
        return None
    config: dict = {"tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors)}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}).items():
        config.setdefault(key, value)
    for key in md:
        renamed_key = key.replace(arch, updated)
        prefix, _, config_key = renamed_key.partition(".")
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(config_key, -1) if prefix in GGUF_CONFIG_MAPPING else -1
        if target == -1 or target is None:
            continue
        value = reader.value(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        config[target] = value
    if config.get("model_type") in _SPECIAL_CONFIG:
        return None
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in md:
        config["vocab_size"] = len(md["tokenizer.ggml.tokens"])
    return config


def _config_from_dict(config_dict: dict, path: str):
    from transformers import CONFIG_MAPPING

    config_dict = dict(config_dict)
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"architecture {model_type!r} has no transformers config class", file=path,
                              fix="upgrade transformers, or convert the model to a supported architecture")
    return CONFIG_MAPPING[model_type].from_dict(config_dict, name_or_path=os.path.dirname(path))


# ---------------------------------------------------------------------- loading
class GGUFFile:
    """One GGUF file, parsed once: its transformers config, tensors, tokenizer and model.

    Parsing the metadata of a 100 MB file takes seconds (the vocabulary arrays); keep one
    ``GGUFFile`` to build both a quantized and a float model, or model and tokenizer.
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no GGUF file at {path!r}")
        self.path = os.path.abspath(path)
        self._config = None
        self._reader = None
        self._tokenizer = None

    @property
    def config(self):
        """The transformers config, as ``AutoConfig.from_pretrained(dir, gguf_file=name)`` builds it.

        Built from this file's metadata (:func:`gguf_config_dict`: transformers' own key table,
        without re-parsing the file); architectures that transformers special-cases take
        transformers' own (slow) path."""
        if self._config is None:
            from transformers import AutoConfig

            config_dict = gguf_config_dict(self.reader)
            if config_dict is None:
                directory, name = os.path.split(self.path)
                self._config = AutoConfig.from_pretrained(directory, gguf_file=name)
            else:
                self._config = _config_from_dict(config_dict, self.path)
        return self._config

    @property
    def reader(self) -> GGUFReader:
        """The parsed file (:class:`torchq.interop.gguf_reader.GGUFReader`: metadata, tensor
        table, tensor data as views of a memory map); CheckpointError if it is not a GGUF file."""
        if self._reader is None:
            try:
                self._reader = GGUFReader(self.path)
            except CheckpointError:
                raise
            except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, struct.error) as e:
                raise CheckpointError(f"not a readable GGUF file ({type(e).__name__}: {e})", file=self.path,
                                      fix="the file is truncated or corrupt: re-download it") from e
        return self._reader

    @property
    def architecture(self) -> str:
        return self.reader.architecture

    def tokenizer(self):
        """The tokenizer stored in the file (transformers' GGUF tokenizer conversion), the very
        one ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` returns.

        Where AutoTokenizer would end at its generic ``TokenizersBackend`` (an architecture with
        no tokenizer class of its own, e.g. llama / SmolLM2, and no tokenizer files beside the
        GGUF), that class is built directly: AutoTokenizer first re-reads the whole file with
        gguf-py only to learn the model type (SmolLM2: 12 s of 13)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            directory, name = os.path.split(self.path)
            if _generic_tokenizer_is_autos_choice(self.config, directory):
                from transformers.tokenization_utils_tokenizers import TokenizersBackend

                self._tokenizer = TokenizersBackend.from_pretrained(directory, gguf_file=name)
            else:
                self._tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        return self._tokenizer

    def model(
        self,
        *,
        dtype: torch.dtype = torch.float32,
        keep_quantized: bool = True,
        scale_dtype: torch.dtype = torch.float16,
        **config_overrides,
    ) -> tuple[nn.Module, GGUFImportReport]:
        """``(model, report)``; see :func:`load_gguf`."""
        return _build_model(self, dtype, keep_quantized, scale_dtype, config_overrides)

    def config_with(self, **overrides):
        """The config with transformers-style overrides (``attn_implementation="eager"``,
        ``max_position_embeddings=...``): applied as ``AutoConfig.from_pretrained(..., **overrides)``
        applies them; a key that is neither a config attribute nor a known keyword raises."""
        if not overrides:
            return self.config
        from torchq.interop.checkpoint import reject_unused_overrides

        config, unused = type(self.config).from_dict(self.config.to_dict(), return_unused_kwargs=True, **overrides)
        reject_unused_overrides(self.path, config, unused)
        return config


def _generic_tokenizer_is_autos_choice(config, directory: str) -> bool:
    """True where AutoTokenizer picks ``TokenizersBackend`` for this GGUF config: its model type
    has no registered tokenizer class, the config names none, and no tokenizer file in the
    directory could name one."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    files = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
    return (
        TOKENIZER_MAPPING_NAMES.get(config.model_type) is None
        and getattr(config, "tokenizer_class", None) is None
        and not any(os.path.exists(os.path.join(directory, f)) for f in files)
    )


def load_gguf(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    keep_quantized: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    return_report: bool = False,
    **config_overrides,
):
    """Load a GGUF file as a transformers causal LM (``eval()`` mode).

    ``keep_quantized=True`` maps Q4_0 / Q4_1 / Q8_0 linear and embedding weights onto
    torchq tensors losslessly; ``False`` dequantizes everything (the float model that
    ``from_pretrained(dir, gguf_file=name)`` gives). ``dtype`` is the model's compute
    dtype; ``scale_dtype`` the storage dtype of imported scales (fp16 as in the file, or
    fp32: both exact). Returns the model, or ``(model, GGUFImportReport)`` with
    ``return_report``; the report's summary is also logged (``logging.getLogger("torchq")``)
    and every dequantized tensor gets a warning line. ``config_overrides`` go to the
    transformers config (:meth:`GGUFFile.config_with`).
    """
    model, report = GGUFFile(path).model(dtype=dtype, keep_quantized=keep_quantized, scale_dtype=scale_dtype, **config_overrides)
    return (model, report) if return_report else model


def load_gguf_tokenizer(path: str):
    """The tokenizer stored in a GGUF file."""
    return GGUFFile(path).tokenizer()


_TRIM_EVERY = 8 << 20  # source bytes converted between two heap trims


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; no-op elsewhere).

    Repacking a tensor allocates temporaries (decoded blocks, tile chunks) between the model's
    growing weights; freed, they leave holes that glibc keeps resident (SmolLM2 Q4_1: 35 MB of
    them by the end of a load, a third of the model). ~1 ms per call."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return model.get_submodule(module_name), leaf


def _kind(module: nn.Module, leaf: str) -> str:
    if leaf == "weight" and isinstance(module, nn.Linear):
        return "linear"
    if leaf == "weight" and isinstance(module, nn.Embedding):
        return "embedding"
    kind = type(module).__name__.lower()
    return "norm" if "norm" in kind else kind


def gguf_to_hf_names(model: nn.Module, architecture: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> model parameter name, from gguf-py's name table.

    Same result as transformers' ``get_gguf_hf_weights_map`` for architectures whose tensor
    processor does not rename (that one rebuilds the table once per submodule: ~10 s).
    A parameter is looked up by its full name, then with leading module prefixes dropped.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is None:
        raise NotImplementedError(f"gguf-py has no tensor-name table for architecture {architecture!r}; upgrade gguf")
    table = get_tensor_name_map(arch, n_layers)
    out: dict[str, str] = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        parts = base.split(".")
        for i in range(len(parts)):
            gguf_name = table.get_name(".".join(parts[i:]))
            if gguf_name is not None:
                out.setdefault(f"{gguf_name}.{suffix}", hf_name)
                break
    return out


def _build_model(f: GGUFFile, dtype, keep_quantized, scale_dtype, config_overrides=None):
    try:
        import gguf
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"torchq.load_gguf needs the `gguf` and `accelerate` packages: pip install 'torchq[gguf]' ({e})")

    config, arch = f.config_with(**(config_overrides or {})), f.architecture
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    if arch in ROW_PERMUTERS:
        rows_for = ROW_PERMUTERS[arch]
    elif type(processor) is TensorProcessor:
        rows_for = _no_rows
    else:
        rows_for = None  # transformers rewrites this architecture's tensors: dequantize them all
    if rows_for is None:
        name_map = get_gguf_hf_weights_map(model, processor)
    else:
        name_map = gguf_to_hf_names(model, arch, config.num_hidden_layers)

    report = GGUFImportReport(path=f.path, architecture=arch)
    dtype_name = str(dtype).removeprefix("torch.")
    since_trim = 0
    for tensor in f.reader.tensors:
        gtype = tensor.type_name
        hf_name = name_map.get(tensor.name)
        fmt = BLOCK_FORMATS.get(gtype)
        module, leaf = _owner(model, hf_name) if hf_name else (None, "")
        kind = _kind(module, leaf) if module is not None else ""
        if keep_quantized and fmt is not None and rows_for is not None and kind in ("linear", "embedding"):
            n, k = int(tensor.shape[1]), int(tensor.shape[0])  # ggml lists dims fastest first
            raw = np.asarray(tensor.data, dtype=np.uint8)
            value = _quantized_weight(raw, gtype, k, dtype, scale_dtype, rows_for(tensor.name, n, config))
            entry = GGUFTensorReport(tensor.name, hf_name, gtype, "quantized", fmt.describe(), kind)
        else:
            weights = gguf.dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=name_map, parsed_parameters={"tensors": {}}
            )
            hf_name = name_map.get(result.name)
            if hf_name is None:
                report.tensors.append(GGUFTensorReport(tensor.name, "", gtype, "unused", note="no model parameter"))
                continue
            module, leaf = _owner(model, hf_name)
            kind = _kind(module, leaf)
            value = torch.from_numpy(np.copy(result.weights)).to(dtype)
            if gtype in ("F32", "F16", "BF16"):
                entry = GGUFTensorReport(tensor.name, hf_name, gtype, "float", dtype_name, kind)
            else:
                if not keep_quantized:
                    why = "keep_quantized=False"
                elif fmt is None:
                    why = f"no lossless torchq mapping for {gtype}"
                elif rows_for is None:
                    why = f"transformers rewrites {arch!r} tensors"
                else:
                    why = "not a linear/embedding weight"
                entry = GGUFTensorReport(tensor.name, hf_name, gtype, "dequantized", dtype_name, kind, why)
        tensor.release()  # its pages were copied into the model's own layout
        since_trim += tensor.n_bytes
        if since_trim >= _TRIM_EVERY:
            trim_heap()
            since_trim = 0
        expected = tuple(getattr(module, leaf).shape)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"GGUF tensor {tensor.name} has shape {tuple(value.shape)}, the model expects {expected} for {hf_name}"
            )
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))
        report.tensors.append(entry)

    trim_heap()
    _tie(model, report)
    params = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    missing = [n for n, t in params if t.device.type == "meta"]
    if missing:
        more = " ..." if len(missing) > 8 else ""
        raise ValueError(f"{os.path.basename(f.path)} has no tensor for model parameter(s) {missing[:8]}{more}")
    model.eval()
    logger.info("%s", report.summary())
    for t in report.tensors:
        if t.action == "dequantized" and keep_quantized:
            logger.warning("torchq.load_gguf: dequantized %s (%s): %s", t.gguf_name, t.ggml_type, t.note)
    return model, report


def _tie(model: nn.Module, report: GGUFImportReport) -> None:
    """Tie the LM head to the embedding when the file has no separate output tensor."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight.device.type != "meta":
        return
    head.weight = emb.weight  # the very same Parameter: one tensor serves lookup and linear
    names = {id(m): n for n, m in model.named_modules()}
    report.tied.append((f"{names[id(head)]}.weight", f"{names[id(emb)]}.weight"))
