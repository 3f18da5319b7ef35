"""The pure-PyTorch reference of the NVFP4 math, for tests and for reading.

Every other implementation in hf_qad (the fast CPU path, the Triton kernels, the
checkpoint exporters) is tested against the functions in this module, so they are
written for clarity and exactness, not speed; they follow the order of operations
documented in :mod:`hf_qad.nvfp4.format` step by step. The ops to call in a model are
:func:`hf_qad.nvfp4.quantize`, :func:`~hf_qad.nvfp4.dequantize` and
:func:`~hf_qad.nvfp4.fake_quant`, which compute the same bits on a fast backend (and
give ``fake_quant`` its straight-through gradient); this module has no gradient.

Example:
    >>> import torch
    >>> from hf_qad.nvfp4 import reference
    >>> w = torch.randn(8, 32)
    >>> q = reference.quantize(w)
    >>> q.packed.shape, q.block_scale.shape, q.global_scale.shape
    (torch.Size([8, 16]), torch.Size([8, 2]), torch.Size([1]))
    >>> torch.equal(reference.dequantize(*q, dtype=torch.float32), reference.fake_quant(w))
    True
"""

from __future__ import annotations

import torch

from hf_qad.nvfp4.format import (
    BLOCK_SIZE,
    E2M1_MAX,
    E2M1_MAX_RECIPROCAL,
    E2M1_THRESHOLDS,
    E2M1_TIES_ROUND_UP,
    E2M1_VALUES,
    E4M3_MAX,
    ZERO_BLOCK_SCALE,
    NVFP4Quantized,
    check_block_scale,
    check_global_scale,
    check_quantizable,
    global_scale_from_amax,
)

__all__ = [
    "block_amax",
    "block_scales",
    "codes_to_values",
    "dequantize",
    "effective_scales",
    "fake_quant",
    "fake_quant_activation",
    "pack_codes",
    "quantize",
    "round_to_e2m1_codes",
    "runtime_block_scales",
    "search_block_scales",
    "unpack_codes",
]


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
    the even mantissa: the index counts the :data:`~hf_qad.nvfp4.format.E2M1_THRESHOLDS`
    passed, a tie passing its threshold where
    :data:`~hf_qad.nvfp4.format.E2M1_TIES_ROUND_UP` says so (compressed-tensors'
    ``cast_to_fp4`` thresholds).

    Example:
        >>> import torch
        >>> round_to_e2m1_codes(torch.tensor([0.25, 0.75, -5.0, 9.0])).tolist()
        [0, 2, 14, 7]
    """
    y = y.float()
    magnitude = y.abs().clamp(max=E2M1_MAX)
    index = torch.zeros_like(magnitude, dtype=torch.uint8)
    for threshold, tie_rounds_up in zip(E2M1_THRESHOLDS, E2M1_TIES_ROUND_UP):
        index += magnitude >= threshold if tie_rounds_up else magnitude > threshold
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
    block_scale: torch.Tensor | None,
    name: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_quantizable(x, name)
    if global_scale is None:
        global_scale = global_scale_from_amax(x.detach().abs().amax())
    global_scale = global_scale.detach().float().reshape(1).to(x.device)
    if block_scale is None:
        block_scale = block_scales(block_amax(x), global_scale, x.dtype)
    else:
        check_block_scale(x, block_scale, name)
    scale = effective_scales(block_scale, global_scale)
    y = x.detach().float().unflatten(-1, (-1, BLOCK_SIZE)) / scale.unsqueeze(-1)
    codes = round_to_e2m1_codes(y).flatten(-2)
    return codes, block_scale, global_scale


def quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    block_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> NVFP4Quantized:
    """Quantize ``x`` to packed NVFP4.

    Args:
        x: floating-point tensor whose last dimension is a multiple of 16.
        global_scale: a fixed global scale (``2688 / amax``, e.g. calibrated for
            activations or shared by fused q/k/v); computed from ``x`` when ``None``.
        block_scale: chosen e4m3 block scales ``[..., K / 16]`` (e.g. by an MSE search,
            see :mod:`hf_qad.nvfp4.scale_search`), returned as given;
            ``e4m3(gs * amax / 6)`` when ``None``.
        name: how to call ``x`` in error messages.
    """
    codes, block_scale, global_scale = _codes_and_scales(x, global_scale, block_scale, name)
    return NVFP4Quantized(pack_codes(codes), block_scale, global_scale)


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
    block_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` in one step; same shape and dtype as ``x``.

    Equal, bit for bit, to ``dequantize(*quantize(x, global_scale, block_scale), dtype=x.dtype)``.
    No gradient flows through this reference; :func:`hf_qad.nvfp4.fake_quant` is the
    straight-through version used in training.
    """
    codes, block_scale, global_scale = _codes_and_scales(x, global_scale, block_scale, name)
    values = codes_to_values(codes).unflatten(-1, (-1, BLOCK_SIZE))
    scale = effective_scales(block_scale, global_scale)
    return (values * scale.unsqueeze(-1)).flatten(-2).to(x.dtype)


