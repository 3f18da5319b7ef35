"""compressed-tensors' ``nvfp4-pack-quantized`` checkpoint layout (what vLLM loads).

Per converted Linear ``<name>``:

* ``<name>.weight_packed``: uint8 ``[out, in/2]``, two E2M1 codes per byte;
* ``<name>.weight_scale``: float8_e4m3fn ``[out, in/16]``;
* ``<name>.weight_global_scale``: float32 ``[1]``, ``2688 / amax`` (a divisor);
* ``<name>.input_global_scale``: float32 ``[1]``, W4A4 only, from calibration.

``config.json`` carries compressed-tensors' quantization config, with ``ignore``
naming every Linear layer left in high precision (compressed-tensors targets all
``Linear`` modules, so an unlisted one would be expected to hold packed weights).
The config is written by hand rather than through compressed-tensors, which is only
a test dependency of hf_qad; the tests compare it with compressed-tensors' own.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from hf_qad.quantizer.conversion import nvfp4_modules

if TYPE_CHECKING:
    from hf_qad.quantizer.config import NVFP4Config

__all__ = ["FORMAT", "compressed_tensors_config", "is_hf_qad_checkpoint", "packed_state_dict"]

FORMAT = "nvfp4-pack-quantized"
# The oldest compressed-tensors release that reads nvfp4-pack-quantized with
# input_global_scale; written when compressed-tensors is not installed.
_MIN_CT_VERSION = "0.12.0"


def _quantization_args(dynamic: bool | str, observer: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": 16,
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


def compressed_tensors_config(config: NVFP4Config) -> dict[str, Any]:
    """The ``quantization_config`` dict compressed-tensors writes for this scheme."""
    activations = _quantization_args("local", "static_minmax") if config.quantize_activations else None
    from hf_qad import __version__

    ignore = sorted(set(config.unconverted_linears))
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
        "ignore": ignore,
        "moe_sparsity_config": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": _ct_version(),
        "hf_qad": {"version": __version__, **config.settings()},
    }


def is_hf_qad_checkpoint(quantization_config: dict[str, Any]) -> bool:
    """Whether a compressed-tensors config was written by hf_qad."""
    return quantization_config.get("format") == FORMAT and isinstance(quantization_config.get("hf_qad"), dict)


@torch.no_grad()
def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every NVFP4Linear in packed form.

    Works in both modes: fake-mode layers are quantized from their master weights
    (nothing in the model changes), packed layers contribute their buffers.

    Raises:
        ValueError: if a W4A4 layer was never calibrated (its input global scale is
            unset, and a serving engine would divide by zero).
    """
    state = model.state_dict()
    for name, layer in nvfp4_modules(model).items():
        prefix = f"{name}." if name else ""
        if layer.quantize_activations and not layer.input_calibrated:
            raise ValueError(
                f"'{name}' quantizes activations (W4A4) but was never calibrated, so it has no "
                "input_global_scale to export. Run hf_qad.calibrate(model, dataloader) first, "
                "or use NVFP4Config(scheme='w4a16')."
            )
        state.pop(prefix + "weight", None)
        packed, block_scale, global_scale = layer.quantized_weight()
        state[prefix + "weight_packed"] = packed.contiguous()
        state[prefix + "weight_scale"] = block_scale.contiguous()
        state[prefix + "weight_global_scale"] = global_scale.contiguous()
    return state
