"""What an hf_qad model writes to disk, and how its ``config.json`` entry is read back.

Two checkpoint kinds, one ``quantization_config`` each:

* the **packed export** (``save_pretrained``, ``push_to_hub``): compressed-tensors'
  ``nvfp4-pack-quantized`` layout, which vLLM and plain transformers + compressed-tensors load
  without hf_qad. Per converted Linear ``<name>``:

  * ``<name>.weight_packed``: uint8 ``[out, in/2]``, two E2M1 codes per byte;
  * ``<name>.weight_scale``: float8_e4m3fn ``[out, in/16]``;
  * ``<name>.weight_global_scale``: float32 ``[1]``, ``2688 / amax`` (a divisor);
  * ``<name>.input_global_scale``: float32 ``[1]``, W4A4 only, from calibration.

  Fused MoE experts (:class:`~hf_qad.nvfp4.moe.NVFP4Experts`) are written per expert under the
  names transformers writes for the architecture (``mlp.experts.3.gate_proj.weight_packed``,
  Mixtral's ``block_sparse_moe.experts.3.w1.weight_packed``, ...), gate and up with their
  expert's shared global scale, as compressed-tensors writes the per-expert Linears of a MoE.

  ``ignore`` names every Linear layer left in high precision (compressed-tensors targets all
  ``Linear`` modules, so an unlisted one would be expected to hold packed weights), the MoE
  routers and the per-expert modules of experts kept in high precision. An
  ``"hf_qad"`` entry records the settings compressed-tensors has no field for (the scale
  method); it is advisory: the compressed-tensors fields decide how the checkpoint loads.
* a **master-weight checkpoint** (:func:`hf_qad.master_weight_checkpoint`, Trainer
  ``save_steps``): ``quant_method: "hf_qad_nvfp4"``, the :class:`NVFP4Config` options with
  ``weights_format: "master"``, and the high-precision weights with calibrated input scales.

The compressed-tensors config is written by hand rather than through compressed-tensors, which
is only a test dependency of hf_qad; the tests compare it with compressed-tensors' own.

transformers writes ``model.config.quantization_config.to_dict()`` into ``config.json``, so the
quantizer puts a :class:`~hf_qad.quantizer.quantizer.SavedQuantizationConfig` there, which asks the
quantizer which of the two kinds is being saved; the user's :class:`NVFP4Config` stays as plain
configuration.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from hf_qad.nvfp4.conversion import nvfp4_experts, nvfp4_modules
from hf_qad.nvfp4.experts import checkpoint_slices
from hf_qad.nvfp4.format import BLOCK_SIZE
from hf_qad.nvfp4.moe import EXPERT_PROJECTIONS, EXPERT_TENSOR_SUFFIXES, NVFP4Experts
from hf_qad.version import __version__
from hf_qad.quantizer.config import NVFP4Config

__all__ = [
    "FORMAT",
    "ExpertSlice",
    "compressed_tensors_config",
    "config_from_compressed_tensors",
    "expert_checkpoint_slices",
    "is_hf_qad_checkpoint",
    "master_weights_config",
    "packed_state_dict",
]

logger = logging.getLogger("hf_qad")

FORMAT = "nvfp4-pack-quantized"
# The oldest compressed-tensors release that reads nvfp4-pack-quantized with
# input_global_scale; written when compressed-tensors is not installed.
_MIN_CT_VERSION = "0.12.0"
# Settings of the advisory "hf_qad" entry that compressed-tensors' own fields do not carry.
_ADVISORY_SETTINGS = ("scale_method", "share_fused_global_scales")


def _quantization_args(dynamic: bool | str, observer: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": BLOCK_SIZE,
        "strategy": "tensor_group",
        "dynamic": dynamic,
        "scale_dtype": "torch.float8_e4m3fn",
    }
    if observer is not None:
        args["observer"] = observer
    return args


def _ct_version() -> str:
    try:
        return importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        return _MIN_CT_VERSION


def compressed_tensors_config(config: NVFP4Config, ignore: Iterable[str]) -> dict[str, Any]:
    """The ``quantization_config`` dict compressed-tensors writes for this scheme.

    Args:
        config: the model's NVFP4 options.
        ignore: exact names of the Linear layers left in high precision.

    Example:
        >>> from hf_qad import NVFP4Config
        >>> ct = compressed_tensors_config(NVFP4Config(scheme="w4a16"), ["lm_head"])
        >>> ct["format"], ct["ignore"], ct["config_groups"]["group_0"]["input_activations"]
        ('nvfp4-pack-quantized', ['lm_head'], None)
    """
    activations = _quantization_args("local", "static_minmax") if config.quantize_activations else None
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _quantization_args(False, None),
                "input_activations": activations,
                "output_activations": None,
                "format": None,
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": sorted(set(ignore)),
        "moe_sparsity_config": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": _ct_version(),
        "hf_qad": {"version": __version__, **config.settings()},
    }


def master_weights_config(config: NVFP4Config) -> dict[str, Any]:
    """The ``quantization_config`` of a master-weight checkpoint: the options, ``weights_format="master"``."""
    return {**config.to_dict(), "weights_format": "master"}


def is_hf_qad_checkpoint(quantization_config: Mapping[str, Any]) -> bool:
    """Whether a compressed-tensors config was written by hf_qad."""
    return quantization_config.get("format") == FORMAT and isinstance(quantization_config.get("hf_qad"), dict)


def _nvfp4_group(quantization_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The one config group of an NVFP4 compressed-tensors config, checked."""
    groups = quantization_config.get("config_groups") or {}
    if quantization_config.get("format") != FORMAT or len(groups) != 1:
        raise ValueError(
            f"not an NVFP4 checkpoint hf_qad can load: expected compressed-tensors format {FORMAT!r} with one "
            f"config group, got format {quantization_config.get('format')!r} with {len(groups)} groups."
        )
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    if (weights.get("num_bits"), weights.get("type"), weights.get("group_size")) != (4, "float", BLOCK_SIZE):
        raise ValueError(
            f"not NVFP4 weights: the config group quantizes weights as {weights.get('num_bits')}-bit "
            f"{weights.get('type')} in groups of {weights.get('group_size')} (NVFP4 is 4-bit float, groups of 16)."
        )
    return group


