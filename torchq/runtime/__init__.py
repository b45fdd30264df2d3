"""Generation runtime: a fused CPU decoder step for Llama-family models
(:func:`generate`, :class:`FusedDecoder`)."""

from torchq.runtime.decoder import KV_DTYPES, FusedDecoder
from torchq.runtime.generate import generate
from torchq.runtime.errors import UnsupportedModelError
from torchq.runtime.weights import DecoderWeightKind, register_decoder_kind

__all__ = ["generate", "FusedDecoder", "KV_DTYPES", "UnsupportedModelError", "DecoderWeightKind", "register_decoder_kind"]
