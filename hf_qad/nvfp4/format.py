"""NVFP4 format: constants and the pure-PyTorch reference math.

Every other implementation in hf_qad (the fast CPU path, the Triton kernels, the
checkpoint exporters) is tested against the functions in this module, so they are
written for clarity and exactness, not speed.

The format
----------
* Elements are FP4 E2M1: magnitudes ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` and a sign.
* Blocks of :data:`BLOCK_SIZE` = 16 consecutive elements along the last (input, K)
  dimension share one ``float8_e4m3fn`` block scale.
* One float32 global scale per tensor.

Order of operations (follows compressed-tensors, byte for byte)
-----------------------------------------------------------------
Formulas that are equal on paper give different codes at rounding boundaries, so
every path follows compressed-tensors' NVFP4 order exactly:

1. ``gs = 2688 / max(A, tiny)`` where ``A`` is the tensor's absolute maximum and
   ``2688 = 448 * 6``; a non-finite result (``A`` so small the quotient overflows,
   or an all-zero tensor) falls back to ``gs = 1``. compressed-tensors stores this
   *reciprocal* form as ``weight_global_scale``; the encode scale of the paper is
   ``s2 = 1 / gs = A / 2688``.
2. ``sb = e4m3(clamp(gs * (amax_block / 6), -448, 448))`` rounded to nearest even
   by PyTorch's float8 conversion, where ``amax_block / 6`` is computed in the
   input's own dtype (rounded to bf16 for bf16 inputs) before the float32 product,
   as compressed-tensors does both for weights observed in their dtype and for
   activations quantized at run time. A block scale that is exactly zero (an all-zero
   block, or one so small the scale underflows e4m3) is stored as ``0.125``, the
   value compressed-tensors substitutes to avoid dividing by zero; its codes are
   all zero, so the block still dequantizes to zero.
3. ``y = x / (sb / gs)`` in float32 (the effective scale ``sb / gs`` is rounded to
   float32 first), clamped to ``[-6, 6]`` and rounded to the nearest E2M1 value,
   ties to even (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4,
   5 -> 4).
4. ``code = sign << 3 | index`` where ``sign = y < 0`` (so a negative value that
   rounds to zero is stored as negative zero, as compressed-tensors does) and
   ``index`` is the position of the magnitude in :data:`E2M1_VALUES`.
5. Two codes per byte: element ``2i`` in the low nibble, ``2i + 1`` in the high one.
6. Dequantized ``x_hat = value(code) * (sb / gs)`` in float32, cast to the output
   dtype (round to nearest even).

Where compressed-tensors and NVIDIA ModelOpt differ, we follow compressed-tensors
because vLLM loads its checkpoints and we promise byte-for-byte equality with it:

* zero blocks: compressed-tensors stores a block scale of 0.125, ModelOpt stores 0
  (both dequantize to zero);
* tiny block scales: compressed-tensors lets e4m3 rounding take them into
  subnormals (and to zero -> 0.125); ModelOpt clamps the block scale from below.

Inputs whose last dimension is not a multiple of 16 are refused (not padded): a
serving engine would have to pad the activations identically, and vLLM does not,
so such layers are left unquantized by the model-level code instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "BLOCK_SIZE",
    "E2M1_MAX",
    "E2M1_VALUES",
    "E4M3_MAX",
    "GLOBAL_SCALE_NUMERATOR",
    "ZERO_BLOCK_SCALE",
    "NVFP4Quantized",
    "block_amax",
    "block_scales",
    "check_quantizable",
    "codes_to_values",
    "dequantize",
    "effective_scales",
    "fake_quant",
    "global_scale_from_amax",
    "pack_codes",
    "quantize",
    "round_to_e2m1_codes",
    "unpack_codes",
]

BLOCK_SIZE = 16
"""Elements per block scale, along the last (K) dimension."""

E2M1_MAX = 6.0
"""Largest E2M1 magnitude."""

E4M3_MAX = 448.0
"""Largest float8_e4m3fn magnitude."""

GLOBAL_SCALE_NUMERATOR = E4M3_MAX * E2M1_MAX
"""2688: the global scale is ``2688 / amax`` (compressed-tensors' reciprocal form)."""

ZERO_BLOCK_SCALE = 0.125
"""Stored block scale of a block whose scale rounds to zero (compressed-tensors' eps)."""

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""E2M1 magnitudes; the index of a magnitude is its 3-bit code."""


class NVFP4Quantized(NamedTuple):
    """A tensor in NVFP4, laid out as compressed-tensors' ``nvfp4-pack-quantized``.

    Attributes:
        packed: ``uint8 [..., K / 2]``, two E2M1 codes per byte (low nibble first).
        block_scale: ``float8_e4m3fn [..., K / 16]``.
        global_scale: ``float32 [1]``, the reciprocal form ``2688 / amax``.
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor


def check_quantizable(x: torch.Tensor, name: str | None = None) -> None:
    """Raise ``ValueError`` if ``x`` cannot be quantized to NVFP4.

    Args:
        x: the tensor, blocks along its last dimension.
        name: what to call the tensor in the message (e.g. a module path).
    """
    what = f"'{name}'" if name else "tensor"
    if not x.is_floating_point():
        raise ValueError(f"NVFP4 quantizes floating-point tensors; {what} has dtype {x.dtype}.")
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(
            f"NVFP4 needs the last dimension of {what} to be a multiple of {BLOCK_SIZE}, "
            f"got shape {tuple(x.shape)}. Leave this layer unquantized "
            "(list it in modules_to_not_convert)."
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{what} contains NaN or Inf values and cannot be quantized to NVFP4; "
            "check the checkpoint or the training run that produced it."
        )


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Global scale ``2688 / amax`` in float32, shape ``[1]`` (compressed-tensors' form).

    A non-finite quotient (zero or tiny amax) falls back to 1.0, as compressed-tensors does.
    """
    amax = amax.detach().float().abs().reshape(-1).amax()
    amax = torch.clamp(amax, min=torch.finfo(torch.float32).tiny)
    scale = GLOBAL_SCALE_NUMERATOR / amax
    scale = torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0)
    return scale.reshape(1)


def block_amax(x: torch.Tensor) -> torch.Tensor:
    """Absolute maximum of each block of 16 along the last dimension, float32."""
    blocks = x.detach().float().unflatten(-1, (-1, BLOCK_SIZE))
    return blocks.abs().amax(dim=-1)


def block_scales(
    amax: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """E4M3 block scales ``e4m3(clamp(gs * (amax / 6)))``; zero scales become 0.125.

    ``amax / 6`` is rounded to ``dtype``, the dtype of the quantized tensor.
    """
    scale = global_scale.float() * (amax.to(dtype) / E2M1_MAX).float()
    scale = torch.clamp(scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    zero = scale.float() == 0
    return torch.where(zero, torch.tensor(ZERO_BLOCK_SCALE, dtype=scale.dtype), scale)


def effective_scales(block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The float32 scale ``sb / gs`` that multiplies an E2M1 value (one per block)."""
    return block_scale.float() / global_scale.float()


def round_to_e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """4-bit codes (``sign << 3 | index``, as uint8) of ``y`` rounded to E2M1.

    ``y`` is clamped to ``[-6, 6]`` and rounded to the nearest E2M1 value, ties to
    the even mantissa. The thresholds are those of compressed-tensors' ``cast_to_fp4``.
    """
    y = y.float()
    magnitude = y.abs().clamp(max=E2M1_MAX)
    # Upper bound of each code's interval; ">" versus ">=" encodes ties to even.
    index = (
        (magnitude > 0.25).to(torch.uint8)
        + (magnitude >= 0.75)
        + (magnitude > 1.25)
        + (magnitude >= 1.75)
        + (magnitude > 2.5)
        + (magnitude >= 3.5)
        + (magnitude > 5.0)
    ).to(torch.uint8)
    sign = (y < 0).to(torch.uint8) << 3
    return sign | index


def codes_to_values(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of 4-bit E2M1 codes."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    magnitude = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte: element ``2i`` low nibble, ``2i + 1`` high nibble."""
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., K / 2]`` to codes ``[..., K]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NVFP4 data must be uint8, got {packed.dtype}.")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def _codes_and_scales(
    x: torch.Tensor,
    global_scale: torch.Tensor | None,
    name: str | None,
    block_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_quantizable(x, name)
    if global_scale is None:
        global_scale = global_scale_from_amax(x.detach().abs().amax())
    global_scale = global_scale.detach().float().reshape(1).to(x.device)
    scale_b = block_scales(block_amax(x), global_scale, x.dtype) if block_scale is None else block_scale
    scale = effective_scales(scale_b, global_scale)
    y = x.detach().float().unflatten(-1, (-1, BLOCK_SIZE)) / scale.unsqueeze(-1)
    codes = round_to_e2m1_codes(y).flatten(-2)
    return codes, scale_b, global_scale


def quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    name: str | None = None,
    block_scale: torch.Tensor | None = None,
) -> NVFP4Quantized:
    """Quantize ``x`` to packed NVFP4.

    Args:
        x: floating-point tensor whose last dimension is a multiple of 16.
        global_scale: a fixed global scale (``2688 / amax``, e.g. calibrated for
            activations or shared by fused q/k/v); computed from ``x`` when ``None``.
        name: how to call ``x`` in error messages.
        block_scale: chosen e4m3 block scales (e.g. by an MSE search, see
            :mod:`hf_qad.nvfp4.scale_search`); ``e4m3(gs * amax / 6)`` when ``None``.

    Example:
        >>> import torch
        >>> from hf_qad.nvfp4.format import quantize, dequantize
        >>> w = torch.randn(8, 32)
        >>> q = quantize(w)
        >>> q.packed.shape, q.block_scale.shape, q.global_scale.shape
        (torch.Size([8, 16]), torch.Size([8, 2]), torch.Size([1]))
        >>> dequantize(*q, dtype=torch.float32).shape
        torch.Size([8, 32])
    """
    codes, scale_b, global_scale = _codes_and_scales(x, global_scale, name, block_scale)
    return NVFP4Quantized(pack_codes(codes), scale_b, global_scale)


def dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize packed NVFP4 to ``dtype``: ``value(code) * (sb / gs)``."""
    values = codes_to_values(unpack_codes(packed)).unflatten(-1, (-1, BLOCK_SIZE))
    scale = effective_scales(block_scale, global_scale.reshape(1))
    return (values * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quant(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    name: str | None = None,
    block_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` in one step; same shape and dtype as ``x``.

    Equal, bit for bit, to ``dequantize(*quantize(x, global_scale, name, block_scale), dtype=x.dtype)``.
    No gradient flows through this reference; see :mod:`hf_qad.nvfp4.functional`
    for the straight-through version used in training.
    """
    codes, scale_b, global_scale = _codes_and_scales(x, global_scale, name, block_scale)
    values = codes_to_values(codes).unflatten(-1, (-1, BLOCK_SIZE))
    scale = effective_scales(scale_b, global_scale)
    return (values * scale.unsqueeze(-1)).flatten(-2).to(x.dtype)
