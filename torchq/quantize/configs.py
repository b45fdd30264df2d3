"""Quantization configs: the base class, the type registry and the JSON round trip.

Each config class registers under a short ``type`` name (:func:`register_config`), so a
config serialized with :meth:`QuantConfig.to_dict` / :meth:`to_json` can be rebuilt by
:func:`config_from_dict` / :func:`config_from_json` (transformers' ``config.json`` holds
it that way). The formats' own configs live with their formats
(:mod:`torchq.formats.affine.config`, :mod:`torchq.formats.codebook4.config`).
"""


from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

__all__ = [
    "QuantConfig",
    "register_config",
    "config_from_dict",
    "config_from_json",
    "config_types",
    "ALLOWED_GROUP_SIZES",
    "PAD_POLICIES",
]

ALLOWED_GROUP_SIZES = (32, 64, 128, 256)
PAD_POLICIES = ("pad", "largest_group")

_CONFIGS: dict[str, type["QuantConfig"]] = {}


def register_config(cls: type["QuantConfig"]) -> type["QuantConfig"]:
    """Class decorator: make ``cls`` rebuildable from its ``type`` name."""
    name = cls.type_name
    if name in _CONFIGS and _CONFIGS[name] is not cls:
        raise ValueError(f"config type {name!r} already registered by {_CONFIGS[name].__qualname__}")
    _CONFIGS[name] = cls
    return cls


def config_types() -> dict[str, type["QuantConfig"]]:
    return dict(_CONFIGS)


@dataclass(frozen=True)
class QuantConfig:
    """Base of all torchq configs. ``version`` changes when a field's meaning changes."""

    type_name: ClassVar[str] = "base"
    version: int = 1

    @classmethod
    def upgrade(cls, d: dict[str, Any]) -> dict[str, Any]:
        """A dict written by an older version of this config, as the current version's fields
        with the same meaning (identity until a config changes a default or a field's meaning)."""
        return d

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.type_name}
        d.update(dataclasses.asdict(self))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def _check_version(self, supported: int = 1) -> None:
        if self.version != supported:
            raise ValueError(
                f"{type(self).__name__} version {self.version} is not supported (this torchq reads version "
                f"{supported}); upgrade torchq"
            )


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    d = dict(d)
    name = d.pop("type", None)
    if name not in _CONFIGS:
        raise ValueError(f"unknown torchq config type {name!r}; known: {sorted(_CONFIGS)}")
    cls = _CONFIGS[name]
    d = cls.upgrade(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}; fields: {sorted(known)}")
    return cls(**d)


def config_from_json(s: str) -> QuantConfig:
    return config_from_dict(json.loads(s))


def _check_group(group_size: Optional[int], allow_none: bool) -> None:
    if group_size is None and allow_none:
        return
    if group_size not in ALLOWED_GROUP_SIZES:
        extra = " or None (per channel)" if allow_none else ""
        raise ValueError(f"group_size must be one of {ALLOWED_GROUP_SIZES}{extra}, got {group_size!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
