"""NVFP4 format: its definition, every constant of it, and the checks all paths share.

This module is the one place the format's numbers are written down: the reference math
(:mod:`hf_qad.nvfp4.reference`), the fast CPU path (:mod:`hf_qad.nvfp4.cpu`) and the
Triton kernels (:mod:`hf_qad.nvfp4.triton_kernels`) all import them from here, derived
where they follow from each other. The ops to call are :func:`hf_qad.nvfp4.quantize`,
:func:`~hf_qad.nvfp4.dequantize`, :func:`~hf_qad.nvfp4.fake_quant` and
:func:`~hf_qad.nvfp4.linear`.

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
   5 -> 4): see :data:`E2M1_THRESHOLDS` and :data:`E2M1_TIES_ROUND_UP`.
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

Activations: the serving engine's run-time rounding
----------------------------------------------------
Weights are quantized once, offline, by compressed-tensors, so the order above is what
serving reads for them. Activations are quantized at run time by the serving engine's
own kernel, which rounds differently: vLLM's ``cvt_warp_fp16_to_fp4`` (TensorRT-LLM
and FlashInfer share it) multiplies by reciprocals instead of dividing. So the W4A4
input fake-quant (:func:`hf_qad.nvfp4.fake_quant_activation`) follows that kernel, with
every step in float32 (``fl`` rounds to nearest even):

1. the global scale is the same ``gs = 2688 / amax`` (calibrated, or the batch's own);
2. ``sb = e4m3(min(fl(gs * fl(amax_block * r6)), 448))`` with ``r6 = fl(1 / 6)``
   (:data:`E2M1_MAX_RECIPROCAL`) and ``amax_block`` exact in float32, never rounded to
   the input's dtype; a zero scale stays zero (no 0.125);
3. ``y = fl(x * q)`` with ``q = fl(1 / fl(sb * fl(1 / gs)))``, or ``q = 0`` where
   ``sb == 0`` (so the block's codes are all zero);
4. ``y`` saturates at ``±6`` and rounds to E2M1 ties to even (as step 3 above), and the
   code keeps ``y``'s sign bit, so ``-0.0`` is stored as negative zero;
5. the fake-quantized value is ``fl(value(code) * fl(sb / gs))`` rounded to the input's
   dtype (step 6 above; a zero scale gives a signed zero).

The CUDA kernel computes the three reciprocals with ``rcp.approx.ftz.f32``, which PTX
specifies only to within one ulp; we take the correctly rounded reciprocal, as vLLM's
Python mirror of the kernel (``ref_nvfp4_quant``) does. Where the two differ (rare,
one ulp of ``q``, and only at an E2M1 rounding boundary can it change a code) and for
float32 subnormal intermediates (which ``.ftz`` flushes, reached only with a global
scale above ``2**126``) serving may round a value differently.

Inputs whose last dimension is not a multiple of 16 are refused (not padded): a
serving engine would have to pad the activations identically, and vLLM does not,
so such layers are left unquantized by the model-level code instead.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

__all__ = [
    "BLOCK_SIZE",
    "E2M1_MANTISSA_BITS",
    "E2M1_MAX",
    "E2M1_MAX_RECIPROCAL",
    "E2M1_SMALLEST_NORMAL",
    "E2M1_THRESHOLDS",
    "E2M1_TIES_ROUND_UP",
    "E2M1_VALUES",
    "E4M3_EXPONENT_BIAS",
    "E4M3_MANTISSA_BITS",
    "E4M3_MAX",
    "E4M3_MIN_EXPONENT",
    "E4M3_SMALLEST_NORMAL",
    "E4M3_SUBNORMAL_STEP",
    "GLOBAL_SCALE_NUMERATOR",
    "ZERO_BLOCK_SCALE",
    "NVFP4Quantized",
    "check_block_scale",
    "check_global_scale",
    "check_quantizable",
    "global_scale_from_amax",
    "global_scales_from_amax",
]

BLOCK_SIZE = 16
"""Elements per block scale, along the last (K) dimension."""

# ------------------------------------------------------------------ E2M1 elements

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""E2M1 magnitudes; the index of a magnitude is its 3-bit code (``ee m``)."""

