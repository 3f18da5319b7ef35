"""Learned NVFP4 scales: trainable clipping factors in front of the block and global scales.

NVFP4 stores every weight block scale (e4m3) and every global scale (float32) explicitly, so any
value training finds is deployable as is. Two factors are learned, both starting at 1 (where the
result equals the default ``amax`` quantization bit for bit):

* **weight clip**, one per weight block: the block scale is ``e4m3(gs * (clip * amax_block) / 6)``,
  the formula of the default scales (:func:`hf_qad.nvfp4.reference.block_scales`) applied to the
  clipped amax. Below 1 the block's largest values clip in exchange for a finer grid, above 1 the
  grid widens;
* **input clip**, one per W4A4 layer: the activations' global scale is
  ``input_global_scale / clip``, i.e. the calibrated amax times ``clip``.

Both factors are clamped to :data:`CLIP_RANGE` in the forward (an e4m3 block scale must stay
positive). The forward re-rounds the scales to e4m3 every step and quantizes with them through the
ordinary ops (:func:`hf_qad.nvfp4.fake_quant` with given block scales,
:func:`hf_qad.nvfp4.fake_quant_activation`), so the packed export, which stores the block scales
:func:`clipped_block_scales` computes and the global scale of :func:`clipped_global_scale`, holds
exactly what the forward used.

Gradients (straight-through, in the spirit of LSQ, Esser et al. 2020): the input gets the plain
straight-through gradient, as in :func:`hf_qad.nvfp4.fake_quant`. A block's effective scale
``s = sb / gs`` gets ``sum_i g_i * q_i``, with ``q`` the block's E2M1 values: the gradient of
``x_hat = s * q`` with the codes held fixed. LSQ's own step gradient adds ``-y_i`` (``y = x / s``,
in range) for the codes' straight-through rounding; on NVFP4's coarse grid that term pushes every
scale down (trained on a Gaussian weight's own squared error, clips ended 3% worse than ``amax``
with it and 9% better with the codes held fixed; ``tests/nvfp4/test_learned_scales.py``). The e4m3 rounding of
``sb`` passes the gradient through, so ``ds / d clip = amax_block / 6`` for weights. For
activations the block scale follows the block's own amax, so only blocks that saturate at the
e4m3 maximum (448) depend on the global scale: the input clip learns the activations' clipping
range from them.

Example:
    >>> import torch
    >>> from hf_qad.nvfp4 import fake_quant, global_scale_from_amax
    >>> w = torch.randn(8, 64)
    >>> gs = global_scale_from_amax(w.abs().amax())
    >>> clip = torch.ones(8, 4, requires_grad=True)
    >>> torch.equal(fake_quant_clipped(w, gs, clip), fake_quant(w, gs))  # clip 1: the amax scales
    True
    >>> fake_quant_clipped(w, gs, clip).pow(2).sum().backward()
    >>> clip.grad.shape
    torch.Size([8, 4])
    >>> with torch.no_grad():
    ...     _ = clip.mul_(0.9)
    >>> scales = clipped_block_scales(w, gs, clip)  # what the export stores
    >>> torch.equal(fake_quant_clipped(w, gs, clip), fake_quant(w, gs, block_scale=scales))
    True
"""

from __future__ import annotations

import torch

from hf_qad.nvfp4 import functional
from hf_qad.nvfp4.format import BLOCK_SIZE, E2M1_MAX, E2M1_MAX_RECIPROCAL, E4M3_MAX
from hf_qad.nvfp4.reference import block_amax, block_scales, runtime_block_scales

__all__ = [
    "CLIP_RANGE",
    "clipped_block_scales",
    "clipped_global_scale",
    "fake_quant_activation_clipped",
    "fake_quant_clipped",
]

CLIP_RANGE = (1 / 16, 2.0)
"""Where the forward clamps a learned clip factor: positive (e4m3 block scales are unsigned in
serving kernels), and at most twice the amax, beyond which a grid only loses resolution."""


def _factor(clip: torch.Tensor) -> torch.Tensor:
    return clip.detach().float().clamp(*CLIP_RANGE)


def _inside(clip: torch.Tensor) -> torch.Tensor:
    """Where the clamp of :func:`_factor` is not active (elsewhere the factor gets no gradient)."""
    clip = clip.detach().float()
    return (clip >= CLIP_RANGE[0]) & (clip <= CLIP_RANGE[1])


