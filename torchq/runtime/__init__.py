"""Generation runtime: a fused CPU decoder step for Llama-family models
(:func:`generate`, :class:`FusedDecoder`)."""

from .decoder import KV_DTYPES, FusedDecoder
from .generate import generate
from .errors import UnsupportedModelError
from .weights import DecoderWeightKind, register_decoder_kind

__all__ = ["generate", "FusedDecoder", "KV_DTYPES", "UnsupportedModelError", "DecoderWeightKind", "register_decoder_kind"]
