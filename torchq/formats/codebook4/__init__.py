"""4-bit codebook formats: each code indexes a 16-entry table, times a block's absmax scale
(NF4, FP4 e2m1, bitsandbytes FP4, and any table registered with
:func:`torchq.register_codebook`). The tables themselves are primitives
(:mod:`torchq.primitives.codebook`); ``tensor.py``, ``config.py``, ``handler.py`` and
``reference.py`` are the format; the fused C++ kernel is :mod:`torchq.kernels.cpu_codebook4`."""
