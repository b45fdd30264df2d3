"""The affine integer formats: ``w = (q - z) * s`` per group (int8, int4, intx, and the
weights of W8A8 / W4A8). ``tensor.py`` is the weight, ``config.py`` the user-facing configs,
``handler.py`` quantizes a float weight, ``reference.py`` the plain-PyTorch kernels,
``init_ops.py`` the in-place init ops transformers calls on quantized weights."""
