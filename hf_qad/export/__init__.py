"""Writing NVFP4 checkpoints that serving engines load."""

from hf_qad.export.modelopt import save_modelopt_checkpoint

__all__ = ["save_modelopt_checkpoint"]
