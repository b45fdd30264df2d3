"""The fused decoder: a model's weights handed once to ``torch.ops.torchq.decoder_step``
(csrc/decode.cpp), which then runs a whole step (all layers, the final norm and the LM head)
in one native call and one parallel region.

``FusedDecoder.for_model(model, max_len)`` builds (and caches, per model) the decoder; the
C++ side keeps references to the model's own tensors, so the packed weights are shared, not
copied. The KV cache is a pair of static tensors ``(layers, kv_heads, length, head_dim)``,
fp32 or bf16, written in place."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from torchq.kernels import cpu_ext
from torchq.kernels.numerics import weight_only_route
from torchq.runtime.architecture import DecoderArchitecture, inspect_model, rope_tables
from torchq.runtime.errors import UnsupportedModelError
from torchq.runtime.weights import CB4, DENSE, INT4, INT8, W4A8, check_activations, decoder_kind, linear_spec

__all__ = ["FusedDecoder", "KV_DTYPES"]

SPEC_VERSION = 1
KV_DTYPES = (torch.float32, torch.bfloat16)
_MIN_TABLE = 256
KV_BLOCK = 16  # positions per key block of the cache (csrc/kernel_api.h)
_VOCAB: dict[int, int] = {}  # decoder id -> vocabulary size (fake implementation)
# model -> its decoder; weak, and outside the model so torch.save(model) / deepcopy never see it
_BY_MODEL: "weakref.WeakKeyDictionary[nn.Module, FusedDecoder]" = weakref.WeakKeyDictionary()


def _register_fake() -> None:
    @torch.library.register_fake("torchq::decoder_step")
    def _decoder_step(decoder, x, k_cache, v_cache, pos):  # x: token ids (M,) or hidden states (M, H)
        return x.new_empty((_VOCAB[decoder],), dtype=torch.float32)


cpu_ext.after_load(_register_fake)


def _free(handle: int) -> None:
    _VOCAB.pop(handle, None)
    try:
        torch.ops.torchq._decoder_free(handle)
    except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone
        pass


def _linears(arch: DecoderArchitecture) -> list[nn.Module]:
    out = [arch.lm_head]
    for layer in arch.layers:
        out += [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    return out


def _weights_key(arch: DecoderArchitecture) -> tuple:
    """Identity of every tensor the decoder reads: a swapped weight makes a new decoder."""
    mods = [arch.final_norm, arch.embed] + _linears(arch)
    for layer in arch.layers:
        mods += [layer.input_layernorm, layer.post_attention_layernorm]
    return tuple((id(m.weight), getattr(m, "bias", None) is not None and id(m.bias)) for m in mods)


class _Rows:
    """A weight viewed as a bias-free linear (the embedding's spec entry)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.bias = None


def _embeddable(w: torch.Tensor) -> bool:
    """Whether decode.cpp looks up rows of ``w`` itself (else the embedding module does)."""
    try:
        kind = decoder_kind(w, "embedding").kind
    except UnsupportedModelError:
        return False
    extras = getattr(w, "act_scale", None) is not None or getattr(w, "perm", None) is not None
    return kind in (DENSE, INT4, INT8, W4A8, CB4) and not extras


class FusedDecoder:
    """One model's decoder step as a single native call.

    ``step(ids, k_cache, v_cache, pos)`` embeds ``ids`` (M new tokens at positions
    ``pos .. pos+M-1``), runs every layer writing their keys and values into the caches,
    and returns the fp32 logits (vocab,) of the last position."""

    def __init__(self, model: nn.Module, max_len: int, positions: Optional[int] = None, activations: str = "auto"):
        """``max_len``: positions of the rotary table (the longest cache); ``positions``: the
        positions this run needs (checked against a sliding window; default max_len);
        ``activations``: "auto", or "int8" to run int4 weight-only layers as W4A8 layers run
        (:data:`torchq.runtime.weights.ACTIVATIONS`)."""
        check_activations(activations)
        self.activations = activations
        if not cpu_ext.available():
            raise UnsupportedModelError("the fused decoder needs torchq's C++ kernels, which failed to build")
        arch = inspect_model(model, positions or max_len)
        self.arch = arch
        self.max_len = max_len
        self.embed = arch.embed
        self.weights_key = _weights_key(arch)
        ints = [SPEC_VERSION, len(arch.layers), arch.hidden, arch.heads, arch.kv_heads, arch.head_dim,
                arch.intermediate, arch.vocab, max_len]
        cos, sin = rope_tables(arch, max_len)
        tensors = [cos, sin]
        self.kinds: dict[str, str] = {}
        # numerics of the weight-only layers ("auto" / "exact"): what the precision rule sees
        weight_only_numerics: set[str] = set()

        def add_linear(module: nn.Module, where: str) -> None:
            li, lt, label = linear_spec(module, where, activations)
            ints.extend(li)
            tensors.extend(lt)
            self.kinds[where] = label
            if li[0] in (INT4, INT8, CB4):
                weight_only_numerics.add(getattr(module.weight, "numerics", "auto"))

        for i, layer in enumerate(arch.layers):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                tensors.append(self._norm_weight(norm, f"model.layers.{i}"))
            for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    add_linear(getattr(owner, name), f"model.layers.{i}.{name}")
        tensors.append(self._norm_weight(arch.final_norm, "model.norm"))
        add_linear(arch.lm_head, "lm_head")
        ei, et, self.native_embedding = self._embedding_spec(arch)
        ints += ei
        tensors += et
        self._weight_only_numerics = sorted(weight_only_numerics)
        self.handle = int(torch.ops.torchq._decoder_create(tensors, ints, [arch.eps, arch.scale]))
        _VOCAB[self.handle] = arch.vocab
        self._finalizer = weakref.finalize(self, _free, self.handle)

    def prefill_route(self, rows: int) -> str:
        """``"fused"``, or ``"eager"`` where the precision rule lets this model's weight-only
        layers run bf16 routes at ``rows`` rows (``torch.set_float32_matmul_precision("high")``
        on AMX / AVX512-BF16 hosts: oneDNN's or torchq's bf16 GEMMs, which the fused step does
        not run). The eager prefill then computes what the model's own forward computes."""
        for numerics in self._weight_only_numerics:
            if weight_only_route(torch.float32, rows, numerics) != "fp32":
                return "eager"
        return "fused"

    def prefill_eager(self, model: nn.Module, ids: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Prefill ``ids`` (1-D, from position 0) with the model's own forward and copy its
        keys and values into the fused caches; returns the last position's logits."""
        import inspect

        arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = model(input_ids=ids.reshape(1, -1), use_cache=True, logits_to_keep=1, **{arg: None})
        cache = getattr(out, "cache", None) or out.past_key_values
        layers = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else list(cache)
        n = ids.numel()
        blocks = -(-n // KV_BLOCK)
        for i, (keys, values) in enumerate(layers):
            kv, t = keys[0], keys.shape[-2]  # (kv_heads, T, head_dim), post-RoPE
            if t != n:
                raise RuntimeError(f"the model's cache holds {t} positions after a {n}-token prefill")
            padded = torch.nn.functional.pad(kv, (0, 0, 0, blocks * KV_BLOCK - n))
            blocked = padded.reshape(kv.shape[0], blocks, KV_BLOCK, kv.shape[-1]).transpose(-1, -2)
            view = k_cache[i].view(kv.shape[0], -1, kv.shape[-1], KV_BLOCK)  # keys blocked by 16 positions
            view[:, :blocks] = blocked.to(k_cache.dtype)
            v_cache[i, :, :n] = values[0].to(v_cache.dtype)
        return out.logits[0, -1].float()

    @staticmethod
    def _embedding_spec(arch: DecoderArchitecture) -> tuple[list[int], list[torch.Tensor], bool]:
        """The token embedding looked up inside the step (fp32 rows, or int4 / int8 / codebook
        rows dequantized as the eager lookup does), or (mode 0) by the module in Python."""
        w = arch.embed.weight
        if w is arch.lm_head.weight:
            if _embeddable(w):
                return [1], [], True
            return [0], [], False
        if not _embeddable(w):
            return [0], [], False
        li, lt, _ = linear_spec(_Rows(w), "model.embed_tokens")
        return [2] + li, lt, True

    @staticmethod
    def _norm_weight(norm: nn.Module, where: str) -> torch.Tensor:
        w = norm.weight
        if w.dtype != torch.float32:
            raise UnsupportedModelError(f"{where}: norm weights must be float32, got {w.dtype}; call model.float()")
        return w.detach().contiguous()

    @classmethod
    def for_model(cls, model: nn.Module, max_len: int, activations: str = "auto") -> "FusedDecoder":
        """The model's cached decoder when it covers ``max_len`` positions with the same
        ``activations`` and the model's weights are the same tensors; else a new one (rotary
        table sized to a power of two)."""
        cached: Optional[FusedDecoder] = _BY_MODEL.get(model)
        if cached is not None and cached.max_len >= max_len and cached.activations == activations:
            if cached.weights_key == _weights_key(inspect_model(model, max_len)):
                return cached
        length = max(_MIN_TABLE, 1 << (max_len - 1).bit_length())  # a multiple of KV_BLOCK
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit:
            if max_len > limit:
                raise ValueError(f"{max_len} positions exceed the model's max_position_embeddings ({limit})")
            length = min(length, -(-limit // KV_BLOCK) * KV_BLOCK)  # caches round up to KV_BLOCK
        decoder = cls(model, length, max_len, activations)
        _BY_MODEL[model] = decoder
        return decoder

    def new_cache(self, length: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed static (keys, values) caches of at least ``length`` positions (rounded up to
        a multiple of 16). Their layout is the decoder's own (keys blocked by 16 positions):
        pass them to :meth:`step`, do not read them as (position, head_dim) rows."""
        if dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {KV_DTYPES}, got {dtype}")
        length = -(-length // KV_BLOCK) * KV_BLOCK
        if length > self.max_len:
            raise ValueError(f"a cache of {length} positions exceeds this decoder's {self.max_len}")
        a = self.arch
        shape = (len(a.layers), a.kv_heads, length, a.head_dim)
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    #: stage kinds of :meth:`profile`, in the order of a step
    STAGES = ("embedding", "q|k|v", "rope + cache", "attention", "o_proj", "gate|up", "down_proj", "norm + lm_head")

    def profile(self) -> dict[str, float]:
        """Seconds per stage kind since the previous call (wall time of the team's first
        thread up to each stage's barrier: a stage's share of every step, waits included)."""
        return dict(zip(self.STAGES, torch.ops.torchq._decoder_profile(self.handle)))

    def step(self, ids: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (vocab,) of the last of ``ids`` (1-D LongTensor) at positions ``pos`` onward."""
        ids = ids.reshape(-1)
        if self.native_embedding:
            return torch.ops.torchq.decoder_step(self.handle, ids, k_cache, v_cache, pos)
        with torch.no_grad():
            x = self.embed(ids).to(torch.float32)
        return torch.ops.torchq.decoder_step(self.handle, x, k_cache, v_cache, pos)