def config_from_compressed_tensors(quantization_config: Mapping[str, Any]) -> NVFP4Config:
    """The :class:`NVFP4Config` (``weights_format="packed"``) that loads an NVFP4 compressed-tensors checkpoint.

    The compressed-tensors fields are the source of truth: the scheme comes from whether the
    config group quantizes input activations, and the layers kept in high precision are exactly
    ``ignore``. The ``"hf_qad"`` entry only adds the scale method and fused-scale sharing; an
    unknown key there (written by a newer hf_qad) is ignored with a warning.

    Example:
        >>> from hf_qad import NVFP4Config
        >>> config = config_from_compressed_tensors(compressed_tensors_config(NVFP4Config(), ["lm_head"]))
        >>> config.scheme, config.modules_to_not_convert, config.weights_format
        ('w4a4', ['lm_head'], 'packed')
    """
    group = _nvfp4_group(quantization_config)
    scheme = "w4a4" if group.get("input_activations") else "w4a16"
    advisory = dict(quantization_config.get("hf_qad") or {})
    advisory.pop("version", None)
    written_scheme = advisory.pop("scheme", scheme)
    advisory.pop("modules_to_not_convert", None)  # `ignore` lists the exact layers
    if written_scheme != scheme:
        logger.warning(
            "hf_qad: the checkpoint's hf_qad entry says scheme %r but its compressed-tensors config group is %s; "
            "loading it as %s.", written_scheme, scheme.upper(), scheme.upper(),
        )
    unknown = sorted(set(advisory) - set(_ADVISORY_SETTINGS))
    if unknown:
        logger.warning("hf_qad: ignoring unknown settings in the checkpoint's hf_qad entry: %s.", ", ".join(unknown))
    settings = {key: advisory[key] for key in _ADVISORY_SETTINGS if key in advisory}
    return NVFP4Config(
        scheme=scheme,
        modules_to_not_convert=list(quantization_config.get("ignore") or []),
        weights_format="packed",
        **settings,
    )


