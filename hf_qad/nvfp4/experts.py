"""Mixture-of-experts layers: fused 3-D expert tensors and their routers.

transformers 5 stores a MoE layer's experts as one module holding 3-D parameters
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``) next to
a router (``mlp.gate``, a module with a 2-D ``weight`` that is not an ``nn.Linear``). On disk
the experts are still one Linear per expert and projection (``experts.N.gate_proj.weight``, or
Mixtral's ``block_sparse_moe.experts.N.w1.weight``): transformers converts between the two
layouts at load and save with the architecture's weight-conversion mapping.

Serving engines resolve a checkpoint's ``ignore`` / ``exclude_modules`` against the on-disk
names: vLLM's compressed-tensors config looks a FusedMoE layer up by
``<experts prefix>.0.gate_proj`` / ``.0.up_proj`` / ``.0.down_proj`` (``get_moe_method``), and its
ModelOpt config (``is_layer_skipped``) by substring for layers with ``experts`` in their name. So
experts kept in high precision are listed by every on-disk per-expert module name, computed
with transformers' own :func:`~transformers.core_model_loading.revert_weight_conversion`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.core_model_loading import revert_weight_conversion

__all__ = [
    "checkpoint_module_names",
    "checkpoint_slices",
    "experts_listed_by_name",
    "fused_expert_modules",
    "high_precision_moe_names",
    "router_modules",
]

# The projection names vLLM's compressed-tensors MoE lookup appends to a FusedMoE prefix.
_VLLM_EXPERT_PROBES = ("gate_proj", "up_proj", "down_proj")


def _is_fused_experts(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.conv._ConvNd):  # 3-D weights, but not experts
        return False
    # Parameters, or (packed NVFP4 experts) 3-D uint8 buffers in their place.
    tensors = [*module._parameters.values(), *module._buffers.values()]
    return any(tensor is not None and tensor.dim() >= 3 for tensor in tensors)


def fused_expert_modules(model: nn.Module) -> list[str]:
    """Names of the modules holding fused 3-D expert parameters (or their packed NVFP4 buffers), in model order."""
    return [name for name, module in model.named_modules() if _is_fused_experts(module)]


def router_modules(model: nn.Module) -> list[str]:
    """Names of the MoE routers of fused-expert layers: non-Linear siblings of the experts with a 2-D weight.

    ``nn.Linear`` routers (and shared-expert gates) are left to the Linear conversion plan,
    which keeps them by name pattern.
    """
    experts = fused_expert_modules(model)
    parents = {name.rpartition(".")[0] for name in experts}
    routers = []
    for parent in sorted(parents):
        for child_name, child in model.get_submodule(parent).named_children():
            weight = child._parameters.get("weight")
            if not isinstance(child, nn.Linear) and weight is not None and weight.dim() == 2:
                routers.append(f"{parent}.{child_name}" if parent else child_name)
    return routers


def checkpoint_module_names(model: nn.Module, module_name: str) -> list[str]:
    """The module names transformers writes on disk for the parameters of ``module_name``.

    The module's own parameters are run, as meta tensors, through the reverse of the model's
    weight-conversion mapping (what ``save_pretrained`` does), so the names follow the
    architecture: fused experts become one name per expert and projection
    (``experts.3.gate_proj``, Mixtral's ``block_sparse_moe.experts.3.w1``, ...), a router its
    on-disk name (Mixtral's ``block_sparse_moe.gate``).
    """
    module = model.get_submodule(module_name)
    state = {
        f"{module_name}.{name}": torch.empty(param.shape, dtype=param.dtype, device="meta")
        for name, param in module.named_parameters(recurse=False)
    }
    names = revert_weight_conversion(model, state)
    return sorted({key.rpartition(".")[0] for key in names})


def checkpoint_slices(model: nn.Module, key: str, experts: int, rows: int) -> dict[str, tuple[int, slice]]:
    """Where each row of the fused tensor ``key`` (``[experts, rows, ...]``) goes on disk, by transformers' own conversion.

    A ``[experts, rows, 1]`` tensor numbering the rows is run through the reverse of the model's
    weight-conversion mapping (what ``save_pretrained`` applies), so each on-disk tensor it
    yields tells which expert and which rows it holds: for Qwen3-MoE's ``experts.gate_up_proj``,
    ``experts.3.gate_proj.weight`` holds expert 3's first half of the rows. Packed NVFP4 tensors
    are then split the same way, so the export follows each architecture's names.

    Returns:
        ``{on-disk key: (expert, rows)}``, empty when no conversion applies to ``key``.

    Raises:
        ValueError: if the conversion does not give each on-disk tensor a row range of one expert.

    Example:
        >>> # checkpoint_slices(qwen3_moe, "model.layers.0.mlp.experts.gate_up_proj", 4, 64)
        >>> # {"model.layers.0.mlp.experts.0.gate_proj.weight": (0, slice(0, 32)), ...}
    """
    # On the CPU explicitly: while loading, transformers makes the meta device the default one.
    index = torch.arange(experts * rows, device="cpu").view(experts, rows, 1)
    converted = revert_weight_conversion(model, {key: index})
    if list(converted) == [key]:
        return {}
    slices = {}
    for name, tensor in converted.items():
        values = tensor.reshape(-1)
        first = int(values[0])
        expert, start = divmod(first, rows)
        if not torch.equal(values, torch.arange(first, first + values.numel(), device="cpu")) or start + values.numel() > rows:
            raise ValueError(
                f"transformers' weight conversion writes {name} from parts of several experts of {key}; "
                "hf_qad cannot split packed NVFP4 tensors that way."
            )
        slices[name] = (expert, slice(start, start + values.numel()))
    return slices


def high_precision_moe_names(model: nn.Module, kept_experts: list[str]) -> list[str]:
    """``ignore`` / ``exclude_modules`` entries for the routers and for the fused experts kept in high precision.

    Each kept experts module contributes its on-disk per-expert module names and, where those
    are not called ``gate_proj`` / ``up_proj`` / ``down_proj`` (Mixtral's ``w1``/``w3``/``w2``), the
    ``<prefix>.0.gate_proj``-style names vLLM's compressed-tensors MoE lookup probes.
    """
    names = {name for router in router_modules(model) for name in checkpoint_module_names(model, router)}
    for experts in kept_experts:
        on_disk = checkpoint_module_names(model, experts)
        names.update(on_disk)
        prefixes = {name.rsplit(".", 2)[0] for name in on_disk}
        names.update(f"{prefix}.0.{probe}" for prefix in prefixes for probe in _VLLM_EXPERT_PROBES)
    return sorted(names)


def experts_listed_by_name(model: nn.Module, names: list[str]) -> list[str]:
    """The fused experts modules whose on-disk per-expert modules all appear in ``names``.

    How a checkpoint's ``ignore`` list (written by :func:`high_precision_moe_names`) reads back
    as fused experts kept in high precision.
    """
    listed = set(names)
    return [
        experts
        for experts in fused_expert_modules(model)
        if set(checkpoint_module_names(model, experts)) <= listed
    ]
