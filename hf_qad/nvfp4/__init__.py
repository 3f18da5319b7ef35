"""NVFP4: format reference math, kernels, and the NVFP4 linear layer."""

from hf_qad.nvfp4.format import (
    BLOCK_SIZE,
    E2M1_VALUES,
    NVFP4Quantized,
    dequantize,
    fake_quant,
    global_scale_from_amax,
    quantize,
)

__all__ = [
    "BLOCK_SIZE",
    "E2M1_VALUES",
    "NVFP4Quantized",
    "dequantize",
    "fake_quant",
    "global_scale_from_amax",
    "quantize",
]
