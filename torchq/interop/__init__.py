"""Import and export of other quantized checkpoint formats as torchq tensors.

Each importer maps a foreign format's stored codes and scales onto torchq tensors (no
dequantize-requantize round trip); each exporter writes torchq's codes in the foreign
layout. Modules (one job each; optional dependencies imported lazily, ``import torchq``
never needs them):

* :mod:`.intweight` - :class:`~.intweight.IntWeight`, the unpacked ``(q - z) * s`` weight every
  AWQ/GPTQ/compressed-tensors tensor reduces to, and its lossless torchq mapping;
* :mod:`.bitpack` - int32 word packing (slot order, lowest bits first);
* :mod:`.gptq`, :mod:`.awq`, :mod:`.compressed_tensors` - one format each: per-Linear read/write
  and the ``quantization_config`` its loaders read;
* :mod:`.checkpoint` (lazy shard reader, importer table, meta-skeleton fill), :mod:`.load`
  (``torchq.from_pretrained``), :mod:`.save` (``torchq.save_pretrained``, exporter table);
* :mod:`.gguf` (GGUF import), :mod:`.gguf_export` (``torchq.save_gguf``).
"""
