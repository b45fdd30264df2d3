"""Base class for torchq's quantized weight tensors.

A quantized weight is a *wrapper* tensor subclass: its outer shape and dtype are those of
the float weight it replaces, while the data lives in inner tensors (codes, scales, ...).
Subclasses declare, as class attributes:

* ``tensor_fields``: inner tensors that are always present;
* ``optional_tensor_fields``: inner tensors that may be ``None``;
* ``meta_fields``: non-tensor metadata (ints, strings, tuples): guardable constants for
  ``torch.compile``.

From those, this class derives ``__tensor_flatten__`` / ``__tensor_unflatten__``, detach,
clone and device moves. Ops are served from two registration tables, filled with
:meth:`implements` (aten ops, ``__torch_dispatch__``) and :meth:`implements_function`
(Python-level functions such as ``F.linear``, ``__torch_function__``). An aten op that no
table serves raises ``NotImplementedError`` naming the op and the class: torchq never
dequantizes silently.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

__all__ = ["TorchqTensor"]

aten = torch.ops.aten


class TorchqTensor(torch.Tensor):
    tensor_fields: ClassVar[tuple[str, ...]] = ()
    optional_tensor_fields: ClassVar[tuple[str, ...]] = ()
    meta_fields: ClassVar[tuple[str, ...]] = ()

    # Each subclass gets its own tables (created in __init_subclass__); lookups walk the MRO.
    _dispatch_table: ClassVar[dict] = {}
    _function_table: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._dispatch_table = {}
        cls._function_table = {}

    # ------------------------------------------------------------------ construction
    @staticmethod
    def __new__(cls, *, outer_shape, outer_dtype, device, **_fields):
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(outer_shape), dtype=outer_dtype, device=device, requires_grad=False
        )

    def __init__(self, *, outer_shape, outer_dtype, device, **fields):
        for name in self.tensor_fields + self.optional_tensor_fields + self.meta_fields:
            setattr(self, name, fields.get(name))

    def fields(self) -> dict[str, Any]:
        """All inner tensors and metadata as keyword arguments for the constructor."""
        names = self.tensor_fields + self.optional_tensor_fields + self.meta_fields
        return {n: getattr(self, n) for n in names}

    def _rebuild(self, outer_dtype: Optional[torch.dtype] = None, **changes: Any) -> "TorchqTensor":
        """A new tensor of the same class with some fields replaced."""
        kw = self.fields()
        kw.update(changes)
        first = kw[self.tensor_fields[0]]
        return type(self)(
            outer_shape=self.shape, outer_dtype=outer_dtype or self.dtype, device=first.device, **kw
        )

    def _after_device_change(self) -> "TorchqTensor":
        """Hook run after the inner tensors moved to another device; subclasses re-select kernels."""
        return self

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor], **changes: Any) -> "TorchqTensor":
        mapped = {
            n: (fn(getattr(self, n)) if getattr(self, n) is not None else None)
            for n in self.tensor_fields + self.optional_tensor_fields
        }
        mapped.update(changes)
        return self._rebuild(**mapped)

    # ------------------------------------------------------------------ compile support
    def __tensor_flatten__(self):
        present = [n for n in self.optional_tensor_fields if getattr(self, n) is not None]
        meta = tuple(getattr(self, n) for n in self.meta_fields)
        return list(self.tensor_fields) + present, (meta, tuple(self.shape), self.dtype)

    def _stable_hash_for_caching(self) -> str:
        """Metadata identity for AOTAutograd's cache (the inner tensors are hashed by torch)."""
        names, ctx = self.__tensor_flatten__()
        return f"{type(self).__qualname__}:{names}:{ctx}"

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, ctx, outer_size, outer_stride):
        meta, shape, dtype = ctx
        kw: dict[str, Any] = dict(zip(cls.meta_fields, meta))
        for n in cls.optional_tensor_fields:
            kw[n] = inner_tensors.get(n)
        for n in cls.tensor_fields:
            kw[n] = inner_tensors[n]
        device = inner_tensors[cls.tensor_fields[0]].device
        return cls(outer_shape=shape, outer_dtype=dtype, device=device, **kw)

    # ------------------------------------------------------------------ op tables
    @classmethod
    def implements(cls, ops) -> Callable:
        """Register ``fn(func, types, args, kwargs)`` for aten ops on this class."""
        ops = ops if isinstance(ops, (list, tuple)) else [ops]

        def decorator(fn):
            for op in ops:
                cls._dispatch_table[op] = fn
            _clear_lookup_caches()
            return fn

        return decorator

    @classmethod
    def implements_function(cls, funcs) -> Callable:
        """Register ``fn(func, types, args, kwargs)`` for Python-level torch functions."""
        funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]

        def decorator(fn):
            for f in funcs:
                cls._function_table[f] = fn
            _clear_lookup_caches()
            return fn

        return decorator

    @classmethod
    def _lookup(cls, table: str, func) -> Optional[Callable]:
        cache = cls.__dict__.get("_resolved")
        if cache is None:
            cache = {}
            setattr(cls, "_resolved", cache)
        key = (table, func)
        if key in cache:
            return cache[key]
        impl = cls._lookup_uncached(table, func)
        cache[key] = impl
        return impl

    @classmethod
    def _lookup_uncached(cls, table: str, func) -> Optional[Callable]:
        for klass in cls.__mro__:
            entries = klass.__dict__.get(table)
            if entries is None:
                continue
            if func in entries:
                return entries[func]
            packet = getattr(func, "overloadpacket", None)
            if packet is not None and packet in entries:
                return entries[packet]
        return None

    @classmethod
    def supported_ops(cls) -> list[str]:
        """Names of every op and function this class serves (for error messages and docs)."""
        names = set()
        for klass in cls.__mro__:
            for table in ("_dispatch_table", "_function_table"):
                for k in klass.__dict__.get(table, {}):
                    names.add(getattr(k, "__name__", str(k)))
        return sorted(names)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = cls._lookup("_function_table", func)
        if impl is not None:
            return impl(func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = cls._lookup("_dispatch_table", func)
        if impl is None:
            raise NotImplementedError(
                f"{cls.__name__} does not support {func} (no silent dequantize). "
                f"Call .dequantize() first if a float result is what you want. "
                f"Supported: {', '.join(cls.supported_ops())}"
            )
        return impl(func, types, args, kwargs)


def _clear_lookup_caches() -> None:
    """Registration may change what a subclass resolves to: drop every resolved-lookup cache."""
    stack = [TorchqTensor]
    while stack:
        klass = stack.pop()
        klass.__dict__.get("_resolved", {}).clear()
        stack.extend(klass.__subclasses__())


# ---------------------------------------------------------------------- shared ops
def _first_subclass_arg(args) -> TorchqTensor:
    for a in args:
        if isinstance(a, TorchqTensor):
            return a
    raise TypeError("expected a torchq tensor argument")


@TorchqTensor.implements([aten.detach.default, aten.alias.default])
def _detach(func, types, args, kwargs):
    self = args[0]
    return return_and_correct_aliasing(func, args, kwargs, self._map_tensors(func))


@TorchqTensor.implements(aten.clone.default)
def _clone(func, types, args, kwargs):
    self = args[0]
    return return_and_correct_aliasing(func, args, kwargs, self._map_tensors(lambda t: t.clone()))


def _moved(self: "TorchqTensor", out: "TorchqTensor", device, dtype) -> "TorchqTensor":
    """Finish a copy/move: set the outer dtype and let the class re-pick its kernel when
    the device changed (a kernel chosen for one device may not run on another)."""
    if dtype is not None and dtype != self.dtype:
        if not dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__} can only be cast to a floating dtype, got {dtype}")
        out = out._rebuild(outer_dtype=dtype)
    if device is not None and torch.device(device) != self.device:
        out = out._after_device_change()
    return out


