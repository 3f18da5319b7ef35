"""transformers integration: NVFP4Config, its HfQuantizer, and model-level helpers."""

from hf_qad.quantizer.config import QUANT_METHOD, NVFP4Config
from hf_qad.quantizer.quantizer import NVFP4HfQuantizer, register

__all__ = ["QUANT_METHOD", "NVFP4Config", "NVFP4HfQuantizer", "register"]
