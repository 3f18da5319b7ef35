"""Calibration of static activation global scales for W4A4 NVFP4 layers.

Serving engines quantize activations with per-16-block scales computed at run time,
relative to one *static* global scale per layer (``input_global_scale = 2688 / amax``).
:func:`calibrate` runs a few batches through the model, records each W4A4
:class:`~hf_qad.nvfp4.linear.NVFP4Linear` input's absolute maximum, and sets that scale.
During calibration the weights stay fake-quantized and the activations are left in
high precision, so every layer sees the inputs it will see at inference up to its own
activation rounding.

Fused MoE experts (:class:`~hf_qad.nvfp4.moe.NVFP4Experts`) get one input scale per expert and
projection, from the tokens the router sent to that expert: the gate/up input and the down
input separately. An expert that no calibration token reached gets its layer's largest input
amax over the experts (no coarser than a routed expert's scale would need to be; vLLM quantizes
every expert with the layer's largest amax anyway), and :func:`calibrate` warns with the count.

Example:
    >>> import torch
    >>> from hf_qad.nvfp4.linear import NVFP4Linear
    >>> from hf_qad.nvfp4.calibration import calibrate
    >>> model = torch.nn.Sequential(NVFP4Linear(32, 16))
    >>> _ = calibrate(model, [torch.randn(4, 32) for _ in range(3)])
    >>> model[0].input_calibrated
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

import warnings
from contextlib import ExitStack

import torch
import torch.distributed as dist
import torch.nn as nn

from hf_qad.nvfp4.format import global_scale_from_amax
from hf_qad.nvfp4.linear import NVFP4Linear
from hf_qad.nvfp4.moe import EXPERT_PROJECTIONS, NVFP4Experts

__all__ = ["calibrate", "run_batch"]


def run_batch(model: nn.Module, batch: Any, device: torch.device) -> None:
    """Run ``model`` on one batch: a dict of keyword arguments, a tuple of positional ones, or a tensor."""
    if isinstance(batch, Mapping):
        model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*(v.to(device) if torch.is_tensor(v) else v for v in batch))
    else:
        model(batch.to(device))


@torch.no_grad()
def calibrate(model: nn.Module, dataloader: Iterable[Any], num_batches: int | None = 8) -> dict[str, float]:
    """Set the static input global scale of every W4A4 NVFP4 layer in ``model``.

    Args:
        model: a model containing :class:`NVFP4Linear` layers (and NVFP4Experts).
        dataloader: batches as the model takes them: dicts of keyword arguments
            (e.g. ``input_ids``/``attention_mask``), tuples of positional arguments, or
            single tensors.
        num_batches: how many batches to use; ``None`` uses all of them.

    Returns:
        The recorded input amax of each calibrated layer, by module name; for fused experts
        ``<experts>.gate_up_proj`` and ``<experts>.down_proj``, the largest over their experts. Under
        ``torch.distributed`` the amax is reduced (max) across ranks, so every rank
        ends with the same scales.

    Raises:
        ValueError: if the model has no W4A4 NVFP4 layer, the dataloader is empty, or
            a layer saw no input (it is not reached by the model's forward).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, NVFP4Linear) and m.quantize_activations}
    experts = {name: m for name, m in model.named_modules() if isinstance(m, NVFP4Experts) and m.quantize_activations}
    if not layers and not experts:
        raise ValueError("calibrate() found no NVFP4Linear layer that quantizes activations (W4A4).")
    amax: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            value = args[0].detach().abs().amax().float()
            if not torch.isfinite(value):
                raise ValueError(f"calibration input of '{name}' contains NaN or Inf.")
            amax[name] = torch.maximum(amax[name], value) if name in amax else value

        return hook

    was_training = model.training
    device = next(model.parameters()).device
    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    saved = {name: layer.quantize_activations for name, layer in layers.items()}
    seen = 0
    observed: dict[str, dict[str, torch.Tensor]] = {}
    try:
        model.eval()
        for layer in layers.values():
            layer.quantize_activations = False  # high-precision inputs while observing
        with ExitStack() as stack:
            for name, module in experts.items():
                observed[name] = stack.enter_context(module.observing_inputs())
            for batch in islice(dataloader, num_batches):
                run_batch(model, batch, device)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in layers.items():
            layer.quantize_activations = saved[name]
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate() got an empty dataloader; pass at least one batch.")
    missing = sorted(set(layers) - set(amax))
    missing += [name for name in sorted(experts) if bool((observed[name]["gate_up_proj"] < 0).all())]
    if missing:
        raise ValueError(f"calibration batches never reached these layers: {', '.join(missing)}")

    names = sorted(layers)
    keys = [(name, projection) for name in sorted(experts) for projection in EXPERT_PROJECTIONS]
    # One reduction for all: the Linear layers' amax, then each experts module's [E] per projection
    # (-1 for an expert no token reached; still -1 after the max only if no rank routed one to it).
    stacked = torch.cat([torch.stack([amax[name] for name in names]).reshape(-1).to(device) if names
                         else torch.zeros(0, device=device),
                         *(observed[name][projection].to(device) for name, projection in keys)])  # fmt: skip
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    linear_amax, *expert_amax = stacked.split([len(names), *(experts[name].num_experts for name, _ in keys)])
    recorded = {}
    for name, value in zip(names, linear_amax):
        layer = layers[name]
        layer.input_global_scale.copy_(global_scale_from_amax(value).to(layer.input_global_scale.device))
        layer.input_calibrated = True
        recorded[name] = float(value)
    _set_expert_scales(experts, dict(zip(keys, expert_amax)), recorded)
    return recorded


def _set_expert_scales(
    experts: Mapping[str, NVFP4Experts], amax: Mapping[tuple[str, str], torch.Tensor], recorded: dict[str, float]
) -> None:
    """Set each expert's input scales; an expert no token reached gets its layer's largest amax (with a warning)."""
    unrouted = []
    for name, module in experts.items():
        values = {projection: amax[name, projection] for projection in EXPERT_PROJECTIONS}
        unrouted += [f"{name or 'experts'}[{int(e)}]" for e in (values["gate_up_proj"] < 0).nonzero()[:, 0]]
        for projection, value in values.items():
            recorded[f"{name}.{projection}" if name else projection] = float(value.max())
        module.set_input_amax({projection: torch.where(value < 0, value.max(), value) for projection, value in values.items()})
    if unrouted:
        total = sum(module.num_experts for module in experts.values())
        warnings.warn(
            f"calibration routed no token to {len(unrouted)} of {total} experts ({', '.join(unrouted[:4])}"
            f"{', ...' if len(unrouted) > 4 else ''}): they get their layer's largest input amax. Calibrate on more "
            "(or more varied) batches to give every expert its own input scale.",
            stacklevel=3,
        )
