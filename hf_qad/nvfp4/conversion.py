"""Model surgery: which Linear layers become NVFP4Linear and which fused experts NVFP4Experts, and replacing them.

Kept apart from the transformers quantizer so that it can be used on any
``nn.Module`` (and tested without loading checkpoints).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers.quantizers.quantizers_utils import should_convert_module

from hf_qad.nvfp4.experts import fused_expert_modules
from hf_qad.nvfp4.format import BLOCK_SIZE
from hf_qad.nvfp4.linear import NVFP4Linear
from hf_qad.nvfp4.moe import NVFP4Experts, unsupported_experts_layout

__all__ = [
    "DEFAULT_MODULES_TO_NOT_CONVERT",
    "FUSED_PROJECTIONS",
    "link_fused_projections",
    "ConversionPlan",
    "plan_conversion",
    "replace_experts",
    "replace_linears",
    "tied_linears",
    "nvfp4_experts",
    "nvfp4_modules",
]

logger = logging.getLogger("hf_qad")

DEFAULT_MODULES_TO_NOT_CONVERT: tuple[str, ...] = (
    "lm_head",
    # MoE routers (Mixtral's block_sparse_moe.gate, Qwen-MoE's mlp.gate), not gate_proj: anchored, since
    # earlier transformers 5 releases (5.20) match a pattern as a bare prefix (".*\.gate" kept every gate_proj).
    r".*\.gate$",
    r".*router",
    r".*shared_expert_gate",
)
"""Patterns left in high precision when ``modules_to_not_convert`` is not given, in
addition to transformers' own defaults (output embeddings and tied weights)."""

FUSED_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)
"""Sibling layers that vLLM fuses into one matmul with a single global scale."""


@dataclass
class ConversionPlan:
    """Which Linear layers to convert, and why the others are left alone."""

    convert: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)
    """Modules of fused 3-D experts that become :class:`~hf_qad.nvfp4.moe.NVFP4Experts`."""
    kept_experts: list[str] = field(default_factory=list)
    """Modules of fused 3-D experts that ``modules_to_not_convert`` keeps in high precision."""

    def log(self) -> None:
        if self.skipped:
            reasons = ", ".join(f"{name} ({why})" for name, why in self.skipped.items())
            logger.info("hf_qad: keeping %d Linear layers in high precision: %s", len(self.skipped), reasons)


def plan_conversion(
    model: nn.Module, modules_to_not_convert: Iterable[str], keep: Mapping[str, str] | None = None
) -> ConversionPlan:
    """Decide which ``nn.Linear`` layers of ``model`` become NVFP4.

    Args:
        model: the model (may live on the meta device).
        modules_to_not_convert: name patterns (transformers' ``should_convert_module``
            rules: prefix at a module boundary, regex, or suffix) kept in high precision.
        keep: exact layer names kept in high precision whatever the patterns say, with the
            reason (e.g. :func:`tied_linears`).

    Fused 3-D experts (transformers 5's MoE layers) that no pattern excludes become
    :class:`~hf_qad.nvfp4.moe.NVFP4Experts` (``plan.experts``), the others are kept
    (``plan.kept_experts``); MoE routers are not ``nn.Linear`` and are never converted.

    Raises:
        ValueError: if fused experts that no pattern excludes have a layout NVFP4Experts does
            not handle (e.g. gpt-oss' transposed experts with biases): silently leaving most of
            the model's weights in BF16 would misstate what the checkpoint is.
    """
    patterns = list(modules_to_not_convert)
    plan = ConversionPlan()
    keep = keep or {}
    for name in fused_expert_modules(model):
        if not should_convert_module(name, patterns):
            plan.kept_experts.append(name)
            continue
        reason = unsupported_experts_layout(model.get_submodule(name))
        if reason is not None:
            raise ValueError(
                f"hf_qad cannot quantize the fused experts {name} ({type(model.get_submodule(name)).__name__}): "
                f"{reason}. Keep them in high precision knowingly with modules_to_not_convert=[..., {name!r}]."
            )
        plan.experts.append(name)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, NVFP4Linear):
            continue
        if name in keep:
            plan.skipped[name] = keep[name]
        elif not should_convert_module(name, patterns):
            plan.skipped[name] = "modules_to_not_convert"
        elif module.in_features % BLOCK_SIZE != 0:
            plan.skipped[name] = f"in_features={module.in_features} is not a multiple of {BLOCK_SIZE}"
        else:
            plan.convert.append(name)
    return plan


