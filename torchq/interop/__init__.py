"""Import (and later export) of other quantized formats as torchq tensors.

Each importer maps a foreign format's stored codes and scales onto torchq tensors with
``AffineQuantizedTensor.from_codes`` (no dequantize-requantize round trip). Modules here
import their optional dependencies lazily; ``import torchq`` never needs them.
"""
