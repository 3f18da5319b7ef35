"""``NVFP4HfQuantizer``: hf_qad's transformers quantizer, registered on import.

Loading paths:

* a high-precision checkpoint + ``NVFP4Config()`` -> fake-quant model with trainable
  master weights (the checkpoint's own tensors load straight into ``NVFP4Linear.weight``,
  so no extra copy is made);
* a master-weight training checkpoint (``quant_method: hf_qad_nvfp4``) -> the same,
  with the calibrated input scales restored;
* a packed ``nvfp4-pack-quantized`` checkpoint through :func:`hf_qad.load_packed_model`
  -> packed-mode model for inference (:func:`hf_qad.unpack_model` makes it trainable).

The quantizer owns the model's runtime quantization state: which Linear layers were left
unconverted, whether a save writes master weights, and the full weights to save from when
they are gathered from shards. Saving writes the packed export unless
:func:`hf_qad.master_weight_checkpoint` is active.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as quantizers_auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_qad.nvfp4.conversion import (
    DEFAULT_MODULES_TO_NOT_CONVERT,
    nvfp4_experts,
    nvfp4_modules,
    plan_conversion,
    replace_experts,
    replace_linears,
    tied_linears,
)
from hf_qad.nvfp4.experts import experts_listed_by_name, high_precision_moe_names
from hf_qad.nvfp4.moe import EXPERT_PROJECTIONS, EXPERT_TENSOR_SUFFIXES
from hf_qad.quantizer.config import QUANT_METHOD, NVFP4Config
from hf_qad.quantizer.loading_checks import check_expert_tensors_on_disk, check_loaded_tensors
from hf_qad.quantizer.serialization import (
    compressed_tensors_config,
    master_weights_config,
    packed_state_dict,
)

__all__ = ["NVFP4HfQuantizer", "SavedQuantizationConfig", "nvfp4_quantizer", "register"]

logger = logging.getLogger("hf_qad")

_TAGS = ["hf_qad", "nvfp4"]


class NVFP4HfQuantizer(HfQuantizer):
    """Replaces Linear layers with :class:`~hf_qad.nvfp4.linear.NVFP4Linear` and fused MoE experts
    with :class:`~hf_qad.nvfp4.moe.NVFP4Experts` while loading.

    Attributes:
        unconverted_linears: exact names of the Linear layers left in high precision, of the
            MoE routers and of the on-disk per-expert modules of fused experts kept in high
            precision (the export's ``ignore`` / ``exclude_modules`` list), set while loading.
        saving_master_weights: whether ``save_pretrained`` writes master weights instead of
            the packed export (see :func:`hf_qad.master_weight_checkpoint`).
        packed: whether the model holds packed NVFP4 weights (no master weights).
        model_card: what :func:`hf_qad.export.write_model_card` adds to the card by default
            (``base_model``, ``training``), as recorded by :func:`hf_qad.export.attach_model_card`.
    """

    quantization_config: NVFP4Config
    requires_calibration = False  # True would forbid quantizing a high-precision checkpoint

    def __init__(self, quantization_config: NVFP4Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.unconverted_linears: list[str] = []
        self.saving_master_weights = False
        self.packed = self.pre_quantized and quantization_config.weights_format == "packed"
        self.model_card: dict[str, Any] = {}
        self._state_to_save: Mapping[str, torch.Tensor] | None = None

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}:
            raise ValueError("hf_qad NVFP4 models cannot be offloaded to disk; use a device_map without 'disk'.")

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return torch.bfloat16 if dtype is None else dtype

    def _process_model_before_weight_loading(
        self, model, keep_in_fp32_modules=None, checkpoint_files=None, **kwargs
    ) -> None:
        config = self.quantization_config
        if config.modules_to_not_convert is None:
            patterns = self.get_modules_to_not_convert(model, None, keep_in_fp32_modules)
            patterns += list(DEFAULT_MODULES_TO_NOT_CONVERT)
        else:
            patterns = list(config.modules_to_not_convert) + list(keep_in_fp32_modules or [])
            patterns += experts_listed_by_name(model, patterns)  # a checkpoint's `ignore` names experts per expert
        # Tied output embeddings stay in high precision even when the user gives their own patterns.
        plan = plan_conversion(model, patterns, keep=tied_linears(model))
        options = dict(
            quantize_activations=config.quantize_activations,
            scale_method=config.scale_method,
            packed=self.packed,
            share_fused_global_scales=config.share_fused_global_scales,
        )
        replace_linears(model, plan, **options)
        replace_experts(model, plan, **options)
        self.unconverted_linears = sorted(set(plan.skipped) | set(high_precision_moe_names(model, plan.kept_experts)))
        plan.log()
        if self.pre_quantized:
            check_expert_tensors_on_disk(model, checkpoint_files, model.config.name_or_path)
        else:
            # A high-precision checkpoint has no input scales: they stay unset until calibration.
            ignored = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
            model._keys_to_ignore_on_load_missing = ignored + [r"input_global_scale$"]

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # For a pre-quantized checkpoint, "needs quantization" tells transformers that the tensor is
        # a quantized one whose shape the quantizer checks itself: a wrong one is then reported with
        # the missing and wrong-dtype tensors in one error after loading (check_loaded_tensors).
        return self.pre_quantized and param_name.rpartition(".")[2] in _NVFP4_TENSORS

    def get_new_dtype(self, converter, param, dtype):
        # NVFP4 tensors load in the checkpoint's own dtype: transformers would cast a float one to the
        # buffer's dtype (a float weight_packed to uint8 garbage), hiding a wrong dtype from the check.
        targets = getattr(converter, "target_patterns", None) or []
        if any(target.rpartition(".")[2] in _NVFP4_TENSORS for target in targets):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def update_weight_conversions(self, weight_conversions, model):
        """Load the per-expert NVFP4 tensors of a packed export into :class:`NVFP4Experts`' fused buffers.

        transformers' base quantizer does this for companions of a parameter's name
        (``weight_scale_inv`` -> ``gate_up_proj_scale_inv``) when the module registers them as
        parameters; NVFP4Experts holds buffers and ``input_global_scale`` does not start with
        ``weight``, so each of the model's converters that merges per-expert ``.weight`` tensors
        into a fused projection gets a copy per NVFP4 tensor name here, with the same operations
        (``experts.*.gate_proj.weight_packed`` + ``up_proj`` -> ``experts.gate_up_proj_packed``).
        Reversed, the same copies are what ``save_pretrained`` would split.
        """
        from transformers.core_model_loading import WeightConverter

        updated = super().update_weight_conversions(weight_conversions, model)
        if not nvfp4_experts(model):
            return updated
        extra = []
        for converter in updated:
            if not isinstance(converter, WeightConverter):
                continue
            sources, targets = converter._original_source_patterns, converter._original_target_patterns
            if not all(source.endswith(".weight") for source in sources) or not all(
                target.rpartition(".")[2] in EXPERT_PROJECTIONS for target in targets
            ):
                continue
            for tensor_name, suffix in EXPERT_TENSOR_SUFFIXES.items():
                extra.append(converter.copy(
                    [source.removesuffix("weight") + tensor_name for source in sources],
                    [target + suffix for target in targets],
                    operations=list(converter.operations),
                ))  # fmt: skip
        return updated + extra

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers has just set model.config.quantization_config to our NVFP4Config; what
        # config.json gets must follow the save (packed export or master weights), so the model's
        # config holds the quantizer's view of it instead.
        model.config.quantization_config = SavedQuantizationConfig(self)
        model.add_model_tags(_TAGS)  # for the model card transformers writes on push_to_hub
        layers = nvfp4_modules(model)
        experts = nvfp4_experts(model)
        if self.pre_quantized:
            check_loaded_tensors({**layers, **experts}, model.config.name_or_path)
        for layer in [*layers.values(), *experts.values()]:
            if not layer.is_packed:
                layer.warn_if_outlier_zeroes_blocks()
            if not layer.quantize_activations:
                continue
            scales = [tensor for name, tensor in layer.named_buffers(recurse=False) if name.endswith("input_global_scale")]
            if not self.pre_quantized:
                for scale in scales:
                    scale.zero_()  # the loader left uninitialized memory here
            layer.input_calibrated = all(bool((scale > 0).all()) for scale in scales)
        return model

    def checkpoint_config(self) -> dict[str, Any]:
        """The ``quantization_config`` that ``config.json`` gets on the next save."""
        if self.saving_master_weights:
            return master_weights_config(self.quantization_config)
        return compressed_tensors_config(self.quantization_config, self.unconverted_linears)

    @contextmanager
    def saving_state(self, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Within this block ``save_pretrained`` writes ``state`` (a full state dict) instead of the live weights.

        For FSDP (FULL_STATE_DICT) and ZeRO-3, which hand the Trainer the full weights gathered
        on one rank while the model's own parameters are shards: the master-weight checkpoint
        writes ``state`` as is, the packed export quantizes its weights.
        """
        self._state_to_save = state
        try:
            yield
        finally:
            self._state_to_save = None

    def get_state_dict_and_metadata(self, model) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """``save_pretrained`` writes this state dict: packed unless saving master weights."""
        state = self._state_to_save
        if self.saving_master_weights:
            if self.packed:
                raise ValueError(
                    "this model holds packed NVFP4 weights, not master weights; call "
                    "hf_qad.unpack_model(model) to continue training from it."
                )
            return (None if state is None else dict(state)), {}
        return packed_state_dict(model, state), {}

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # True in packed mode too: adapters (LoRA) train on a packed base.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return not self.packed

    @property
    def is_compileable(self) -> bool:
        return True


_NVFP4_TENSORS = (
    "weight_packed", "weight_scale", "weight_global_scale", "input_global_scale",
    # NVFP4Experts' fused buffers, e.g. gate_up_proj_packed
    *(projection + suffix for projection in EXPERT_PROJECTIONS for suffix in EXPERT_TENSOR_SUFFIXES.values()),
)


class SavedQuantizationConfig(QuantizationConfigMixin):
    """``model.config.quantization_config`` of an hf_qad model: what ``save_pretrained`` writes.

    transformers serializes this object's :meth:`to_dict` into ``config.json``; it answers with
    the packed export's compressed-tensors config, or inside :func:`hf_qad.master_weight_checkpoint`
    with the master-weight config. The user's options are ``.nvfp4_config``.
    """

    def __init__(self, quantizer: NVFP4HfQuantizer) -> None:
        self.quantizer = quantizer

    @property
    def nvfp4_config(self) -> NVFP4Config:
        """The options the model was loaded with."""
        return self.quantizer.quantization_config

    @property
    def quant_method(self) -> str:
        return QUANT_METHOD if self.quantizer.saving_master_weights else "compressed-tensors"

    def to_dict(self) -> dict[str, Any]:
        return self.quantizer.checkpoint_config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.nvfp4_config!r}, saves {self.quant_method})"


def nvfp4_quantizer(model: torch.nn.Module) -> NVFP4HfQuantizer:
    """The hf_qad quantizer of a model loaded with :class:`NVFP4Config` (through peft wrappers too).

    Raises:
        ValueError: if the model was not loaded with hf_qad.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, NVFP4HfQuantizer):
        raise ValueError(
            "this model was not loaded with hf_qad's NVFP4Config; load it with "
            "from_pretrained(..., quantization_config=NVFP4Config())."
        )
    return quantizer


def register() -> None:
    """Register NVFP4Config and NVFP4HfQuantizer with transformers under ``hf_qad_nvfp4`` (idempotent)."""
    if QUANT_METHOD not in quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(NVFP4Config)
        register_quantizer(QUANT_METHOD)(NVFP4HfQuantizer)
