"""Functional NVFP4 API: backend dispatch and the straight-through estimator.

Two backends compute the bits of the reference (:mod:`hf_qad.nvfp4.reference`) and take
the same arguments, op for op:

* :mod:`hf_qad.nvfp4.cpu` — eager PyTorch, for CPU tensors;
* :mod:`hf_qad.nvfp4.triton_kernels` — fused Triton kernels, for CUDA tensors.

:func:`_backend` picks one from the tensor, and every op here forwards its arguments
unchanged; this module only adds autograd. Setting the environment variable
``HF_QAD_DISABLE_TRITON=1`` sends CUDA tensors through the PyTorch backend too (same
bits, slower): a way to rule the kernels out when debugging a GPU run. Only the
PyTorch backend checks inputs for NaN and Inf (raising a ``ValueError`` that uses
``name``): on a GPU the check would cost a device sync in every training step.

:func:`fake_quant`, :func:`quantize` and :func:`dequantize` are exported as
:func:`hf_qad.nvfp4.fake_quant` and so on. :func:`linear` is not: the name
``hf_qad.nvfp4.linear`` is the module of :class:`~hf_qad.nvfp4.linear.NVFP4Linear`.

Straight-through estimator
--------------------------
Rounding has a zero gradient almost everywhere, so :func:`fake_quant` passes the
incoming gradient through unchanged (``d x_hat / d x = 1``), including for values that
saturate at the block or calibrated range. We keep the plain STE, without a clipping
mask, because weight blocks never saturate (their scales come from their own amax)
and activations saturate only beyond the calibrated amax, where a zero gradient would
stop the student from learning to move back into range. The scales are treated as
constants (no gradient flows into the amax or into given block scales).

Example:
    >>> import torch
    >>> from hf_qad.nvfp4.functional import fake_quant
    >>> w = torch.randn(16, 32, requires_grad=True)
    >>> fake_quant(w).sum().backward()
    >>> bool((w.grad == 1).all())
    True
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from hf_qad.nvfp4 import cpu
from hf_qad.nvfp4.format import NVFP4Quantized, global_scale_from_amax

__all__ = ["dequantize", "fake_quant", "fake_quant_activation", "global_scale", "linear", "quantize"]


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and os.environ.get("HF_QAD_DISABLE_TRITON", "0") != "1"


def _backend(tensor: torch.Tensor) -> ModuleType:
    """Triton kernels for CUDA tensors, the eager PyTorch backend for everything else."""
    if _use_triton(tensor):
        from hf_qad.nvfp4 import triton_kernels  # imported lazily: triton needs a GPU driver

        return triton_kernels
    return cpu


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, global_scale, block_scale, name):
        return _backend(x).fake_quant(x, global_scale, block_scale, name=name)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None, None


def fake_quant(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    block_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` to NVFP4 with a straight-through gradient.

    Args:
        x: tensor whose last dimension is a multiple of 16 (bf16, fp16 or fp32).
        global_scale: static global scale ``2688 / amax`` (activations, or a scale
            shared by fused layers); computed from ``x`` when ``None``.
        block_scale: e4m3 block scales ``[..., K / 16]`` chosen by a search (see
            :mod:`hf_qad.nvfp4.scale_search`); ``e4m3(gs * amax / 6)`` when ``None``.
        name: how to call ``x`` in error messages (e.g. the module path).

    Returns:
        A tensor of ``x``'s shape and dtype holding NVFP4-representable values, equal
        bit for bit to :func:`hf_qad.nvfp4.reference.fake_quant`.
    """
    return _FakeQuantSTE.apply(x, global_scale, block_scale, name)


class _FakeQuantActivationSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, global_scale, name):
        return _backend(x).fake_quant_activation(x, global_scale, name=name)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


def fake_quant_activation(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Quantize-dequantize activations as serving engines round them at run time, with a
    straight-through gradient.

    The W4A4 input quantization of :class:`~hf_qad.nvfp4.linear.NVFP4Linear`: vLLM's
    kernel formula (see "Activations" in :mod:`hf_qad.nvfp4.format`), which rounds some
    blocks differently from :func:`fake_quant`'s offline (weight) formula.

    Args:
        x: tensor whose last dimension is a multiple of 16 (bf16, fp16 or fp32).
        global_scale: static (calibrated) global scale ``2688 / amax``; computed from
            ``x`` when ``None``.
        name: how to call ``x`` in error messages (e.g. the module path).

    Returns:
        A tensor of ``x``'s shape and dtype, equal bit for bit to
        :func:`hf_qad.nvfp4.reference.fake_quant_activation`.
    """
    return _FakeQuantActivationSTE.apply(x, global_scale, name)


def global_scale(*tensors: torch.Tensor) -> torch.Tensor:
    """The global scale ``2688 / amax`` of ``tensors`` together (a weight and its peers that
    share one scale, e.g. fused q/k/v), as :func:`hf_qad.nvfp4.format.global_scale_from_amax`
    gives it, bit for bit.

    On CUDA a Triton reduction reads each tensor once and leaves the scale on the device for
    the fake-quant kernel (no host sync, no ``|x|`` temporary); no gradient flows into it.

    Example:
        >>> import torch
        >>> q, k = torch.randn(64, 32), torch.randn(16, 32)
        >>> torch.equal(global_scale(q, k), global_scale_from_amax(torch.cat([q, k]).abs().amax()))
        True
    """
    detached = [t.detach() for t in tensors]
    if any(type(t) is not torch.Tensor for t in detached):
        # Tensor subclasses (a DTensor shard of FSDP2): their own amax reduces over every shard,
        # which a kernel reading the local data would not.
        return global_scale_from_amax(torch.stack([t.abs().amax().float() for t in detached]))
    backend = _backend(detached[0]) if detached else cpu  # cpu: refuses no tensors, with a message
    return backend.global_scale(*detached)


def quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    block_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> NVFP4Quantized:
    """Quantize ``x`` to packed NVFP4, the bytes of :func:`hf_qad.nvfp4.reference.quantize`.

    Arguments as :func:`fake_quant`; given block scales are returned as given.
    """
    return _backend(x).quantize(x.detach(), global_scale, block_scale, name=name)


def dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize packed NVFP4 to ``dtype`` (see :func:`hf_qad.nvfp4.reference.dequantize`)."""
    return _backend(packed).dequantize(packed, block_scale, global_scale, dtype)


def linear(
    x: torch.Tensor,
    weight: NVFP4Quantized,
    bias: torch.Tensor | None = None,
    input_global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x_hat @ W_hat^T + bias`` with a packed NVFP4 weight.

    With ``input_global_scale`` the activations are fake-quantized per 16-block first,
    rounded as serving engines round them (W4A4, :func:`fake_quant_activation`); without it the weight only
    is quantized (W4A16). On CUDA the weight is dequantized in registers by the Triton
    matmul; elsewhere it is dequantized to ``x``'s dtype and multiplied by PyTorch.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from hf_qad.nvfp4 import dequantize, quantize
        >>> from hf_qad.nvfp4.functional import linear
        >>> w, x = torch.randn(8, 32), torch.randn(2, 32)
        >>> q = quantize(w)
        >>> torch.equal(linear(x, q), F.linear(x, dequantize(*q, dtype=x.dtype)))
        True
    """
    backend = _backend(x)
    if input_global_scale is None:
        return backend.w4a16_linear(x, *weight, bias=bias)
    return backend.w4a4_linear(x, input_global_scale, *weight, bias=bias)
