"""Two kinds of checkpoint, and switching between the model states behind them.

* **Packed export** (the default of ``save_pretrained`` / ``push_to_hub``): NVFP4
  tensors in compressed-tensors' format, what serving engines load. Lossy by design:
  it is the final model. :func:`load_packed_model` loads one as a packed hf_qad model;
  plain ``from_pretrained`` loads it through transformers' compressed-tensors support
  (weights decompressed to BF16, same logits).
* **Master-weight checkpoint** (inside :func:`master_weight_checkpoint`, and for every
  Trainer ``save_steps`` checkpoint with :class:`MasterWeightCheckpointCallback`): the
  high-precision master weights and calibrated input scales, so training resumes
  exactly. ``from_pretrained`` of such a folder gives the fake-quant model back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, TrainerCallback

from hf_qad.nvfp4.conversion import nvfp4_experts, nvfp4_modules
from hf_qad.quantizer.quantizer import nvfp4_quantizer
from hf_qad.quantizer.serialization import FORMAT, config_from_compressed_tensors

__all__ = [
    "MasterWeightCheckpointCallback",
    "is_packed_export",
    "load_packed_model",
    "master_weight_checkpoint",
    "unpack_model",
]


@contextmanager
def master_weight_checkpoint(model: nn.Module) -> Iterator[None]:
    """Within this block, ``model.save_pretrained`` writes master weights, not the packed export.

    Example:
        >>> # with master_weight_checkpoint(model):
        >>> #     model.save_pretrained("run/checkpoint-100")   # resumable
        >>> # model.save_pretrained("run/final")                # packed NVFP4 for vLLM
    """
    quantizer = nvfp4_quantizer(model)
    previous = quantizer.saving_master_weights
    quantizer.saving_master_weights = True
    try:
        yield
    finally:
        quantizer.saving_master_weights = previous


class MasterWeightCheckpointCallback(TrainerCallback):
    """Makes Trainer's periodic checkpoints master-weight checkpoints.

    The Trainer decides to save at the end of a step (or epoch) and saves right
    after the callbacks' ``on_step_end``/``on_epoch_end``; ``on_save`` runs once the
    checkpoint is written. This callback switches the model to master-weight saving
    in between, so ``trainer.save_model()`` outside training still writes the packed
    export.
    """

    def _arm(self, control, model) -> None:
        if control.should_save and model is not None:
            nvfp4_quantizer(model).saving_master_weights = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._arm(control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._arm(control, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None:
            nvfp4_quantizer(model).saving_master_weights = False


@torch.no_grad()
def unpack_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Turn a packed NVFP4 model into a trainable fake-quant one, in place, to continue QAD.

    Each layer's dequantized weight becomes its master weight; see
    :meth:`hf_qad.nvfp4.linear.NVFP4Linear.unpack` for what is reproduced exactly.
    """
    quantizer = nvfp4_quantizer(model)
    for layer in [*nvfp4_modules(model).values(), *nvfp4_experts(model).values()]:
        layer.unpack(dtype)
    quantizer.packed = False
    return model


def _quantization_config_of(path: str | os.PathLike) -> dict[str, Any] | None:
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("quantization_config")
    return AutoConfig.from_pretrained(path).to_dict().get("quantization_config")  # a hub id


def is_packed_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an NVFP4 compressed-tensors checkpoint (hf_qad's packed export or alike)."""
    quantization_config = _quantization_config_of(path) or {}
    return quantization_config.get("quant_method") == "compressed-tensors" and quantization_config.get("format") == FORMAT


def load_packed_model(
    path: str | os.PathLike, model_class: type[PreTrainedModel] | Any = AutoModelForCausalLM, **kwargs: Any
) -> PreTrainedModel:
    """Load a packed NVFP4 export as a packed hf_qad model: NVFP4 buffers, hf_qad's kernels.

    The export's ``config.json`` says ``quant_method: compressed-tensors`` so that vLLM and plain
    transformers load it; transformers alone would decompress it with compressed-tensors. This
    loads it with hf_qad's quantizer instead, reading the layout from the compressed-tensors
    fields (:func:`hf_qad.quantizer.serialization.config_from_compressed_tensors`).

    Args:
        path: folder (or hub id) of a packed export.
        model_class: the transformers class to load with (``AutoModelForCausalLM`` by default).
        **kwargs: passed to ``model_class.from_pretrained`` (``dtype``, ``device_map``, ...).

    Raises:
        ValueError: if ``path`` is not an NVFP4 compressed-tensors checkpoint.

    Example:
        >>> # model = hf_qad.load_packed_model("out/nvfp4")     # inference, packed weights
        >>> # hf_qad.unpack_model(model)                         # or trainable again, to continue QAD
    """
    if not is_packed_export(path):
        raise ValueError(
            f"{path} is not a packed NVFP4 export (no compressed-tensors {FORMAT!r} quantization_config in its "
            "config.json); load master-weight checkpoints and high-precision models with from_pretrained."
        )
    quantization_config = _quantization_config_of(path)
    config = AutoConfig.from_pretrained(path, **{k: kwargs[k] for k in ("revision", "token") if k in kwargs})
    config.quantization_config = config_from_compressed_tensors(quantization_config).to_dict()
    return model_class.from_pretrained(path, config=config, **kwargs)
