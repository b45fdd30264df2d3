"""The calibration driver: one decoder layer at a time, quantized outputs feed the next.

For a transformers causal LM whose decoder layers are an ``nn.ModuleList`` at
``model.model.layers`` (Llama, SmolLM2, Qwen2, Mistral, Phi-3): the first layer's inputs
are captured by a forward pre-hook that raises to stop the model there; then for each
layer the algorithm sees a :class:`Block` (the layer, its calibration inputs, its target
linears), quantizes them in place, and the quantized layer's outputs become the next
layer's inputs. Only one layer's activations are held at a time. Runs are under
``torch.inference_mode``; algorithms that need gradients (AutoRound) clone what they use.
An algorithm whose last pass already computed the next layer's inputs leaves them in
``Block.outputs`` and the layer is not run again: the rounded layer's outputs (GPTQ's paused
pass, :mod:`.paused_pass`), or the float layer's (AWQ's statistics pass with
``next_inputs="float"``, as AutoAWQ: the next layer then reads float outputs).

Memory: each layer's last pass drops every item's input once its output exists, the float
model's stream (AutoRound ``target="float"``) likewise, so at most two item-sized hidden
streams are held; after each layer the allocator's free memory goes back to the OS. The
streams are stored in bf16 where the configs ask for it (AutoRound ``stream_dtype``):
:meth:`Block.item` and :meth:`Block.run` give the layer its own dtype back.

Any other ``nn.Module`` that is not a transformers model is calibrated as one block: each
target ``Linear`` from the inputs it sees when the whole module runs on the calibration
items (cheap toy models for tests). A transformers model without ``model.model.layers``
gets a clear error.

Linears outside the decoder layers (an LM head) see no calibration inputs here: they are
rounded to nearest on the storage config, with a warning.

Algorithms register per config type name (:func:`register_algorithm`):
``process(block, names, config, act_scales) -> {local_name: (tensor, note)}``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from torchq.memory import release_free_memory
from torchq.quantize.configs import QuantConfig
from torchq.algorithms.configs import AlgorithmConfig, storage_config
from torchq.algorithms.data import as_model_inputs, check_calibration
from torchq.algorithms.registry import get_algorithm

__all__ = ["Block", "calibrate", "decoder_layers", "capture_layer_inputs", "process_block"]

logger = logging.getLogger("torchq")

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (caught by its caller)."""


@dataclass
class Block:
    """A module to calibrate: ``inputs`` are its ``(args, kwargs)`` per calibration item,
    ``linears`` its target linears by name relative to it, ``prefix`` its name in the model."""

    module: nn.Module
    inputs: list
    linears: dict[str, nn.Linear]
    prefix: str = ""
    sequential: bool = True  # outputs feed a next block (decoder layers)
    meta: dict = field(default_factory=dict)
    outputs: Optional[list] = None  # the next layer's inputs, set by an algorithm whose last pass computed them
    inputs_needed: bool = True  # False while the last config group of a decoder layer runs (see run)
    stream_dtype: Optional[torch.dtype] = None  # hidden states stored in this dtype (None: as computed)
    hidden_dtype: Optional[torch.dtype] = None  # ... and read back in this one (the model's)

    def full_name(self, local: str) -> str:
        return f"{self.prefix}.{local}" if self.prefix else local

    def as_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Stored hidden states ``x`` in the dtype the module reads."""
        return x if self.stream_dtype is None else x.to(self.hidden_dtype)

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states ``x`` in the dtype the streams are stored in."""
        return x if self.stream_dtype is None else x.to(self.stream_dtype)

    def hidden_args(self, args: tuple) -> tuple:
        """``args`` with their first (the stored hidden states) as the module reads it."""
        if self.stream_dtype is not None and args and isinstance(args[0], torch.Tensor):
            return (self.as_hidden(args[0]),) + tuple(args[1:])
        return args

    def item(self, i: int) -> tuple:
        """Item ``i``'s ``(args, kwargs)`` as the module reads them (see :meth:`as_hidden`)."""
        args, kwargs = self.inputs[i]
        return self.hidden_args(args), kwargs

    def run(
        self, hooks: Optional[Mapping[str, Callable[[str, torch.Tensor], None]]] = None, keep: bool = True,
        release_inputs: bool = False,
    ):
        """Run the module on every input; ``hooks[name](name, x)`` sees each target linear's
        input. Returns the outputs (first element of tuple outputs, stored as the streams are:
        :meth:`as_stored`) if ``keep``; without
        ``keep``, a decoder layer's run (``sequential``: each linear called once) stops as soon
        as every hooked linear has seen its input (the Hessian of q/k/v needs the layer's first
        norm only, not its MLP). A plain module runs whole: it may call a linear twice.

        ``release_inputs``: drop each item's hidden states (its first argument) once it has
        run, so the outputs replace them in memory instead of adding to them. Only for the
        last pass over a decoder layer (:attr:`inputs_needed` False): the next layer's inputs
        are built from the outputs and the other arguments (positions, masks), which stay."""
        if release_inputs:
            self.check_release()
        hooks = dict(hooks or {})
        seen: set[str] = set()

        def pre_hook(name, fn, x):
            fn(name, x)
            seen.add(name)
            if not keep and self.sequential and len(seen) == len(hooks):
                raise _Stop

        handles = [
            self.linears[name].register_forward_pre_hook(lambda m, a, _n=name, _f=fn: pre_hook(_n, _f, a[0]))
            for name, fn in hooks.items()
        ]
        outs = []
        try:
            with torch.inference_mode():
                for i in range(len(self.inputs)):
                    args, kwargs = self.item(i)
                    if release_inputs:
                        self.release_input(i)
                    seen.clear()
                    try:
                        out = _first(self.module(*args, **kwargs))
                    except _Stop:
                        continue
                    if keep:
                        outs.append(self.as_stored(out))
        finally:
            for h in handles:
                h.remove()
        return outs

    def check_release(self) -> None:
        """Raise unless this is the last pass over a decoder layer (see :meth:`run`)."""
        if self.inputs_needed or not self.sequential:
            raise RuntimeError("release_inputs: this block's inputs are still needed (not its last pass)")

    def release_input(self, i: int) -> None:
        """Drop item ``i``'s hidden states (its first argument); its other arguments stay."""
        args, kwargs = self.inputs[i]
        if args and isinstance(args[0], torch.Tensor):
            self.inputs[i] = ((None,) + tuple(args[1:]), kwargs)