@torch.no_grad()
def packed_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every NVFP4Linear in packed form.

    Works in both modes: fake-mode layers are quantized from their master weights
    (nothing in the model changes), packed layers contribute their buffers.

    Args:
        model: an hf_qad model.
        state: a full state dict to pack instead of the live one, e.g. the weights FSDP or
            ZeRO-3 gathered on this rank from their shards; its master weights are quantized
            (fused peers included), the live parameters are left alone.

    Raises:
        ValueError: if a W4A4 layer was never calibrated (its input global scale is
            unset, and a serving engine would divide by zero).
    """
    layers = nvfp4_modules(model)
    packed = dict(model.state_dict() if state is None else state)
    for name, experts in nvfp4_experts(model).items():
        _write_per_expert(packed, model, name, experts, state)
    with ExitStack() as stack:
        if state is not None:  # every layer first: a layer's global scale reads its fused peers' weights
            for name, layer in layers.items():
                if not layer.is_packed:
                    stack.enter_context(layer.using_master_weight(state[f"{name}.weight"]))
        for name, layer in layers.items():
            prefix = f"{name}." if name else ""
            if layer.quantize_activations and not layer.input_calibrated:
                raise ValueError(
                    f"'{name}' quantizes activations (W4A4) but was never calibrated, so it has no "
                    "input_global_scale to export. Run hf_qad.calibrate(model, dataloader) first, "
                    "or use NVFP4Config(scheme='w4a16')."
                )
            packed.pop(prefix + "weight", None)
            weight_packed, block_scale, global_scale = layer.quantized_weight()
            packed[prefix + "weight_packed"] = weight_packed.contiguous()
            packed[prefix + "weight_scale"] = block_scale.contiguous()
            packed[prefix + "weight_global_scale"] = global_scale.contiguous()
    return packed


class ExpertSlice(NamedTuple):
    """Where one on-disk per-expert Linear of a fused experts module lives in its fused tensors."""

    module: str
    """On-disk module name, e.g. ``model.layers.0.mlp.experts.3.gate_proj``."""
    projection: str
    """The fused projection holding it (``gate_up_proj`` or ``down_proj``)."""
    expert: int
    rows: slice
    """Its rows in the fused ``[E, N, ...]`` tensors."""
    shard: int
    """Its column in the fused ``[E, shards]`` scales (gate 0, up 1)."""


def expert_checkpoint_slices(model: nn.Module, name: str, experts: NVFP4Experts) -> list[ExpertSlice]:
    """The on-disk per-expert Linears of the fused experts module ``name``, by transformers' weight conversion.

    The names and the rows each holds come from :func:`~hf_qad.nvfp4.experts.checkpoint_slices`: the
    master weight's conversion when the model has it, else the one of the packed buffers (a model
    loaded from a packed export only used those). What the export writes and what loading checks.

    Raises:
        ValueError: if transformers has no conversion writing the experts per expert.
    """
    result = []
    for projection, shards in EXPERT_PROJECTIONS.items():
        key = f"{name}.{projection}"
        rows = experts.weight_shapes()[projection][1]
        slices, tensor_name = {}, "weight"
        for tensor_name in ("weight", "weight_packed"):
            source = key + ("" if tensor_name == "weight" else EXPERT_TENSOR_SUFFIXES[tensor_name])
            slices = checkpoint_slices(model, source, experts.num_experts, rows)
            if slices:
                break
        if not slices:
            raise ValueError(
                f"transformers has no weight conversion that writes {key} per expert for "
                f"{type(model).__name__}, so hf_qad does not know its on-disk names."
            )
        for on_disk, (expert, row_range) in slices.items():
            result.append(ExpertSlice(on_disk.removesuffix("." + tensor_name), projection, expert, row_range,
                                      row_range.start * shards // rows))
    return result


def _write_per_expert(
    packed: dict[str, torch.Tensor],
    model: nn.Module,
    name: str,
    experts: NVFP4Experts,
    state: Mapping[str, torch.Tensor] | None,
) -> None:
    """Replace ``experts``' fused tensors in ``packed`` by per-expert NVFP4 tensors under their on-disk names
    (:func:`expert_checkpoint_slices`)."""
    if experts.quantize_activations and not experts.input_calibrated:
        raise ValueError(
            f"'{name}' quantizes activations (W4A4) but was never calibrated, so it has no input_global_scale "
            "to export. Run hf_qad.calibrate(model, dataloader) first, or use NVFP4Config(scheme='w4a16')."
        )
    tensors = {}
    for projection in EXPERT_PROJECTIONS:
        key = f"{name}.{projection}"
        master = state.get(key) if state is not None and not experts.is_packed else None
        tensors[projection] = dict(zip(("weight_packed", "weight_scale", "weight_global_scale"),
                                       experts.quantized_weight(projection, master)))  # fmt: skip
        if experts.quantize_activations:
            tensors[projection]["input_global_scale"] = getattr(experts, projection + "_input_global_scale")
        for stale in (key, *(key + suffix for suffix in EXPERT_TENSOR_SUFFIXES.values())):
            packed.pop(stale, None)
    for piece in expert_checkpoint_slices(model, name, experts):
        for ct_name, tensor in tensors[piece.projection].items():
            value = tensor[piece.expert, piece.rows] if tensor.dim() == 3 else tensor[piece.expert, piece.shard].reshape(1)
            packed[f"{piece.module}.{ct_name}"] = value.contiguous()