def tied_linears(model: nn.Module) -> dict[str, str]:
    """Linear layers whose weight is tied to another parameter (a tied ``lm_head``), with the reason.

    They stay in high precision whatever ``modules_to_not_convert`` says: an NVFP4Linear has no
    ``weight`` parameter to tie in packed form, so a quantized tied ``lm_head`` would give an
    export that neither hf_qad nor compressed-tensors can load.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    found = {}
    for target, source in tied.items():
        for key, other in ((target, source), (source, target)):
            module_name, _, param = key.rpartition(".")
            if param == "weight" and module_name in linears:
                found[module_name] = f"weight tied to {other}"
    return found


def replace_linears(
    model: nn.Module,
    plan: ConversionPlan,
    *,
    quantize_activations: bool,
    scale_method: str = "amax",
    packed: bool = False,
    share_fused_global_scales: bool = True,
    device: torch.device | str | None = "meta",
) -> list[NVFP4Linear]:
    """Replace the planned Linear layers with :class:`NVFP4Linear` (empty, on ``device``).

    The new layers are empty: the caller loads weights (transformers' loader fills
    meta tensors). Fused projections (:data:`FUSED_PROJECTIONS`) under one parent
    share their weight global scale when ``share_fused_global_scales``.
    """
    new_layers: dict[str, NVFP4Linear] = {}
    for name in plan.convert:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        layer = NVFP4Linear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            quantize_activations=quantize_activations,
            scale_method=scale_method,
            packed=packed,
            device=device,
            dtype=old.weight.dtype,
        )
        layer.module_name = name
        setattr(parent, child, layer)
        new_layers[name] = layer
    if share_fused_global_scales:
        link_fused_projections(new_layers)
    return list(new_layers.values())


def replace_experts(
    model: nn.Module,
    plan: ConversionPlan,
    *,
    quantize_activations: bool,
    scale_method: str = "amax",
    packed: bool = False,
    share_fused_global_scales: bool = True,
) -> list[NVFP4Experts]:
    """Replace the planned fused experts with :class:`~hf_qad.nvfp4.moe.NVFP4Experts` (see its
    docstring for why a replacement module), sharing their parameters in fake mode.

    ``share_fused_global_scales`` gives each expert's gate and up halves one weight global scale.
    """
    new_modules = []
    for name in plan.experts:
        layer = NVFP4Experts.from_experts(
            model.get_submodule(name),
            quantize_activations=quantize_activations,
            scale_method=scale_method,
            share_gate_up_global_scale=share_fused_global_scales,
            packed=packed,
        )
        layer.module_name = name
        model.set_submodule(name, layer)
        new_modules.append(layer)
    return new_modules


def link_fused_projections(layers: dict[str, NVFP4Linear]) -> None:
    """Give each group of fused sibling projections one shared weight global scale."""
    for group in FUSED_PROJECTIONS:
        parents = {name.rpartition(".")[0] for name in layers if name.rpartition(".")[2] == group[0]}
        for parent in parents:
            members = [layers.get(f"{parent}.{child}" if parent else child) for child in group]
            present = [layer for layer in members if layer is not None]
            if len(present) > 1:
                NVFP4Linear.share_weight_global_scale(present)


def nvfp4_modules(model: nn.Module) -> dict[str, NVFP4Linear]:
    """All NVFP4Linear layers of ``model`` by name (through peft wrappers too)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, NVFP4Linear)}


def nvfp4_experts(model: nn.Module) -> dict[str, NVFP4Experts]:
    """All NVFP4Experts modules of ``model`` by name (through peft wrappers too)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, NVFP4Experts)}
