"""``quantize_``: swap every targeted ``nn.Linear`` weight for a quantized tensor, in place.

Which config a layer gets: ``overrides`` (exact module name first, then the first regex
that fully matches; a ``None`` value skips the layer), else ``config``. ``filter_fn(module,
name)`` returning False skips a layer. Every linear layer ends up in the returned
:class:`QuantizationReport` as quantized, padded, tied or skipped (with the reason); the
report is also logged on the ``torchq`` logger.

Tied weights (one policy): a Linear whose weight is the same Parameter as an
``nn.Embedding``'s (a tied LM head) is quantized once and the *same* quantized tensor is
set on both modules; the embedding then dequantizes only the rows it looks up. The layer
is reported as ``tied`` with the embedding's name. Exclude the head with ``filter_fn`` or
an override of ``None`` to keep both in float.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from torchq.quantize.configs import QuantConfig
from torchq.quantize.layer_plan import LayerReport, QuantizationReport, config_for
from torchq.quantize.handlers import get_handler
from torchq.formats.base import TorchqTensor

__all__ = ["quantize_", "QuantizationReport", "LayerReport"]  # the report classes live in layer_plan

logger = logging.getLogger("torchq")

FilterFn = Callable[[nn.Module, str], bool]


def _tied_embeddings(model: nn.Module) -> dict[int, str]:
    """id(weight) -> name of the nn.Embedding that owns that same weight."""
    out: dict[int, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            out[id(mod.weight)] = name
    return out


def _check_weight(name: str, weight: torch.Tensor) -> Optional[str]:
    """Raise for unusable weights; return a skip reason for empty ones."""
    if not weight.is_floating_point():
        raise TypeError(
            f"layer {name!r}: weight dtype {weight.dtype} is not floating point; torchq quantizes float "
            "weights (load the float checkpoint, or exclude this layer with filter_fn)"
        )
    if weight.numel() == 0:
        return f"empty weight {tuple(weight.shape)}"
    bad = _count_nonfinite(weight) if weight.device.type != "meta" else 0
    if bad:
        raise ValueError(
            f"layer {name!r}: weight has {bad} NaN/Inf value(s); fix the checkpoint or exclude the layer with filter_fn"
        )
    return None


def _count_nonfinite(weight: torch.Tensor, block_bytes: int = 8 * 2**20) -> int:
    """NaN/Inf count, a block of rows at a time (``isfinite`` on a whole weight allocates
    float temporaries of its full size: 189 MB for a 108 MB embedding)."""
    flat = weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(-1, 1)
    rows = max(1, block_bytes // max(1, flat.shape[1] * flat.element_size()))
    return sum(int((~torch.isfinite(block)).sum()) for block in flat.split(rows))


def quantize_(
    model: nn.Module,
    config: Optional[QuantConfig],
    filter_fn: Optional[FilterFn] = None,
    overrides: Optional[Mapping[str, Optional[QuantConfig]]] = None,
    calibration=None,
) -> QuantizationReport:
    """Quantize ``model``'s linear layers in place and return the report.

    Raises if a targeted layer is already quantized (quantize other layers in a second call
    by excluding those with ``filter_fn`` or overrides). Layers whose config is a
    calibration algorithm (``torchq.GPTQ(...)``, ...) are first calibrated on
    ``calibration`` (:mod:`torchq.algorithms.sequential`).
    """
    overrides = dict(overrides or {})
    calibrated: dict[str, LayerReport] = {}
    if calibration is not None or any(getattr(c, "needs_calibration", False) for c in [config, *overrides.values()]):
        if _CALIBRATOR is None:
            raise RuntimeError("calibration needs torchq.algorithms: `import torchq` (it registers the calibrator)")
        calibrated, substitutes = _CALIBRATOR(model, config, calibration, filter_fn, overrides)
        overrides.update(substitutes)
    report = QuantizationReport()
    tied = _tied_embeddings(model)
    modules = dict(model.named_modules())
    done: dict[int, nn.Parameter] = {}
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        if name in calibrated:
            report.layers.append(calibrated[name])
            continue
        matched, cfg = config_for(name, config, overrides)
        if cfg is None:
            report.layers.append(LayerReport(name, "skipped", "-", "override None" if matched else "no config"))
            continue
        if filter_fn is not None and not filter_fn(module, name):
            report.layers.append(LayerReport(name, "skipped", cfg.type_name, "filter_fn"))
            continue
        weight = module.weight
        if id(weight) in done:  # another Linear shares this weight: reuse the quantized one
            module.weight = done[id(weight)]
            report.layers.append(LayerReport(name, "tied", cfg.type_name, "shares a weight quantized above"))
            continue
        if isinstance(weight, TorchqTensor):
            raise ValueError(
                f"layer {name!r} is already quantized ({type(weight).__name__}, {getattr(weight, 'scheme', '?')}); "
                "exclude it with filter_fn or an override of None to quantize other layers"
            )
        reason = _check_weight(name, weight)
        if reason:
            logger.warning("torchq: skipping %s: %s", name, reason)
            report.layers.append(LayerReport(name, "skipped", cfg.type_name, reason))
            continue
        qweight, note = get_handler(cfg)(weight.detach(), cfg)
        param = nn.Parameter(qweight, requires_grad=False)
        status = "padded" if note.startswith("padded") else "quantized"
        if id(weight) in tied:
            emb_name = tied[id(weight)]
            modules[emb_name].weight = param
            status = "tied"
            note = f"shared with embedding {emb_name!r}" + (f"; {note}" if note else "")
        done[id(weight)] = param
        module.weight = param
        report.layers.append(LayerReport(name, status, cfg.type_name, note))
    logger.info("%s", report.summary())
    logger.debug("%s", report)
    for hook in _AFTER_QUANTIZE:
        hook(model, config, report)
    return report


Calibrator = Callable[..., tuple[dict[str, LayerReport], dict[str, QuantConfig]]]
_CALIBRATOR: Optional[Calibrator] = None


def register_calibrator(calibrate: Calibrator) -> None:
    """Install the layer-by-layer calibration driver that :func:`quantize_` hands algorithm
    configs to: ``calibrate(model, config, calibration, filter_fn, overrides)`` returns the
    calibrated layers' reports and the configs that replace the algorithm configs.
    :mod:`torchq.algorithms` registers :func:`torchq.algorithms.sequential.calibrate`, so the
    quantize API needs no import of the layer above it."""
    global _CALIBRATOR
    _CALIBRATOR = calibrate


_AFTER_QUANTIZE: list[Callable[[nn.Module, Optional[QuantConfig], QuantizationReport], None]] = []


def register_after_quantize(hook: Callable[[nn.Module, Optional[QuantConfig], QuantizationReport], None]) -> None:
    """Call ``hook(model, config, report)`` after every :func:`quantize_` (integrations use it,
    e.g. to make a transformers model's ``save_pretrained`` write a torchq checkpoint)."""
    if hook not in _AFTER_QUANTIZE:
        _AFTER_QUANTIZE.append(hook)
