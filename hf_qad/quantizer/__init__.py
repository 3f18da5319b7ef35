"""transformers integration: NVFP4Config, its HfQuantizer, its checkpoints, and LoRA on NVFP4 layers."""

from hf_qad.quantizer.config import QUANT_METHOD, NVFP4Config
from hf_qad.quantizer.quantizer import NVFP4HfQuantizer, nvfp4_quantizer, register

__all__ = ["QUANT_METHOD", "NVFP4Config", "NVFP4HfQuantizer", "nvfp4_quantizer", "register"]
