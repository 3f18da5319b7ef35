"""``NVFP4HfQuantizer``: hf_qad's transformers quantizer, registered on import.

Loading paths:

* a high-precision checkpoint + ``NVFP4Config()`` -> fake-quant model with trainable
  master weights (the checkpoint's own tensors load straight into ``NVFP4Linear.weight``,
  so no extra copy is made);
* a master-weight training checkpoint (``quant_method: hf_qad_nvfp4``) -> the same,
  with the calibrated input scales restored;
* a packed ``nvfp4-pack-quantized`` checkpoint written by hf_qad -> packed-mode model
  for inference (:func:`hf_qad.unpack_model` turns it back into a trainable one).

Saving writes the packed export unless :func:`hf_qad.master_weight_checkpoint` is active.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as quantizers_auto
from transformers.utils.quantization_config import CompressedTensorsConfig

from hf_qad.export.compressed_tensors import is_hf_qad_checkpoint, packed_state_dict
from hf_qad.quantizer.config import QUANT_METHOD, NVFP4Config
from hf_qad.quantizer.conversion import (
    DEFAULT_MODULES_TO_NOT_CONVERT,
    nvfp4_modules,
    plan_conversion,
    replace_linears,
)

__all__ = ["NVFP4HfQuantizer"]

logger = logging.getLogger("hf_qad")


class NVFP4HfQuantizer(HfQuantizer):
    """Replaces Linear layers with :class:`~hf_qad.nvfp4.linear.NVFP4Linear` while loading."""

    quantization_config: NVFP4Config
    requires_calibration = False  # True would forbid quantizing a high-precision checkpoint

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}:
            raise ValueError("hf_qad NVFP4 models cannot be offloaded to disk; use a device_map without 'disk'.")

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return torch.bfloat16 if dtype is None else dtype

    @property
    def _packed(self) -> bool:
        return self.pre_quantized and self.quantization_config.weights_format == "packed"

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs) -> None:
        config = self.quantization_config
        if config.modules_to_not_convert is None:
            patterns = self.get_modules_to_not_convert(model, None, keep_in_fp32_modules)
            patterns += list(DEFAULT_MODULES_TO_NOT_CONVERT)
        else:
            patterns = list(config.modules_to_not_convert) + list(keep_in_fp32_modules or [])
        plan = plan_conversion(model, patterns)
        replace_linears(
            model,
            plan,
            quantize_activations=config.quantize_activations,
            scale_method=config.scale_method,
            packed=self._packed,
            share_fused_global_scales=config.share_fused_global_scales,
        )
        config.unconverted_linears = sorted(plan.skipped)
        plan.log()
        if not self.pre_quantized:
            # A high-precision checkpoint has no input scales: they stay unset until calibration.
            ignored = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
            model._keys_to_ignore_on_load_missing = ignored + [r"\.input_global_scale$"]

    def _process_model_after_weight_loading(self, model, **kwargs):
        from hf_qad.export.model_card import attach_model_card  # the card names this quantizer's settings

        attach_model_card(model)
        for layer in nvfp4_modules(model).values():
            if not layer.quantize_activations:
                continue
            if not self.pre_quantized:
                layer.input_global_scale.zero_()  # the loader left uninitialized memory here
            layer.input_calibrated = bool((layer.input_global_scale > 0).all())
        return model

    def get_state_dict_and_metadata(self, model) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """``save_pretrained`` writes this state dict: packed unless saving master weights."""
        if self.quantization_config.save_master_weights:
            if self.quantization_config.weights_format == "packed":
                raise ValueError(
                    "this model holds packed NVFP4 weights, not master weights; call "
                    "hf_qad.unpack_model(model) to continue training from it."
                )
            return None, {}
        return packed_state_dict(model), {}

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # True in packed mode too: adapters (LoRA) train on a packed base.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return self.quantization_config.weights_format == "master"

    @property
    def is_compileable(self) -> bool:
        return True


class _CompressedTensorsConfigRouter(CompressedTensorsConfig):
    """Routes hf_qad's own compressed-tensors checkpoints to NVFP4Config.

    transformers picks the config class from ``quant_method``; ours are written with
    ``quant_method: compressed-tensors`` so that vLLM and plain transformers load them.
    transformers has no API to extend an existing entry, so hf_qad replaces the
    ``compressed-tensors`` entry with this subclass, which hands every other checkpoint
    to the stock class unchanged.
    """

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        quantization_config = config_dict.get("quantization_config", config_dict)
        if is_hf_qad_checkpoint(quantization_config):
            settings = {k: v for k, v in quantization_config["hf_qad"].items() if k != "version"}
            config = NVFP4Config(**settings, weights_format="packed")
            return (config, kwargs) if return_unused_kwargs else config
        return CompressedTensorsConfig.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


def register() -> None:
    """Register NVFP4Config and NVFP4HfQuantizer with transformers (idempotent)."""
    if QUANT_METHOD not in quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(NVFP4Config)
        register_quantizer(QUANT_METHOD)(NVFP4HfQuantizer)
    quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"] = _CompressedTensorsConfigRouter