@torch.no_grad()
def search_block_scales(x: torch.Tensor, global_scale: torch.Tensor, targets: tuple[float, ...]) -> torch.Tensor:
    """Per block of ``x``, the e4m3 scale mapping its amax onto one of ``targets`` with the least squared error.

    The candidate for target ``t`` is :func:`block_scales` of ``amax * (6 / t)``; each costs one
    fake-quantization of the block, and a later candidate replaces the best so far only if its
    error is strictly smaller, so ties keep the earlier one. The method names and their targets
    are in :mod:`hf_qad.nvfp4.scale_search`.

    Args:
        x: the weight, last dimension a multiple of 16.
        global_scale: float32 ``[1]``, or one per leading index (shape ``x.shape[:d]``).
        targets: the values the amax may be mapped onto, in order of preference on ties.

    Returns:
        ``float8_e4m3fn [..., K / 16]``.
    """
    count = check_global_scale(tuple(x.shape), global_scale)
    gs = global_scale.detach().float().to(x.device)
    # [1], or the leading shape followed by ones so that it broadcasts over each slice's blocks
    gs = gs.reshape(1) if count == 1 else gs.reshape(*gs.shape, *([1] * (x.dim() - gs.dim())))
    amax = block_amax(x)
    blocks = x.detach().float().unflatten(-1, (-1, BLOCK_SIZE))
    best_scale = best_error = None
    for target in targets:
        scale = block_scales(amax * (E2M1_MAX / target), gs, x.dtype)
        step = effective_scales(scale, gs).unsqueeze(-1)
        values = codes_to_values(round_to_e2m1_codes(blocks / step)) * step
        error = (values - blocks).pow(2).sum(-1)
        if best_scale is None:
            best_scale, best_error = scale, error
            continue
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return best_scale


# ------------------------------------------------------- activations, rounded at run time


def runtime_block_scales(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales of activations as serving kernels compute them at run time.

    ``e4m3(min(gs * (amax * r6), 448))`` with every product in float32 and ``r6`` the
    float32 :data:`~hf_qad.nvfp4.format.E2M1_MAX_RECIPROCAL`; unlike
    :func:`block_scales`, ``amax`` is not rounded to the input's dtype and a zero scale
    stays zero.
    """
    reciprocal_six = torch.tensor(E2M1_MAX_RECIPROCAL, dtype=torch.float32)
    scale = global_scale.float() * (amax.float() * reciprocal_six)
    return torch.clamp(scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fake_quant_activation(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Quantize-dequantize activations the way serving engines round them at run time.

    The formula of vLLM's ``cvt_warp_fp16_to_fp4`` kernel (see "Activations" in
    :mod:`hf_qad.nvfp4.format`): block scales from :func:`runtime_block_scales`, then
    ``x * 1 / (sb * (1 / gs))`` in float32, saturated at 6, rounded to E2M1 ties to even,
    keeping the sign of zero; dequantized as :func:`fake_quant` does. Weights keep
    compressed-tensors' offline formula (:func:`fake_quant`).

    Args:
        x: floating-point tensor whose last dimension is a multiple of 16.
        global_scale: the static (calibrated) global scale ``2688 / amax``; computed from
            ``x`` when ``None``.
        name: how to call ``x`` in error messages.

    Example:
        >>> import torch
        >>> x = torch.tensor([[-0.0, 0.25] + [6.0] * 14])
        >>> fake_quant_activation(x).tolist()[0][:3]
        [-0.0, 0.0, 6.0]
    """
    check_quantizable(x, name)
    if global_scale is None:
        global_scale = global_scale_from_amax(x.detach().abs().amax())
    global_scale = global_scale.detach().float().reshape(1).to(x.device)
    block_scale = runtime_block_scales(block_amax(x), global_scale).float()
    reciprocal = torch.reciprocal(block_scale * torch.reciprocal(global_scale))  # correctly rounded
    reciprocal = torch.where(block_scale == 0, torch.zeros_like(reciprocal), reciprocal)
    y = x.detach().float().unflatten(-1, (-1, BLOCK_SIZE)) * reciprocal.unsqueeze(-1)
    codes = round_to_e2m1_codes(y) | (torch.signbit(y).to(torch.uint8) << 3)
    values = codes_to_values(codes)
    scale = effective_scales(block_scale, global_scale)
    return (values * scale.unsqueeze(-1)).flatten(-2).to(x.dtype)
