"""Fake (meta) implementations and autograd formulas of the ``torch.ops.torchq`` CPU kernels.

The fakes give output shapes and dtypes without computing, so ``torch.compile(fullgraph=True)``
keeps the C++ ops in the graph. They need the ops' schemas (defined in C++ with
``TORCH_LIBRARY``), so importing this module hands :func:`_register` to
:func:`torchq.kernels.cpu_ext.after_load`, which runs it once the library is loaded.
"""

from __future__ import annotations

import torch

from torchq.kernels import cpu_ext

__all__: list[str] = []


def _linear_out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _rows(x: torch.Tensor):
    m = 1
    for s in x.shape[:-1]:
        m = m * s
    return m


# ---------------------------------------------------------------------- autograd
# Gradients flow to the activations (and bias) so that adapters can train on top of a
# quantized model: grad_x = grad_y @ W, with W the dequantized weight recovered from the
# kernel layout. The dynamic-int8 ops (W8A8, W4A8) use the straight-through estimator for
# their activation rounding. The quantized weight itself gets no gradient.
def _weight_from_layout(layout_name: str, qdata, scale, zero_point, group_size: int, quant_min: int, k: int):
    from torchq.primitives.affine import dequantize_affine
    from torchq.kernels import cpu_layouts as L

    codes_of = {"cpu_int4_tile16": L.int4_tile16_codes, "cpu_int8_k16": L.int8_k16_codes,
                "cpu_int8_k4x16": L.int8_k4x16_codes}[layout_name]
    codes = codes_of(qdata).to(torch.int16) + quant_min
    zp = L.untile_params(zero_point)
    domain = "none" if zp is None else ("int" if zp.dtype == torch.int8 else "float")
    w = dequantize_affine(codes, (1, group_size), L.untile_params(scale), zp, domain, torch.float32)
    return w[:, :k]


def _register_linear_autograd(op: str, layout_name: str, has_zero: bool, has_group: bool, has_qmin: bool):
    def setup_context(ctx, inputs, output):
        x, qdata, scale = inputs[:3]
        i = 3
        zero = None
        if has_zero:
            zero, i = inputs[i], i + 1
        bias, i = inputs[i], i + 1
        ctx.group = inputs[i] if has_group else qdata.shape[1]
        i += has_group
        ctx.qmin = inputs[i] if has_qmin else 0
        ctx.zero_present = zero is not None
        ctx.has_bias = bias is not None
        ctx.bias_index = 4 if has_zero else 3
        ctx.x_dtype = x.dtype
        ctx.k = x.shape[-1]
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(qdata, scale, zero)

    def backward(ctx, grad):
        qdata, scale, zero = ctx.saved_tensors
        grads = [None] * ctx.n_inputs
        if ctx.needs_input_grad[0]:
            w = _weight_from_layout(layout_name, qdata, scale, zero, ctx.group, ctx.qmin, ctx.k)
            grads[0] = (grad.float() @ w).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[ctx.bias_index]:
            grads[ctx.bias_index] = grad.reshape(-1, grad.shape[-1]).sum(0)
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _register() -> None:
    """Register the fakes and the autograd formulas (the ops must exist)."""

    @torch.library.register_fake("torchq::int4_linear")
    def _int4_linear(x, qdata, scale, zero_point, bias, group_size, quant_min, allow_bf16=False):
        return _linear_out(x, scale.shape[0])

    @torch.library.register_fake("torchq::int8_linear")
    def _int8_linear(x, qdata, scale, zero_point, bias, group_size, allow_bf16=False):
        return _linear_out(x, scale.shape[0])

    @torch.library.register_fake("torchq::w4a8_linear")
    def _w4a8_linear(x, qdata, scale, zero_point, bias, group_size, quant_min):
        return _linear_out(x, scale.shape[0])

    @torch.library.register_fake("torchq::w8a8_linear")
    def _w8a8_linear(x, qdata, scale, bias):
        return _linear_out(x, scale.shape[0])

    @torch.library.register_fake("torchq::w4a8_int_acc")
    def _w4a8_int_acc(x, qdata, scale, zero_point, group_size, quant_min):
        return x.new_empty((_rows(x), scale.shape[0], scale.shape[1]), dtype=torch.int32)

    @torch.library.register_fake("torchq::w8a8_int_acc")
    def _w8a8_int_acc(x, qdata, scale):
        return x.new_empty((_rows(x), scale.shape[0], 1), dtype=torch.int32)

    @torch.library.register_fake("torchq::codebook4_linear")
    def _codebook4_linear(
        x, qdata, scale, lut, bias, block_size, dq_code=None, dq_absmax=None, dq_offset=None, allow_bf16=False
    ):
        return _linear_out(x, qdata.shape[0])

    @torch.library.register_fake("torchq::quantize_per_token_int8")
    def _quantize_per_token_int8(x):
        m = _rows(x)
        return x.new_empty((m, x.shape[-1]), dtype=torch.int8), x.new_empty((m, 1), dtype=torch.float32)

    _register_linear_autograd("torchq::int4_linear", "cpu_int4_tile16", True, True, True)
    _register_linear_autograd("torchq::int8_linear", "cpu_int8_k16", True, True, False)
    _register_linear_autograd("torchq::w4a8_linear", "cpu_int4_tile16", True, True, True)
    _register_linear_autograd("torchq::w8a8_linear", "cpu_int8_k4x16", False, False, False)


cpu_ext.after_load(_register)
