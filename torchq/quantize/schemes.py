"""The one vocabulary of scheme names: ``"int4"`` -> a :class:`~torchq.quantize.configs.QuantConfig`.

The command line (``torchq quantize --scheme int4 --group-size 64``) and
``TorchqConfig("int4", group_size=64)`` both resolve names here, so a name means the same
thing everywhere. Names match exactly (no prefixes, no case folding: Intel's extension once
accepted anything starting with ``"fp4"``); an unknown name is an error listing the valid
ones.

This is a registration table: a module that adds a format registers its names with
:func:`register_scheme` when it is imported (the codebook formats register ``nf4``,
``fp4_e2m1`` and ``fp4_e2m1_bnb``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torchq.quantize.configs import QuantConfig
from torchq.formats.affine.config import (
    int4_weight_only,
    int8_dynamic_activation_int4_weight,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
)

__all__ = ["SchemeEntry", "register_scheme", "scheme_names", "scheme_entries", "config_from_scheme"]

@dataclass(frozen=True)
class SchemeEntry:
    """A scheme name, the factory building its config, and one line of help.

    ``factory(**options)`` returns a :class:`QuantConfig`. ``group_size=None`` always means
    "this scheme's default" and is never forwarded, so factories keep their own defaults.
    """

    name: str
    factory: Callable[..., QuantConfig]
    help: str
    takes_group_size: bool = True


_SCHEMES: dict[str, SchemeEntry] = {}


def register_scheme(
    name: str, factory: Callable[..., QuantConfig], help: str, takes_group_size: bool = True
) -> SchemeEntry:
    """Add ``name`` to the vocabulary. Registering the same name twice with a different
    factory is an error (one name, one meaning)."""
    if not name or name != name.strip() or name.lower() != name:
        raise ValueError(f"scheme names are lower-case without spaces, got {name!r}")
    entry = SchemeEntry(name, factory, help, takes_group_size)
    old = _SCHEMES.get(name)
    if old is not None and old.factory is not factory:
        raise ValueError(f"scheme {name!r} is already registered by {old.factory.__module__}.{old.factory.__qualname__}")
    _SCHEMES[name] = entry
    return entry


def scheme_names() -> list[str]:
    """Registered names in registration order (what ``--help``, the demo and error messages list)."""
    return list(_SCHEMES)


def scheme_entries() -> list[SchemeEntry]:
    return [_SCHEMES[n] for n in scheme_names()]


def config_from_scheme(name: str, group_size: Optional[int] = None, **options: Any) -> QuantConfig:
    """The config for scheme ``name`` (exact match), e.g. ``config_from_scheme("int4", group_size=64)``.

    ``group_size=None`` keeps the scheme's default. Extra ``options`` go to the scheme's
    factory (e.g. ``symmetric=True`` for ``int4``); an option the factory does not take is an
    error naming the ones it does.
    """
    if not isinstance(name, str):
        raise TypeError(f"scheme name must be a string, got {type(name).__name__}")
    entry = _SCHEMES.get(name)
    if entry is None:
        valid = ", ".join(scheme_names())
        raise ValueError(f"unknown scheme {name!r}; valid schemes: {valid}")
    kwargs = dict(options)
    if group_size is not None:
        if not entry.takes_group_size:
            raise ValueError(f"scheme {name!r} takes no group size ({entry.help}); drop group_size / --group-size")
        kwargs["group_size"] = group_size
    accepted = _parameters(entry.factory)
    unknown = sorted(set(kwargs) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(f"scheme {name!r} takes no option(s) {unknown}; it takes: {sorted(accepted)}")
    return entry.factory(**kwargs)


def _parameters(fn: Callable) -> Optional[set[str]]:
    """Keyword names ``fn`` accepts, or None if it takes ``**kwargs`` (anything goes)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


register_scheme("int8", int8_weight_only, "int8 weights (per channel, or group-wise with group_size), float activations")
register_scheme("int4", int4_weight_only, "int4 group-wise weights (default group 128, asymmetric), float activations")
register_scheme(
    "w8a8",
    int8_dynamic_activation_int8_weight,
    "int8 per-channel weights, dynamic per-token int8 activations",
    takes_group_size=False,
)
register_scheme(
    "w4a8", int8_dynamic_activation_int4_weight, "int4 group-wise weights, dynamic per-token int8 activations"
)
