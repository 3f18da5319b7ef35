"""NVFP4: the ops (fast backends, straight-through gradient), the format, the linear layer.

:func:`quantize`, :func:`dequantize`, :func:`fake_quant` and :func:`fake_quant_activation`
(W4A4 inputs, rounded as serving engines round them at run time) run on the tensor's backend
(Triton kernels on CUDA, eager PyTorch elsewhere; see :mod:`hf_qad.nvfp4.functional`,
which also has the packed-weight ``linear``). The format's constants are in
:mod:`hf_qad.nvfp4.format`, the readable reference math in :mod:`hf_qad.nvfp4.reference`.

Example:
    >>> import torch
    >>> from hf_qad.nvfp4 import dequantize, fake_quant, quantize
    >>> w = torch.randn(256, 512, dtype=torch.bfloat16)
    >>> packed, block_scale, global_scale = quantize(w)
    >>> torch.equal(dequantize(packed, block_scale, global_scale), fake_quant(w))
    True
"""

from hf_qad.nvfp4.format import BLOCK_SIZE, E2M1_VALUES, NVFP4Quantized, global_scale_from_amax
from hf_qad.nvfp4.functional import dequantize, fake_quant, fake_quant_activation, quantize

__all__ = [
    "BLOCK_SIZE",
    "E2M1_VALUES",
    "NVFP4Quantized",
    "dequantize",
    "fake_quant",
    "fake_quant_activation",
    "global_scale_from_amax",
    "quantize",
]
