"""Writing NVFP4 checkpoints for serving engines beyond the quantizer's own format: ModelOpt's layout, model cards."""

from hf_qad.export.model_card import attach_model_card, write_model_card
from hf_qad.export.modelopt import save_modelopt_checkpoint

__all__ = ["attach_model_card", "save_modelopt_checkpoint", "write_model_card"]
