"""Writing NVFP4 checkpoints that serving engines load."""

from hf_qad.export.model_card import attach_model_card
from hf_qad.export.modelopt import save_modelopt_checkpoint

__all__ = ["attach_model_card", "save_modelopt_checkpoint"]
