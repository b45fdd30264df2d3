"""Generation runtime: a fused CPU decoder step for Llama-family models
(:func:`generate`, :class:`FusedDecoder`)."""

from .decoder import KV_DTYPES, FusedDecoder
from .generate import generate
from .weights import DecoderWeightKind, UnsupportedModelError, register_decoder_kind

__all__ = ["generate", "FusedDecoder", "KV_DTYPES", "UnsupportedModelError", "DecoderWeightKind", "register_decoder_kind"]
