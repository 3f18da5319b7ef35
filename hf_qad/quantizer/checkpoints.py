"""Two kinds of checkpoint, and switching between the model states behind them.

* **Packed export** (the default of ``save_pretrained`` / ``push_to_hub``): NVFP4
  tensors in compressed-tensors' format, what serving engines load. Lossy by design:
  it is the final model.
* **Master-weight checkpoint** (inside :func:`master_weight_checkpoint`, and for every
  Trainer ``save_steps`` checkpoint with :class:`MasterWeightCheckpointCallback`): the
  high-precision master weights and calibrated input scales, so training resumes
  exactly. ``from_pretrained`` of such a folder gives the fake-quant model back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from transformers import TrainerCallback

from hf_qad.quantizer.config import NVFP4Config
from hf_qad.quantizer.conversion import nvfp4_modules

__all__ = ["MasterWeightCheckpointCallback", "master_weight_checkpoint", "unpack_model"]


def _nvfp4_config(model: nn.Module) -> NVFP4Config:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(config, NVFP4Config):
        raise ValueError(
            "this model was not loaded with hf_qad's NVFP4Config; load it with "
            "from_pretrained(..., quantization_config=NVFP4Config())."
        )
    return config


@contextmanager
def master_weight_checkpoint(model: nn.Module) -> Iterator[None]:
    """Within this block, ``model.save_pretrained`` writes master weights, not the packed export.

    Example:
        >>> # with master_weight_checkpoint(model):
        >>> #     model.save_pretrained("run/checkpoint-100")   # resumable
        >>> # model.save_pretrained("run/final")                # packed NVFP4 for vLLM
    """
    config = _nvfp4_config(model)
    previous = config.save_master_weights
    config.save_master_weights = True
    try:
        yield
    finally:
        config.save_master_weights = previous


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
            _nvfp4_config(model).save_master_weights = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._arm(control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._arm(control, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _nvfp4_config(model).save_master_weights = False


@torch.no_grad()
def unpack_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Turn a packed NVFP4 model into a trainable fake-quant one, in place, to continue QAD.

    Each layer's dequantized weight becomes its master weight; see
    :meth:`hf_qad.nvfp4.linear.NVFP4Linear.unpack` for what is reproduced exactly.
    """
    config = _nvfp4_config(model)
    for layer in nvfp4_modules(model).values():
        layer.unpack(dtype)
    config.weights_format = "master"
    return model