@TorchqTensor.implements(aten._to_copy.default)
def _to_copy(func, types, args, kwargs):
    """``.to(device)`` moves inner tensors; ``.to(dtype)`` changes the outer (compute) dtype only."""
    self = args[0]
    device = kwargs.get("device")
    moved = self._map_tensors(lambda t: t.to(device) if device is not None else t.clone())
    return _moved(self, moved, device, kwargs.get("dtype"))


@TorchqTensor.implements(aten.empty_like.default)
def _empty_like(func, types, args, kwargs):
    """Same class and format with uninitialized inner tensors: what ``Module.to_empty``
    (meta-device skeleton -> real device) needs. Load a checkpoint into it afterwards."""
    self = args[0]
    device = kwargs.get("device")
    out = self._map_tensors(lambda t: torch.empty_like(t, device=device if device is not None else t.device))
    return _moved(self, out, device, kwargs.get("dtype"))


@TorchqTensor.implements([aten.is_same_size.default])
def _is_same_size(func, types, args, kwargs):
    return tuple(args[0].shape) == tuple(args[1].shape)


@TorchqTensor.implements_function(torch.Tensor.requires_grad_)
def _requires_grad_(func, types, args, kwargs):
    """Quantized weights are frozen: ``requires_grad_(True)`` (e.g. from ``nn.Parameter``)
    is accepted and ignored so that assign-loading into a float model keeps the weight out
    of autograd. Train adapters on top instead."""
    return args[0]