E2M1_MAX = E2M1_VALUES[-1]
"""Largest E2M1 magnitude, 6."""

E2M1_MAX_RECIPROCAL = float(torch.tensor(1 / E2M1_MAX, dtype=torch.float32))
"""``1 / 6`` rounded to float32 (``0x3E2AAAAB``), the factor the run-time activation
kernels multiply the block amax by (exact as a Python float, so every backend reads it
unchanged)."""

E2M1_MANTISSA_BITS = 1
"""Explicit mantissa bits of E2M1: the lowest bit of a code's index."""

E2M1_SMALLEST_NORMAL = E2M1_VALUES[2 ** E2M1_MANTISSA_BITS]
"""1.0: the first value of exponent field 1; below it the step is the subnormal 0.5."""

E2M1_THRESHOLDS = tuple((low + high) / 2 for low, high in zip(E2M1_VALUES, E2M1_VALUES[1:]))
"""Rounding boundaries between consecutive E2M1 magnitudes: 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.

A magnitude at or past boundary ``i`` rounds to index ``i + 1`` or above; the number of
boundaries passed is the index. The midpoints are exact in every float format.
"""

E2M1_TIES_ROUND_UP = tuple(index % 2 == 0 for index in range(1, len(E2M1_VALUES)))
"""Per boundary, whether a tie rounds up (compare with ``>=``) or down (``>``).

Ties go to the even mantissa, the lowest bit of the index: up when the index above the
boundary is even (0.75 -> 1, 1.75 -> 2, 3.5 -> 4), down otherwise (0.25 -> 0, 1.25 -> 1,
2.5 -> 2, 5 -> 4), as compressed-tensors' ``cast_to_fp4`` rounds.
"""

# ------------------------------------------------------------ e4m3 block scales

E4M3_MANTISSA_BITS = 3
"""Explicit mantissa bits of ``float8_e4m3fn``."""

E4M3_EXPONENT_BIAS = 7
"""Exponent bias of ``float8_e4m3fn``."""

E4M3_MIN_EXPONENT = 1 - E4M3_EXPONENT_BIAS
"""-6: the exponent of the smallest normal e4m3 value; subnormals keep its step."""

E4M3_SMALLEST_NORMAL = 2.0**E4M3_MIN_EXPONENT
"""2**-6, the smallest normal e4m3 value."""

E4M3_SUBNORMAL_STEP = 2.0 ** (E4M3_MIN_EXPONENT - E4M3_MANTISSA_BITS)
"""2**-9, the spacing of e4m3 values below :data:`E4M3_SMALLEST_NORMAL` (and the smallest)."""

E4M3_MAX = 448.0
"""Largest float8_e4m3fn magnitude (``1.75 * 2**8``: the all-ones mantissa of the top
exponent is NaN in the ``fn`` variant)."""

# ------------------------------------------------------------------------- scales

GLOBAL_SCALE_NUMERATOR = E4M3_MAX * E2M1_MAX
"""2688: the global scale is ``2688 / amax`` (compressed-tensors' reciprocal form)."""

ZERO_BLOCK_SCALE = 0.125
"""Stored block scale of a block whose scale rounds to zero (compressed-tensors' eps)."""


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


def _what(name: str | None) -> str:
    return f"'{name}'" if name else "tensor"


def check_quantizable(x: torch.Tensor, name: str | None = None) -> None:
    """Raise ``ValueError`` if ``x`` cannot be quantized to NVFP4.

    Args:
        x: the tensor, blocks along its last dimension.
        name: what to call the tensor in the message (e.g. a module path).
    """
    what = _what(name)
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


