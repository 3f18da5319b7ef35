"""``NVFP4Config``: the ``quantization_config`` that turns a model into NVFP4.

It holds the user's options only. What a saved model's ``config.json`` says (compressed-tensors'
config for the packed export, these options for a master-weight checkpoint) is decided by the
quantizer at save time, see :mod:`hf_qad.quantizer.serialization`.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_qad.nvfp4.scale_search import SCALE_METHODS

__all__ = ["QUANT_METHOD", "NVFP4Config"]

QUANT_METHOD = "hf_qad_nvfp4"
"""Our quant-method name (transformers already owns ``nvfp4``)."""

SCHEMES = ("w4a4", "w4a16")
WEIGHTS_FORMATS = ("master", "packed")


class NVFP4Config(QuantizationConfigMixin):
    """Quantize a model's Linear layers to NVFP4 for quantization-aware distillation.

    Args:
        scheme: ``"w4a4"`` (weights and activations, the default, as in the QAD paper
            and what Blackwell FP4 tensor cores run) or ``"w4a16"`` (weights only).
        scale_method: how weight block scales are chosen: ``"amax"`` (``amax / 6``,
            compressed-tensors' default), ``"four_over_six"`` or ``"mse"`` (a per-block
            search with lower error; see :mod:`hf_qad.nvfp4.scale_search`).
        modules_to_not_convert: module-name patterns kept in high precision. ``None``
            keeps the output embedding / ``lm_head``, tied weights and MoE routers.
            Linear layers whose ``in_features`` is not a multiple of 16 are always
            kept (and listed in one log line).
        share_fused_global_scales: give q/k/v and gate/up projections of a block one
            weight global scale (from their largest amax), as vLLM's fused kernels need.
        learn_scales: make the weight block scales and the W4A4 activation global scales trainable:
            each weight block gets a clipping factor in front of its ``amax`` scale, each W4A4 layer
            one in front of its calibrated input scale (parameters ``weight_clip`` / ``input_clip``,
            starting at 1, where the model equals the ``amax`` one; LSQ gradients, scales re-rounded
            to e4m3 in every forward; see :mod:`hf_qad.nvfp4.learned_scales`). The packed export
            stores the learned scales, exactly those the forward used; master-weight checkpoints
            keep the factors. Train them with float32 masters and their own learning rate
            (``QADConfig.scale_learning_rate``). Needs ``scale_method="amax"``.
        weights_format: what the checkpoint being loaded holds: ``"master"`` (high-precision
            weights, or a master-weight checkpoint: a trainable fake-quant model) or
            ``"packed"`` (NVFP4 buffers: a packed model for inference, see
            :func:`hf_qad.load_packed_model`). Written by hf_qad into the checkpoints it saves.

    Example:
        >>> from hf_qad import NVFP4Config
        >>> config = NVFP4Config(scheme="w4a16", scale_method="mse")
        >>> config.quantize_activations
        False
        >>> NVFP4Config.from_dict(config.to_dict()) == config
        True

        Then ``AutoModelForCausalLM.from_pretrained(path, quantization_config=config)``.
    """

    def __init__(
        self,
        scheme: str = "w4a4",
        scale_method: str = "amax",
        modules_to_not_convert: list[str] | None = None,
        share_fused_global_scales: bool = True,
        learn_scales: bool = False,
        weights_format: str = "master",
        quant_method: str = QUANT_METHOD,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"NVFP4Config is for quant_method {QUANT_METHOD!r}, got {quant_method!r}.")
        if not isinstance(scheme, str):
            raise ValueError(f"scheme must be 'w4a4' or 'w4a16', got {scheme!r}.")
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose 'w4a4' (weights and activations) or 'w4a16'.")
        if scale_method not in SCALE_METHODS:
            raise ValueError(f"unknown scale_method {scale_method!r}; choose one of {', '.join(SCALE_METHODS)}.")
        if weights_format not in WEIGHTS_FORMATS:
            raise ValueError(f"unknown weights_format {weights_format!r}; choose one of {', '.join(WEIGHTS_FORMATS)}.")
        if not isinstance(share_fused_global_scales, bool):
            raise ValueError(f"share_fused_global_scales must be True or False, got {share_fused_global_scales!r}.")
        if not isinstance(learn_scales, bool):
            raise ValueError(f"learn_scales must be True or False, got {learn_scales!r}.")
        if learn_scales and scale_method != "amax":
            raise ValueError(
                f"learn_scales starts from the amax scales; it cannot be combined with scale_method={scale_method!r}."
            )
        if modules_to_not_convert is not None and (
            not isinstance(modules_to_not_convert, (list, tuple))
            or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise ValueError("modules_to_not_convert must be a list of module-name patterns (strings).")
        self.quant_method = QUANT_METHOD
        self.scheme = scheme
        self.scale_method = scale_method
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.share_fused_global_scales = share_fused_global_scales
        self.learn_scales = learn_scales
        self.weights_format = weights_format

    @property
    def quantize_activations(self) -> bool:
        """Whether activations are quantized (W4A4)."""
        return self.scheme == "w4a4"

    def settings(self) -> dict[str, Any]:
        """The user-facing settings, as recorded in any checkpoint we write."""
        return {
            "scheme": self.scheme,
            "scale_method": self.scale_method,
            "modules_to_not_convert": self.modules_to_not_convert,
            "share_fused_global_scales": self.share_fused_global_scales,
            "learn_scales": self.learn_scales,
        }

    def to_dict(self) -> dict[str, Any]:
        """The options, as ``from_dict`` takes them back."""
        return {"quant_method": QUANT_METHOD, **self.settings(), "weights_format": self.weights_format}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVFP4Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.to_dict().items() if key != "quant_method")
        return f"{type(self).__name__}({options})"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        known = {"quant_method", *inspect.signature(cls).parameters}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"unknown NVFP4Config options: {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config