def decoder_layers(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    """``("model.layers", layers)`` for a transformers causal LM, None for a plain module."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return "model.layers", layers
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel):
        raise ValueError(
            f"{type(model).__name__}: calibration needs the decoder layers as an nn.ModuleList at model.model.layers "
            "(Llama, Qwen2, Mistral, Phi-3, SmolLM2 ...); this model has none. Use a data-free config (HQQ or "
            "round-to-nearest) or calibrate a supported architecture"
        )
    return None


def _share_equal(obj, first):
    """``obj`` with every tensor equal to its counterpart in ``first`` replaced by it."""
    if isinstance(obj, torch.Tensor):
        same = isinstance(first, torch.Tensor) and obj.shape == first.shape and obj.dtype == first.dtype
        return first if same and torch.equal(obj, first) else obj
    if isinstance(obj, (tuple, list)) and type(obj) is type(first) and len(obj) == len(first):
        return type(obj)(_share_equal(o, f) for o, f in zip(obj, first))
    if isinstance(obj, dict) and isinstance(first, dict):
        return {k: _share_equal(v, first[k]) if k in first else v for k, v in obj.items()}
    return obj


def capture_layer_inputs(model: nn.Module, layer: nn.Module, items: list) -> list:
    """``(args, kwargs)`` of ``layer`` for each calibration item (the model stops there).
    An argument equal to the first item's (positions, rotary tables) is the first item's
    tensor, held once instead of per item (33 MB at 128 x 512 tokens on SmolLM2); the
    hidden states are each item's own."""
    captured: list = []

    def hook(module, args, kwargs):
        if captured:
            first_args, first_kwargs = captured[0]
            args = args[:1] + _share_equal(tuple(args[1:]), tuple(first_args[1:]))
            kwargs = _share_equal(kwargs, first_kwargs)
        captured.append((args, kwargs))
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for item in items:
                args, kwargs = as_model_inputs(item)
                kwargs.setdefault("use_cache", False)
                try:
                    model(*args, **kwargs)
                except _Stop:
                    continue
                raise RuntimeError("the model finished without reaching its first decoder layer")
    finally:
        handle.remove()
    return captured


def _targets(model, config, filter_fn, overrides) -> dict[str, AlgorithmConfig]:
    """Linear name -> calibration-needing algorithm config (after overrides and filter_fn)."""
    from torchq.quantize.layer_plan import config_for

    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        _, cfg = config_for(name, config, overrides)
        if not isinstance(cfg, AlgorithmConfig) or not cfg.needs_calibration:
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        out[name] = cfg
    return out


def process_block(block: Block, configs: Mapping[str, AlgorithmConfig]) -> dict[str, tuple[torch.Tensor, str]]:
    """Quantize the block's targets (grouped by config) and set their weights in place."""
    results: dict[str, tuple[torch.Tensor, str]] = {}
    by_config: dict[AlgorithmConfig, list[str]] = {}
    for local in block.linears:
        by_config.setdefault(configs[block.full_name(local)], []).append(local)
    for i, (cfg, names) in enumerate(by_config.items()):
        block.outputs = None  # outputs computed before this group's rounding are stale
        block.inputs_needed = not (block.sequential and i == len(by_config) - 1)
        results.update(get_algorithm(cfg)(block, names, cfg, {}))
    block.inputs_needed = True
    for local, (qweight, _) in results.items():
        block.linears[local].weight = nn.Parameter(qweight, requires_grad=False)
    return results


def _wants_float_targets(config) -> bool:
    while isinstance(config, AlgorithmConfig):
        if getattr(config, "target", None) == "float":
            return True
        config = config.base
    return False


def _stream_dtype(configs) -> Optional[torch.dtype]:
    """The dtype the driver stores the hidden streams in: ``torch.bfloat16`` where the
    calibrating configs ask for bf16 streams (AutoRound ``stream_dtype``), None (as the
    model computes them) where they do not. One stream feeds every layer, so configs that
    disagree raise."""
    wanted = {}
    for c in configs:
        found = "float32"
        inner = c
        while isinstance(inner, AlgorithmConfig):
            found = getattr(inner, "stream_dtype", found)
            inner = inner.base
        wanted.setdefault(found, c.type_name)
    if len(wanted) > 1:
        raise ValueError(
            f"calibration stores one hidden stream for all decoder layers, but the layers' configs ask for "
            f"{' and '.join(f'{d} ({t})' for d, t in sorted(wanted.items()))} streams: give every calibrated layer the same "
            "stream_dtype (only AutoRound offers 'bfloat16')"
        )
    return torch.bfloat16 if "bfloat16" in wanted else None


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def calibrate(
    model: nn.Module,
    config: Optional[QuantConfig],
    calibration,
    filter_fn=None,
    overrides: Optional[Mapping[str, Optional[QuantConfig]]] = None,
):
    """Quantize every linear whose config is a calibration algorithm.

    Returns ``(reports, substitutes)``: :class:`~torchq.quantize.layer_plan.LayerReport` per calibrated
    linear, and ``{name: storage config}`` for targets outside the decoder layers, which
    :func:`torchq.quantize_` then rounds to nearest like any other layer.
    """
    from torchq.quantize.layer_plan import LayerReport

    targets = _targets(model, config, filter_fn, dict(overrides or {}))
    if not targets:
        if calibration is not None:
            logger.warning("torchq: calibration data given but no layer's config uses it; ignored")
        return {}, {}
    items = check_calibration(calibration)
    found = decoder_layers(model)
    reports: dict[str, LayerReport] = {}

    def record(block: Block, results) -> None:
        for local, (_, note) in results.items():
            name = block.full_name(local)
            status = "padded" if "padded" in note else "quantized"
            reports[name] = LayerReport(name, status, targets[name].type_name, note)

    if found is None:
        linears = {n: m for n, m in model.named_modules() if n in targets}
        block = Block(model, [as_model_inputs(s) for s in items], linears, "", sequential=False)
        record(block, process_block(block, targets))
        return reports, {}

    prefix, layers = found
    stream_dtype = _stream_dtype(targets.values())
    inputs = capture_layer_inputs(model, layers[0], items)
    hidden_dtype = next((a[0].dtype for a, _ in inputs if a and isinstance(a[0], torch.Tensor)), None)
    if stream_dtype is not None:
        inputs = [((a[0].to(stream_dtype),) + tuple(a[1:]) if a else a, kw) for a, kw in inputs]
    streams = {"stream_dtype": stream_dtype, "hidden_dtype": hidden_dtype}
    # the float model's stream too, where an algorithm compares with it (AutoRound target="float")
    # (a list of its own: its hidden states are released below while ``inputs`` keeps them)
    float_inputs = list(inputs) if any(_wants_float_targets(c) for c in targets.values()) else None
    for i, layer in _progress(enumerate(layers), len(layers), "torchq calibration"):
        lp = f"{prefix}.{i}"
        linears = {n: m for n, m in layer.named_modules() if f"{lp}.{n}" in targets}
        meta = {"model": model, "index": i}
        if float_inputs is not None:  # this layer's float outputs, before it is rounded; they
            # replace its float inputs in memory (only positions and masks are kept from those)
            meta["float_targets"] = Block(layer, float_inputs, {}, lp, inputs_needed=False, **streams).run(
                release_inputs=True
            )
        block = Block(layer, inputs, linears, lp, meta=meta, **streams)
        if linears:
            record(block, process_block(block, targets))
        if i + 1 < len(layers):
            block.inputs_needed = False  # calibrated: the outputs replace the inputs in memory
            outs = block.outputs if block.outputs is not None else block.run(release_inputs=True)
            block.outputs = None
            inputs = [((out,) + tuple(args[1:]), kwargs) for out, (args, kwargs) in zip(outs, inputs)]
            del outs  # the next layer's inputs hold them (and may release them)
            if float_inputs is not None:
                float_inputs = [
                    ((out,) + tuple(args[1:]), kwargs) for out, (args, kwargs) in zip(meta.pop("float_targets"), float_inputs)
                ]
        # the layer's float weights and its temporaries are free now; the C allocator keeps
        # them in its heap, where they would add up over the layers (AWQ's own memory on
        # SmolLM2 at 128 x 512 tokens: +544 MB without this, +386 MB with it)
        release_free_memory()
        logger.debug("torchq: calibrated %s", lp)
    del inputs, float_inputs
    substitutes = {n: storage_config(c) for n, c in targets.items() if n not in reports}
    for name in substitutes:
        logger.warning(
            "torchq: %s is outside the decoder layers: no calibration inputs reach it there; rounded to nearest "
            "(%s)", name, substitutes[name].type_name,
        )
    return reports, substitutes
