"""LoRA (peft) on NVFP4 models, and the frozen base as its own BF16 teacher.

:class:`~hf_qad.nvfp4.linear.NVFP4Linear` subclasses ``nn.Linear``, so peft's LoRA wraps it
as is. Registering :class:`NVFP4LoraLinear` on the ``LoraConfig`` (:func:`register_nvfp4_lora`,
peft's per-layer-type dispatch; ``QADTrainer`` does it for its ``peft_config``) adds what an
NVFP4 base needs from its LoRA wrapper:

* the frozen base is fake-quantized once and cached, and a merge or unmerge (which peft writes
  through ``weight.data``, invisible to PyTorch's version counter) drops that cache;
* merging into a packed base (no master weight) is refused with a message saying what to do.

Without the registration LoRA still works and merges correctly; the base is re-quantized at
every forward instead of cached.

* **Adapters** stay in high precision; the forward is ``quant(W) x + B A x``.
* **Fused MoE experts** (:class:`~hf_qad.nvfp4.moe.NVFP4Experts`) take adapters through peft's
  ``target_parameters`` (``all-linear`` adds them on transformers-5 MoE models): peft reparametrizes
  the 3-D weight as ``W + B A`` during the forward, which the layer fake-quantizes, so there the
  forward is ``quant(W + B A) x``, the merged export's own weights.
* **Export**: ``peft_model.merge_and_unload()`` adds ``B A`` into the master weights;
  ``save_pretrained`` on the result writes the packed NVFP4 checkpoint. The merged
  weight is quantized as a whole, so the exported model is close to, not equal to,
  the unmerged one (as with QLoRA).
* **Packed base** (:func:`hf_qad.load_packed_model`): adapters train on it, but there is no
  master weight to merge into; ``hf_qad.unpack_model`` first, or merge into the master-weight model.
* **Teacher**: within :func:`teacher_mode`, adapters and quantization are off, so
  the same model computes the original BF16 model's logits.

Example:
    >>> import tempfile, torch, hf_qad
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    >>> path = tempfile.mkdtemp()
    >>> LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(path)
    >>> base = AutoModelForCausalLM.from_pretrained(
    ...     path, quantization_config=hf_qad.NVFP4Config(scheme="w4a16"))
    >>> config = hf_qad.register_nvfp4_lora(LoraConfig(r=4, target_modules="all-linear"))
    >>> model = get_peft_model(base, config)
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> model(ids, labels=ids).loss.backward()  # only the adapters get gradients
    >>> with hf_qad.teacher_mode(model):
    ...     teacher_logits = model(ids).logits  # the BF16 model's logits
    >>> merged = model.merge_and_unload()
    >>> merged.save_pretrained(tempfile.mkdtemp())  # packed NVFP4, adapters included
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn as nn
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from hf_qad.nvfp4.conversion import nvfp4_experts, nvfp4_modules
from hf_qad.nvfp4.linear import NVFP4Linear

__all__ = ["NVFP4LoraLinear", "causal_lm", "register_nvfp4_lora", "teacher_mode"]


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.base_model.model if isinstance(model, PeftModel) else model


def _list(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


@contextmanager
def teacher_mode(model: PeftModel) -> Iterator[PeftModel]:
    """Within this block, ``model`` computes its BF16 base model's outputs: the teacher.

    Disables the adapters (peft's ``disable_adapter``) and turns NVFP4 quantization
    of weights and activations off (NVFP4 Linear layers and MoE experts), so a LoRA
    student shares its weights with its teacher. Call the model under ``torch.no_grad()`` for teacher logits.

    Args:
        model: a peft model on a master-weight NVFP4 base whose weights are frozen.

    Raises:
        TypeError: if ``model`` is not a ``PeftModel``.
        ValueError: if the base is packed (no BF16 weights left), if some base
            weights of the NVFP4 layers are trainable (the base then drifts from the
            teacher), or if adapters are merged into the base.

    Example:
        >>> # with torch.no_grad(), hf_qad.teacher_mode(peft_model):
        >>> #     teacher_logits = peft_model(**batch).logits
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"teacher_mode needs a peft PeftModel, got {type(model).__name__}.")
    layers = {**nvfp4_modules(model), **nvfp4_experts(model)}  # NVFP4 Linears and fused MoE experts

    def named(selected: list[str]) -> str:  # the base model's names, not peft's base_model.model...
        return _list([layers[name].module_name or name for name in selected])

    packed = [name for name, layer in layers.items() if layer.is_packed]
    if packed:
        raise ValueError(
            f"teacher_mode: the base layers {named(packed)} are packed NVFP4 and hold no BF16 weights; "
            "load the high-precision checkpoint with NVFP4Config() as the base instead."
        )
    # Trainable copies in modules_to_save are fine: disabled adapters use the originals.
    trainable = [
        name
        for name, layer in layers.items()
        if ".modules_to_save." not in name and any(p.requires_grad for p in layer.parameters())
    ]
    if trainable:
        raise ValueError(
            f"teacher_mode: base weights of {named(trainable)} are trainable, so the base is no longer "
            "the teacher; keep them frozen (e.g. LoraConfig(bias='none'))."
        )
    if any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules()):
        raise ValueError("teacher_mode: adapters are merged into the base weights; call unmerge_adapter() first.")
    with model.disable_adapter():
        for layer in layers.values():
            layer.quantization_enabled = False
        try:
            yield model
        finally:
            for layer in layers.values():
                layer.quantization_enabled = True


class NVFP4LoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` on an :class:`NVFP4Linear` base (see the module docstring).

    The base caches its fake-quantized frozen weight, which only this wrapper may allow: its
    merge and unmerge are the writes (through ``weight.data``) that the cache cannot see.
    """

    def __init__(self, base_layer: NVFP4Linear, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        self.get_base_layer().cache_frozen_weight = True

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if base.is_packed:
            raise ValueError(
                f"cannot merge LoRA adapters into {base.module_name or 'this layer'}: it holds packed NVFP4 "
                "weights, not master weights. Call hf_qad.unpack_model(model) first, or load the "
                "high-precision checkpoint with NVFP4Config() and PeftModel.from_pretrained(base, "
                "adapter_dir) on it, then merge."
            )
        try:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        finally:
            base.mark_weight_changed()

    def unmerge(self) -> None:
        try:
            super().unmerge()
        finally:
            base = self.get_base_layer()
            if not base.is_packed:
                base.mark_weight_changed()


def register_nvfp4_lora(config: LoraConfig) -> LoraConfig:
    """Make ``config`` wrap NVFP4 layers with :class:`NVFP4LoraLinear` (peft's custom-module dispatch).

    Returns ``config``, for ``get_peft_model(model, register_nvfp4_lora(LoraConfig(...)))``.
    ``PeftModel.from_pretrained(base, adapter_dir, config=register_nvfp4_lora(LoraConfig.from_pretrained(
    adapter_dir)))`` does the same when reloading adapters.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_nvfp4_lora takes a peft LoraConfig, got {type(config).__name__}.")
    config._register_custom_module({NVFP4Linear: NVFP4LoraLinear})
    return config