def check_block_scale(x: torch.Tensor, block_scale: torch.Tensor, name: str | None = None) -> None:
    """Raise unless ``block_scale`` is e4m3 ``[..., K / 16]`` for ``x [..., K]``.

    Cheap (no data is read): every backend runs it before using given block scales, so
    that a kernel never reads past them.
    """
    if not torch.is_tensor(block_scale):
        raise TypeError(
            f"block_scale must be a float8_e4m3fn tensor, got {type(block_scale).__name__}; "
            "pass the tensor's name as name=..."
        )
    expected = (*x.shape[:-1], x.shape[-1] // BLOCK_SIZE)
    if block_scale.dtype != torch.float8_e4m3fn or tuple(block_scale.shape) != expected:
        raise ValueError(
            f"block scales of {_what(name)} {tuple(x.shape)} must be float8_e4m3fn {expected}, "
            f"got {block_scale.dtype} {tuple(block_scale.shape)}."
        )


def check_global_scale(shape: tuple[int, ...], global_scale: torch.Tensor, name: str | None = None) -> int:
    """Raise unless ``global_scale`` is one value or one per leading index of a tensor of ``shape``.

    One per leading index means shape ``shape[:d]`` with ``d < len(shape)``, e.g. ``[E]`` for
    fused experts ``[E, N, K]`` (each expert is then its own NVFP4 tensor). Cheap (no data is
    read): the backends run it before indexing scales by block.

    Returns:
        How many global scales there are (1 for a single one).
    """
    if global_scale.numel() == 1:
        return 1
    if tuple(global_scale.shape) != tuple(shape[: global_scale.dim()]) or global_scale.dim() >= len(shape):
        raise ValueError(
            f"{name or 'tensor'}: a global scale per leading index must have shape x.shape[:d] with d < x.dim(), "
            f"got {tuple(global_scale.shape)} for x of shape {tuple(shape)}."
        )
    return global_scale.numel()


def global_scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """:func:`global_scale_from_amax` of each element of ``amax``, same shape (e.g. one per expert).

    Example:
        >>> import torch
        >>> global_scales_from_amax(torch.tensor([[5.6, 0.0]])).tolist()
        [[480.0, 1.0]]
    """
    amax = torch.clamp(amax.detach().float().abs(), min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(GLOBAL_SCALE_NUMERATOR / amax, nan=1.0, posinf=1.0, neginf=1.0)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Global scale ``2688 / amax`` in float32, shape ``[1]`` (compressed-tensors' form).

    A non-finite quotient (zero or tiny amax) falls back to 1.0, as compressed-tensors does.

    Example:
        >>> import torch
        >>> global_scale_from_amax(torch.tensor([-5.6, 2.0])).tolist(), global_scale_from_amax(torch.zeros(3)).tolist()
        ([480.0], [1.0])
    """
    amax = amax.detach().float().abs().reshape(-1).amax()
    amax = torch.clamp(amax, min=torch.finfo(torch.float32).tiny)
    scale = GLOBAL_SCALE_NUMERATOR / amax
    scale = torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0)
    return scale.reshape(1)


# The reference math lived here until it moved to hf_qad.nvfp4.reference; the old names
# keep working, with a DeprecationWarning, until the next minor release.
_MOVED_TO_REFERENCE = (
    "block_amax",
    "block_scales",
    "codes_to_values",
    "effective_scales",
    "pack_codes",
    "round_to_e2m1_codes",
    "unpack_codes",
)
_MOVED_OPS = ("dequantize", "fake_quant", "quantize")


def _old_signature(new: Any) -> Any:
    """The reference op ``new`` called as it was: ``(x, global_scale, name, block_scale)``."""
    if new.__name__ == "dequantize":
        return new

    def moved(x, global_scale=None, name=None, block_scale=None):
        return new(x, global_scale, block_scale, name=name)

    moved.__doc__ = new.__doc__
    return moved


def __getattr__(name: str) -> Any:
    from hf_qad.nvfp4 import reference  # only ever imported for a moved name

    if name in _MOVED_OPS:
        warnings.warn(
            f"hf_qad.nvfp4.format.{name} moved: call hf_qad.nvfp4.{name} (the fast op, same "
            f"bits{', with a straight-through gradient' if name == 'fake_quant' else ''}), or "
            f"hf_qad.nvfp4.reference.{name} for the pure-PyTorch reference.",
            DeprecationWarning,
            stacklevel=2,
        )
        return _old_signature(getattr(reference, name))
    if name in _MOVED_TO_REFERENCE:
        warnings.warn(
            f"hf_qad.nvfp4.format.{name} moved to hf_qad.nvfp4.reference.{name}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