def clipped_block_scales(x: torch.Tensor, global_scale: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales ``e4m3(gs * (clip * amax_block) / 6)`` of ``x`` (``clip``: ``[..., K / 16]``).

    With ``clip`` 1 these are the default ``amax`` scales, bit for bit.
    """
    amax = block_amax(x) * _factor(clip)
    return block_scales(amax, global_scale.detach().float().reshape(1).to(x.device), x.dtype)


def clipped_global_scale(global_scale: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """The activations' global scale ``global_scale / clip`` in float32 (the calibrated amax times ``clip``)."""
    return global_scale.detach().float().reshape(1) / _factor(clip).reshape(1).to(global_scale.device)


def _scale_gradient(out: torch.Tensor, grad: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The gradient of each block's effective scale ``step`` (``[..., K / 16]``), codes fixed, in float32."""
    step = step.unsqueeze(-1)
    # The E2M1 values (dequantized / step); an all-zero activation block has step 0 and values 0.
    q = torch.where(step == 0, 0.0, out.float().unflatten(-1, (-1, BLOCK_SIZE)) / step)
    return (grad.float().unflatten(-1, (-1, BLOCK_SIZE)) * q).sum(-1)


class _ClippedWeightSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, global_scale, clip, name):
        gs = global_scale.detach().float().reshape(1).to(x.device)
        block_scale = clipped_block_scales(x, gs, clip)
        ctx.save_for_backward(x, gs, clip, block_scale)
        ctx.name = name
        return functional.fake_quant(x, gs, block_scale, name=name)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, gs, clip, block_scale = ctx.saved_tensors
        grad_clip = None
        if ctx.needs_input_grad[2]:
            # Recomputed rather than saved: a second weight-sized tensor would live until the backward.
            out = functional.fake_quant(x, gs, block_scale, name=ctx.name)
            amax = block_amax(x)
            grad_step = _scale_gradient(out, grad_output, block_scale.float() / gs)
            # sb = e4m3(gs * clip * amax / 6), rounding passed through: d(sb / gs) / d clip = amax / 6,
            # except where sb saturates at 448 or the clamp of the factor holds it.
            live = _inside(clip) & (gs * _factor(clip) * amax / E2M1_MAX <= E4M3_MAX)
            grad_clip = (grad_step * amax / E2M1_MAX * live).to(clip.dtype)
        return grad_output, None, grad_clip, None


def fake_quant_clipped(
    x: torch.Tensor, global_scale: torch.Tensor, clip: torch.Tensor, *, name: str | None = None
) -> torch.Tensor:
    """Fake-quantize weights ``x`` with the block scales of :func:`clipped_block_scales`.

    Gradients: straight-through to ``x``, to ``clip`` through its block's scale (see the module docstring).
    """
    return _ClippedWeightSTE.apply(x, global_scale, clip, name)


class _ClippedActivationSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, global_scale, clip, name):
        gs = clipped_global_scale(global_scale, clip).to(x.device)
        out = functional.fake_quant_activation(x, gs, name=name)
        ctx.save_for_backward(x, out, gs, clip)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, out, gs, clip = ctx.saved_tensors
        grad_clip = None
        if ctx.needs_input_grad[2]:
            amax = block_amax(x)
            # Only a block whose scale saturates at 448 has an effective scale 448 / gs that moves with
            # the global scale gs = calibrated / clip: d(448 / gs) / d clip = step / clip.
            saturated = gs * (amax * E2M1_MAX_RECIPROCAL) > E4M3_MAX
            if not saturated.any():  # the usual case within the calibrated range: skip the passes below
                return grad_output, None, torch.zeros_like(clip), None
            step = runtime_block_scales(amax, gs).float() / gs
            grad_step = _scale_gradient(out, grad_output, step)
            total = (grad_step * step * saturated).sum() / _factor(clip).reshape(())
            grad_clip = (total * _inside(clip)).reshape(clip.shape).to(clip.dtype)
        return grad_output, None, grad_clip, None


def fake_quant_activation_clipped(
    x: torch.Tensor, global_scale: torch.Tensor, clip: torch.Tensor, *, name: str | None = None
) -> torch.Tensor:
    """Fake-quantize activations with the global scale of :func:`clipped_global_scale` (``clip``: ``[1]``).

    Gradients: straight-through to ``x``, to ``clip`` from the blocks that saturate.
    """
    return _ClippedActivationSTE.apply(x, global_scale, clip, name)
