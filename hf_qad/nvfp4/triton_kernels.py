"""NVFP4 Triton kernels for CUDA tensors, bit for bit equal to :mod:`hf_qad.nvfp4.reference`.

The backend :mod:`hf_qad.nvfp4.functional` picks for CUDA tensors; its ops take the same
arguments as :mod:`hf_qad.nvfp4.cpu`'s.

Kernels
-------
* :func:`fake_quant` — one fused pass per tile of 16-element blocks: block amax, e4m3
  block scale, effective scale, E2M1 rounding, dequantization and the store. Given
  block scales (e.g. searched weight scales) are loaded instead of computed.
* :func:`quantize` / :func:`dequantize` — the same math writing (reading) the packed
  ``nvfp4-pack-quantized`` layout.
* :func:`global_scale` — ``2688 / amax`` of one or more tensors (a weight and its fused
  peers) in one read of each: per-program maxima, then one program that reduces them and
  writes the float32 scale the kernels above read, all on the device (no host sync, no
  ``|x|`` temporary). Ops given no global scale use it.
* :func:`w4a16_linear` — a tiled matmul that dequantizes packed weights in registers;
  :func:`w4a4_linear` fake-quantizes the activations first (vLLM's NVFP4 emulation).

Exactness
---------
Every step follows the order of operations of :mod:`hf_qad.nvfp4.format` (its docstring
lists them; the format's constants come from there too): divisions use ``tl.div_rn`` (Triton's ``/`` on float32 is approximate on
GPUs), ``amax / 6`` is rounded to the input's dtype as in the reference, and no float
addition follows a multiplication, so no FMA contraction can change a rounding. The
conversions whose rounding matters are done with integer arithmetic on the float32 bits
rather than casts, because Triton's CPU interpreter (which the tests run on) truncates
float32 -> bfloat16 and rounds float8 differently from PyTorch:

* the block scale's rounding to e4m3 (:func:`_round_to_e4m3`), and
* rounding to bfloat16 (:func:`_round_to_bf16`); the result is exactly representable, so
  the store's cast is exact on the interpreter and on GPUs alike. (float32 -> float16
  casts round to nearest even on both.)

Scales are read and written as uint8 bits, so no kernel needs float8 support from the
GPU (Ampere works). Unlike the PyTorch backend, no op scans its input for NaN or Inf
(that would cost a device sync); ``name`` only labels the shape and dtype errors.

The matmul
----------
:func:`w4a16_linear` never materializes W: each program loads packed bytes and scale
bytes (3.5x fewer bytes than bf16 weights), decodes them to float32, rounds to the
activation dtype (the weight :func:`reference.dequantize` would give) and feeds ``tl.dot``
with float32 accumulation (for M <= 4 it may instead multiply elementwise and sum, a
GEMV that wastes no tensor-core rows). Small M (decode) splits K until there are about
as many programs as the config asks for, so that reading the weights, the bound at batch
1, uses the whole GPU; the split partial sums are added in a fixed order (no atomics).

Autotuning (CUDA)
-----------------
The first call of a kernel for a problem key times its candidate configs and keeps the
fastest for the process (:func:`tuned_configs` lists the choices). The elementwise kernels
choose their program size (:data:`_ELEMENTWISE_CANDIDATES`), which never changes a bit; the
matmul chooses its tiles (:func:`_matmul_candidates`, per rows bucket, N, K, dtype). Each
matmul config is deterministic, but two processes may pick different ones and so add the
float32 partial sums in a different order; ``HF_QAD_TRITON_AUTOTUNE=0`` keeps the first
candidate of every kernel, the same on every run. Off CUDA (the interpreter) the first
candidate is used.

Example (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before importing triton):
    >>> import torch
    >>> from hf_qad.nvfp4 import reference, triton_kernels
    >>> device = "cuda" if torch.cuda.is_available() else "cpu"
    >>> w = torch.randn(64, 128, dtype=torch.bfloat16, device=device)
    >>> torch.equal(triton_kernels.fake_quant(w), reference.fake_quant(w))
    True
    >>> q = triton_kernels.quantize(w)
    >>> torch.equal(q.packed, reference.quantize(w).packed)
    True
    >>> searched = q.block_scale.float().mul(0.75).to(torch.float8_e4m3fn)
    >>> torch.equal(triton_kernels.fake_quant(w, q.global_scale, searched),
    ...             reference.fake_quant(w, q.global_scale, searched))
    True
    >>> x = torch.randn(2, 128, dtype=torch.bfloat16, device=device)
    >>> triton_kernels.w4a16_linear(x, *q).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from hf_qad.nvfp4.format import (
    BLOCK_SIZE,
    E2M1_MANTISSA_BITS,
    E2M1_MAX,
    E2M1_MAX_RECIPROCAL,
    E2M1_THRESHOLDS,
    E2M1_TIES_ROUND_UP,
    E4M3_EXPONENT_BIAS,
    E4M3_MANTISSA_BITS,
    E4M3_MAX,
    E4M3_MIN_EXPONENT,
    E4M3_SMALLEST_NORMAL,
    E4M3_SUBNORMAL_STEP,
    GLOBAL_SCALE_NUMERATOR,
    ZERO_BLOCK_SCALE,
    NVFP4Quantized,
    check_block_scale,
    check_global_scale,
)

__all__ = [
    "dequantize",
    "fake_quant",
    "fake_quant_activation",
    "global_scale",
    "quantize",
    "tuned_configs",
    "w4a16_linear",
    "w4a4_linear",
]

# The format's constants, made visible to compiled kernels (which only read constexpr globals).
_BLOCK_SIZE = tl.constexpr(BLOCK_SIZE)
_BYTES_PER_BLOCK = tl.constexpr(BLOCK_SIZE // 2)  # two E2M1 codes per byte
_E2M1_MAX = tl.constexpr(E2M1_MAX)
_E2M1_MAX_RECIPROCAL = tl.constexpr(E2M1_MAX_RECIPROCAL)  # a float32 value: exact in any cast
_E2M1_THRESHOLDS = tl.constexpr(E2M1_THRESHOLDS)
_E2M1_TIES_ROUND_UP = tl.constexpr(E2M1_TIES_ROUND_UP)
_E2M1_BOUNDARIES = tl.constexpr(len(E2M1_THRESHOLDS))
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_E4M3_MANTISSA_BITS = tl.constexpr(E4M3_MANTISSA_BITS)
_E4M3_MANTISSA_MASK = tl.constexpr((1 << E4M3_MANTISSA_BITS) - 1)
_E4M3_EXPONENT_MASK = tl.constexpr((1 << (7 - E4M3_MANTISSA_BITS)) - 1)  # 8 bits less sign
_E4M3_MIN_EXPONENT = tl.constexpr(E4M3_MIN_EXPONENT)
_E4M3_SMALLEST_NORMAL = tl.constexpr(E4M3_SMALLEST_NORMAL)
_E4M3_SUBNORMAL_STEP = tl.constexpr(E4M3_SUBNORMAL_STEP)
_E4M3_SUBNORMALS_PER_UNIT = tl.constexpr(1 / E4M3_SUBNORMAL_STEP)  # 512, exact
_ZERO_BLOCK_SCALE = tl.constexpr(ZERO_BLOCK_SCALE)
_GLOBAL_SCALE_NUMERATOR = tl.constexpr(GLOBAL_SCALE_NUMERATOR)
# float32 layout: 23 mantissa bits, exponent bias 127.
_F32_MANTISSA_BITS = tl.constexpr(23)
_F32_EXPONENT_BIAS = tl.constexpr(127)
# float32 bits dropped to keep e4m3's mantissa, and the float32 -> e4m3 exponent rebias.
_E4M3_DROPPED_BITS = tl.constexpr(23 - E4M3_MANTISSA_BITS)
_E4M3_REBIAS = tl.constexpr(127 - E4M3_EXPONENT_BIAS)
# E2M1 "s ee m" moved into a float16 (10 mantissa bits, bias 15): its mantissa bit lands
# on the float16 mantissa's top bit, and the float16 is the value times 2**(1 - 15).
_E2M1_TO_F16_SHIFT = tl.constexpr(10 - E2M1_MANTISSA_BITS)
_E2M1_SIGN_TO_F16_SHIFT = tl.constexpr(15 - 3)
_E2M1_F16_RESCALE = tl.constexpr(2.0 ** (15 - 1))

_F32_TINY_BITS = tl.constexpr(0x00800000)  # the smallest normal float32, 2**-126
_F32_EXPONENT_FIELD = tl.constexpr(0x7F800000)  # all ones: Inf or NaN

class _ElementwiseConfig(NamedTuple):
    blocks: int  # 16-element blocks per program
    num_warps: int


_ELEMENTWISE_CANDIDATES = (
    _ElementwiseConfig(64, 4), _ElementwiseConfig(128, 4), _ElementwiseConfig(256, 4), _ElementwiseConfig(256, 8),
    _ElementwiseConfig(512, 8),
)  # fmt: skip
"""Program sizes of the elementwise kernels that autotuning times on CUDA; the first is the
default (1024 elements, 4 warps). Every block is computed on its own, so the choice never
changes a bit of the result."""

_TUNED: dict[tuple, NamedTuple] = {}
"""Autotuned configs: the fastest candidate per kernel and problem key, timed once per process."""

_AMAX_BLOCKS_PER_PROGRAM = 512
"""16-element blocks per program of the amax reduction (8192 elements): few partial maxima."""

_AMAX_REDUCE_CHUNK = 1024
"""Partial maxima the final amax program loads per iteration."""

_TARGET_PROGRAMS = 256
"""Programs the default matmul config aims for, splitting K when the output has fewer tiles:
about two per SM of an H100 (132 SMs), so that small-M (decode) matmuls keep every SM streaming."""


# --------------------------------------------------------------------------- bit helpers


@triton.jit
def _exp2i(k):
    """``2.0 ** k`` in float32 for an integer tensor ``k`` in the normal range."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _with_sign(magnitude, negative):
    """``magnitude`` (float32, sign bit clear) with its sign bit set where ``negative``.

    Not ``tl.where(negative, -magnitude, magnitude)``: Triton 3.6 and older (before
    triton-lang/triton#10270) compiled unary minus on floats as ``0 - x``, which gives +0.0
    for x = +0.0, so negative zeros (a zero block scale stored as byte 0x80) came out
    positive on GPUs while the interpreter negated exactly.
    """
    bits = magnitude.to(tl.int32, bitcast=True) | (negative.to(tl.int32) << 31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3(v):
    """Round float32 ``v`` (``|v| <= 448``) to the nearest e4m3 value, ties to even.

    Works on the 24-bit significand ``M`` of ``|v|``: e4m3 keeps 4 significant bits in its
    normal range (exponent >= -6) and a fixed step of 2**-9 below it, so ``d`` low bits of
    ``M`` are dropped with round-to-nearest-even and the result is rebuilt as a float.
    """
    bits = tl.abs(v).to(tl.int32, bitcast=True)
    exponent = (bits >> _F32_MANTISSA_BITS) - _F32_EXPONENT_BIAS
    # 20 = 23 - 3 mantissa bits; below 2**-6 one more bit per binade (subnormals). Capping at
    # 25 drops all 24 bits plus the half-way bit, which rounds zero and float32 subnormals
    # (whose missing implicit bit we do not restore) to zero.
    drop = _E4M3_DROPPED_BITS + tl.maximum(_E4M3_MIN_EXPONENT - exponent, 0)
    drop = tl.minimum(drop, _F32_MANTISSA_BITS + 2)
    significand = (bits & 0x7FFFFF) | 0x800000
    half_minus_one = (1 << (drop - 1)) - 1
    rounded = (significand + half_minus_one + ((significand >> drop) & 1)) >> drop
    step = _exp2i(tl.maximum(exponent, _E4M3_MIN_EXPONENT) - _E4M3_MANTISSA_BITS)
    magnitude = rounded.to(tl.float32) * step
    return _with_sign(magnitude, v.to(tl.int32, bitcast=True) < 0)  # -0.0 stays -0.0, as PyTorch's cast


@triton.jit
def _e4m3_bits(scale):
    """The e4m3 byte (as int32) of a float32 ``scale`` that is exactly an e4m3 value."""
    magnitude = tl.abs(scale)
    bits = magnitude.to(tl.int32, bitcast=True)
    exponent = (bits >> _F32_MANTISSA_BITS) - _E4M3_REBIAS  # rebias 127 -> 7
    mantissa = (bits >> _E4M3_DROPPED_BITS) & _E4M3_MANTISSA_MASK  # keep 3 bits
    normal = (exponent << _E4M3_MANTISSA_BITS) | mantissa
    subnormal = (magnitude * _E4M3_SUBNORMALS_PER_UNIT).to(tl.int32)  # multiples of 2**-9
    byte = tl.where(magnitude >= _E4M3_SMALLEST_NORMAL, normal, subnormal)
    return tl.where(scale < 0, byte | 0x80, byte)


@triton.jit
def _e4m3_value(byte):
    """Float32 value of e4m3 bits (uint8 or int32 tensor); NaN encodings are not expected."""
    byte = byte.to(tl.int32)
    exponent = (byte >> _E4M3_MANTISSA_BITS) & _E4M3_EXPONENT_MASK
    mantissa = byte & _E4M3_MANTISSA_MASK
    normal = ((exponent + _E4M3_REBIAS) << _F32_MANTISSA_BITS) | (mantissa << _E4M3_DROPPED_BITS)
    subnormal = mantissa.to(tl.float32) * _E4M3_SUBNORMAL_STEP
    magnitude = tl.where(exponent == 0, subnormal, normal.to(tl.float32, bitcast=True))
    return _with_sign(magnitude, (byte & 0x80) != 0)


@triton.jit
def _round_to_bf16(v):
    """Round float32 ``v`` to the nearest bfloat16 (ties to even), returned as float32."""
    bits = v.to(tl.int32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)  # carries into the exponent like a real rounding
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """Float32 ``v`` rounded to nearest even in ``dtype``, returned as float32.

    bfloat16 rounds on the bits (see the module docstring); float16 casts round to nearest
    even on GPUs and on the interpreter alike. Stores of the result are exact casts.
    """
    if dtype == tl.bfloat16:
        return _round_to_bf16(v)
    if dtype == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _e2m1_codes(y):
    """4-bit codes (int32, ``sign << 3 | index``) of float32 ``y`` rounded to E2M1.

    As :func:`hf_qad.nvfp4.reference.round_to_e2m1_codes`: the index counts the
    :data:`~hf_qad.nvfp4.format.E2M1_THRESHOLDS` passed, ``>=`` where a tie rounds up
    and ``>`` where it rounds down (ties to the even mantissa); magnitudes above 6
    saturate at index 7. The loop is unrolled at compile time.
    """
    m = tl.abs(y)
    index = tl.zeros(m.shape, tl.int32)
    for boundary in tl.static_range(_E2M1_BOUNDARIES):
        if _E2M1_TIES_ROUND_UP[boundary]:
            index += (m >= _E2M1_THRESHOLDS[boundary]).to(tl.int32)
        else:
            index += (m > _E2M1_THRESHOLDS[boundary]).to(tl.int32)
    return ((y < 0).to(tl.int32) << 3) | index


@triton.jit
def _e2m1_value(code):
    """Float32 value of 4-bit E2M1 codes (any integer tensor, bits above 3 ignored).

    E2M1 ``s ee m`` moved into a float16's sign, exponent LSBs and mantissa MSB is a float16
    ``2**-14`` times the value (exponent 0 lands on float16 subnormals, as E2M1's does), so
    one multiply by ``2**14`` finishes the decode without a table.
    """
    code = code.to(tl.int32)
    half_bits = ((code & 7) << _E2M1_TO_F16_SHIFT) | ((code & 8) << _E2M1_SIGN_TO_F16_SHIFT)
    return half_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * _E2M1_F16_RESCALE


@triton.jit
def _block_scales(amax, global_scale, dtype: tl.constexpr):
    """Stored block scale ``e4m3(clamp(gs * (amax / 6)))`` (zero -> 0.125) and ``sb / gs``.

    ``amax / 6`` is the correctly rounded float32 quotient rounded to ``dtype`` (the
    input's), as the reference computes it on CPU. (PyTorch on CUDA turns a division by a
    Python scalar into a multiplication by its rounded reciprocal, so the reference run on
    a GPU can differ from itself on CPU in rare blocks; we follow the CPU definition.)
    """
    scale = global_scale * _round_to(tl.div_rn(amax, _E2M1_MAX), dtype)
    scale = _round_to_e4m3(tl.minimum(tl.maximum(scale, -_E4M3_MAX), _E4M3_MAX))
    scale = tl.where(scale == 0, _ZERO_BLOCK_SCALE, scale)
    return scale, tl.div_rn(scale, global_scale)


# ----------------------------------------------------------------- elementwise kernels


@triton.jit
def _load_blocks(x_ptr, n_blocks, blocks_per_row, row_stride, BLOCKS: tl.constexpr):
    """This program's blocks of x as float32 ``[BLOCKS, 16]``, with their indices and mask.

    Blocks are numbered over the flattened ``[rows, K]`` input, so a program may span rows;
    rows may be strided (a view), each row itself is contiguous.
    """
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    mask = block < n_blocks
    row = block // blocks_per_row
    start = row * row_stride + (block - row * blocks_per_row) * _BLOCK_SIZE
    x = tl.load(x_ptr + start[:, None] + tl.arange(0, _BLOCK_SIZE)[None, :], mask=mask[:, None], other=0.0)
    return x.to(tl.float32), block, mask


@triton.jit
def _quantize_blocks(x, global_scale, scale_ptr, block, mask, dtype: tl.constexpr,
                     GIVEN_SCALE: tl.constexpr):  # fmt: skip
    """E2M1 codes ``[BLOCKS, 16]``, stored and effective block scales of blocks ``x``.

    With GIVEN_SCALE the stored scales are the e4m3 bytes at ``scale_ptr`` (one per block,
    numbered as ``x``'s blocks); otherwise they are computed from each block's amax.
    """
    if GIVEN_SCALE:
        block_scale = _e4m3_value(tl.load(scale_ptr + block, mask=mask, other=0))
        scale = tl.div_rn(block_scale, global_scale)
    else:
        block_scale, scale = _block_scales(tl.max(tl.abs(x), axis=1), global_scale, dtype)
    return _e2m1_codes(tl.div_rn(x, scale[:, None])), block_scale, scale


@triton.jit
def _load_global_scale(gs_ptr, block, mask, blocks_per_scale):
    """Each block's global scale: one for the tensor, or one per leading index (``blocks_per_scale`` blocks each)."""
    return tl.load(gs_ptr + block // blocks_per_scale, mask=mask, other=1.0)


@triton.jit
def _fake_quant_kernel(
    x_ptr, gs_ptr, scale_ptr, out_ptr, n_blocks, blocks_per_row, row_stride, blocks_per_scale,
    BLOCKS: tl.constexpr, GIVEN_SCALE: tl.constexpr,
):  # fmt: skip
    x, block, mask = _load_blocks(x_ptr, n_blocks, blocks_per_row, row_stride, BLOCKS)
    global_scale = _load_global_scale(gs_ptr, block, mask, blocks_per_scale)
    codes, _, scale = _quantize_blocks(x, global_scale, scale_ptr, block, mask,
                                       x_ptr.dtype.element_ty, GIVEN_SCALE)  # fmt: skip
    x_hat = _round_to(_e2m1_value(codes) * scale[:, None], out_ptr.dtype.element_ty)
    offsets = block[:, None] * _BLOCK_SIZE + tl.arange(0, _BLOCK_SIZE)[None, :]
    tl.store(out_ptr + offsets, x_hat, mask=mask[:, None])


@triton.jit
def _fake_quant_activation_kernel(
    x_ptr, gs_ptr, out_ptr, n_blocks, blocks_per_row, row_stride, BLOCKS: tl.constexpr,
):  # fmt: skip
    """:func:`reference.fake_quant_activation`: the serving kernels' run-time rounding.

    Products only (no addition, so no FMA contraction), reciprocals by ``tl.div_rn``; the
    block amax is not rounded to the input's dtype, a zero block scale stays zero (its
    reciprocal is 0), and the code keeps the sign bit of ``x * reciprocal``.
    """
    x, block, mask = _load_blocks(x_ptr, n_blocks, blocks_per_row, row_stride, BLOCKS)
    global_scale = tl.load(gs_ptr)
    block_scale = global_scale * (tl.max(tl.abs(x), axis=1) * _E2M1_MAX_RECIPROCAL)
    block_scale = _round_to_e4m3(tl.minimum(block_scale, _E4M3_MAX))
    # A zero block scale gets the reciprocal 0 (1 / inf), as the serving kernels' 0 there.
    scale = tl.where(block_scale == 0, float("inf"), block_scale * tl.div_rn(1.0, global_scale))
    reciprocal = tl.div_rn(1.0, scale)
    y = x * reciprocal[:, None]
    codes = _e2m1_codes(y) | ((y.to(tl.int32, bitcast=True) < 0).to(tl.int32) << 3)
    x_hat = _e2m1_value(codes) * tl.div_rn(block_scale, global_scale)[:, None]
    offsets = block[:, None] * _BLOCK_SIZE + tl.arange(0, _BLOCK_SIZE)[None, :]
    tl.store(out_ptr + offsets, _round_to(x_hat, out_ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _quantize_kernel(
    x_ptr, gs_ptr, packed_ptr, scale_ptr, n_blocks, blocks_per_row, row_stride, blocks_per_scale,
    BLOCKS: tl.constexpr, GIVEN_SCALE: tl.constexpr,
):  # fmt: skip
    """Packs the codes; stores the computed scales at ``scale_ptr``, or reads given ones there."""
    x, block, mask = _load_blocks(x_ptr, n_blocks, blocks_per_row, row_stride, BLOCKS)
    global_scale = _load_global_scale(gs_ptr, block, mask, blocks_per_scale)
    codes, block_scale, _ = _quantize_blocks(x, global_scale, scale_ptr, block, mask,
                                             x_ptr.dtype.element_ty, GIVEN_SCALE)  # fmt: skip
    low, high = tl.split(tl.reshape(codes, (BLOCKS, _BYTES_PER_BLOCK, 2)))  # element 2i: low nibble of byte i
    offsets = block[:, None] * _BYTES_PER_BLOCK + tl.arange(0, _BYTES_PER_BLOCK)[None, :]
    tl.store(packed_ptr + offsets, (low | (high << 4)).to(tl.uint8), mask=mask[:, None])
    if not GIVEN_SCALE:
        tl.store(scale_ptr + block, _e4m3_bits(block_scale).to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_kernel(packed_ptr, scale_ptr, gs_ptr, out_ptr, n_blocks, blocks_per_scale, BLOCKS: tl.constexpr):
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    mask = block < n_blocks
    bytes_offsets = block[:, None] * _BYTES_PER_BLOCK + tl.arange(0, _BYTES_PER_BLOCK)[None, :]
    packed = tl.load(packed_ptr + bytes_offsets, mask=mask[:, None], other=0)
    sb = _e4m3_value(tl.load(scale_ptr + block, mask=mask, other=0))
    scale = tl.div_rn(sb, _load_global_scale(gs_ptr, block, mask, blocks_per_scale))[:, None]
    values = tl.reshape(tl.join(_e2m1_value(packed), _e2m1_value(packed >> 4)), (BLOCKS, _BLOCK_SIZE))
    x_hat = _round_to(values * scale, out_ptr.dtype.element_ty)
    offsets = block[:, None] * _BLOCK_SIZE + tl.arange(0, _BLOCK_SIZE)[None, :]
    tl.store(out_ptr + offsets, x_hat, mask=mask[:, None])


@triton.jit
def _amax_partials_kernel(x_ptr, partials_ptr, n_blocks, blocks_per_row, row_stride, BLOCKS: tl.constexpr):
    """This program's ``max |x|`` as the int32 bits of a float32 (see :func:`_global_scale_kernel`)."""
    x, _, _ = _load_blocks(x_ptr, n_blocks, blocks_per_row, row_stride, BLOCKS)
    # With the sign cleared, float32 bits order like the values, NaN above Inf: an integer max
    # carries a NaN through to the scale (1.0, as global_scale_from_amax gives it).
    bits = tl.abs(x).to(tl.int32, bitcast=True)
    tl.store(partials_ptr + tl.program_id(0), tl.max(tl.max(bits, axis=1), axis=0))


@triton.jit
def _global_scale_kernel(partials_ptr, n_partials, gs_ptr, CHUNK: tl.constexpr):
    """``global_scale_from_amax`` of the largest partial, in one program.

    As PyTorch computes it: ``amax`` clamped below at the smallest normal float32,
    ``2688 / amax`` as ``reciprocal(amax) * 2688`` (what ``2688 / tensor`` runs), and a
    non-finite result replaced by 1.0. The clamp is an integer max, so NaN stays NaN.
    """
    running = tl.zeros((CHUNK,), dtype=tl.int32)
    for start in range(0, n_partials, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        running = tl.maximum(running, tl.load(partials_ptr + offs, mask=offs < n_partials, other=0))
    amax_bits = tl.maximum(tl.max(running, axis=0), _F32_TINY_BITS)
    scale = tl.div_rn(1.0, amax_bits.to(tl.float32, bitcast=True)) * _GLOBAL_SCALE_NUMERATOR
    finite = (scale.to(tl.int32, bitcast=True) & _F32_EXPONENT_FIELD) != _F32_EXPONENT_FIELD
    tl.store(gs_ptr, tl.where(finite, scale, 1.0))


# ---------------------------------------------------------------------- matmul kernels


@triton.jit
def _weight_tile(packed_ptr, scale_ptr, global_scale, offs_n, n_mask, k_block0, n_k_blocks,
                 stride_pn, stride_sn, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dequantized float32 weight tile ``W[offs_n, K-tile]``, ``[BLOCK_N, BLOCK_K]``.

    Built as ``[BLOCK_N, blocks, 8 bytes, 2 nibbles]``, whose row-major order is the order
    of K (element ``2i`` is the low nibble of byte ``i``), so each block's scale broadcasts
    over its bytes and the flattening is free. Blocks past K (and rows past N) get zero.
    """
    k_blocks: tl.constexpr = BLOCK_K // _BLOCK_SIZE
    blk = k_block0 + tl.arange(0, k_blocks)
    mask = n_mask[:, None] & (blk < n_k_blocks)[None, :]
    n_offsets = offs_n.to(tl.int64)[:, None]
    sb = tl.load(scale_ptr + n_offsets * stride_sn + blk[None, :], mask=mask, other=0)
    scale = tl.div_rn(_e4m3_value(sb), global_scale)[:, :, None]
    byte = blk[None, :, None] * _BYTES_PER_BLOCK + tl.arange(0, _BYTES_PER_BLOCK)[None, None, :]
    packed = tl.load(packed_ptr + n_offsets[:, :, None] * stride_pn + byte,
                     mask=mask[:, :, None], other=0)  # fmt: skip
    w = tl.join(_e2m1_value(packed) * scale, _e2m1_value(packed >> 4) * scale)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _dot_acc(x, w, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
    """``acc + x @ w^T`` for a float32 tile ``w`` rounded to ``x``'s dtype, as the reference
    dequantizes to the activation dtype before multiplying.

    Without DOT (a few rows: a GEMV) the products are formed elementwise in float32, exact
    for 16-bit inputs, and summed over K.
    """
    if not DOT:
        w = _round_to(w, x.dtype)
        return acc + tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if INTERPRET:
        # The interpreter multiplies bfloat16 tiles as raw integers and truncates casts:
        # round like a GPU cast and multiply in float32 (16-bit products are exact there).
        w = _round_to(w, x.dtype)
        return tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile of program ``pid``, grouped GROUP_M tiles down M so a wave reuses W in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows, (pid % group_size) // rows


@triton.jit
def _w4a16_kernel(
    x_ptr, packed_ptr, scale_ptr, gs_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_pn, stride_sn, k_tiles_per_split,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """``out = x @ W^T (+ bias)``; with SPLIT, float32 partial sums ``[splits, M, N]``."""
    tile_m, tile_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    global_scale = tl.load(gs_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first_tile = split * k_tiles_per_split
    for tile in range(first_tile, tl.minimum(first_tile + k_tiles_per_split, tl.cdiv(K, BLOCK_K))):
        w = _weight_tile(packed_ptr, scale_ptr, global_scale, offs_n, n_mask,
                         tile * (BLOCK_K // _BLOCK_SIZE), K // _BLOCK_SIZE, stride_pn, stride_sn,
                         BLOCK_K, BLOCK_N)  # fmt: skip
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :],
                    other=0.0)  # fmt: skip
        acc = _dot_acc(x, w, acc, INTERPRET, PRECISION, DOT)
    out_offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = _round_to(acc, out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_offsets, out, mask=out_mask)
    else:
        tl.store(out_ptr + split.to(tl.int64) * M * N + out_offsets, acc, mask=out_mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, numel, N, split_k,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``out = sum(partials, 0) (+ bias)`` in a fixed order, so results are deterministic."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(split_k):
        acc += tl.load(partial_ptr + split * numel + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _round_to(acc, out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------ host wrappers


def _check_blocks(x: torch.Tensor, name: str | None = None) -> None:
    """Refuse what the kernels cannot take (cheap checks only: no NaN scan, no sync)."""
    what = f"'{name}'" if name else "the tensor"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"NVFP4 kernels take bf16, fp16 or fp32 tensors, got {x.dtype} for {what}.")
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(
            f"NVFP4 needs the last dimension of {what} to be a multiple of {BLOCK_SIZE}, "
            f"got shape {tuple(x.shape)}."
        )


def _check_packed(packed: torch.Tensor, block_scale: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or block_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(
            "packed NVFP4 data must be uint8 and block scales float8_e4m3fn, "
            f"got {packed.dtype} and {block_scale.dtype}."
        )
    if packed.shape[:-1] != block_scale.shape[:-1] or packed.shape[-1] * 2 != block_scale.shape[-1] * BLOCK_SIZE:
        raise ValueError(
            f"packed {tuple(packed.shape)} and block_scale {tuple(block_scale.shape)} do not "
            "describe the same tensor (expected [..., K / 2] and [..., K / 16])."
        )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last dim]`` with contiguous rows (a view when possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _scale_on(global_scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A global scale as the kernels read it: float32 ``[1]`` on ``device``."""
    return global_scale.detach().float().reshape(1).to(device)


def _global_scale(x: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """The given global scale(s) as given, or ``x``'s own (:func:`global_scale`: on the device, no sync)."""
    if given is None:
        return global_scale(x)
    return given


def _global_scales(
    shape: tuple[int, ...], n_blocks: int, global_scale: torch.Tensor, device: torch.device, name: str | None
) -> tuple[torch.Tensor, int]:
    """Global scales as the elementwise kernels read them: contiguous float32, and blocks per scale.

    One scale for the tensor, or one per leading index (shape ``shape[:d]``, e.g. ``[E]`` for
    fused experts ``[E, N, K]``), each covering the consecutive blocks of its slice.
    """
    count = check_global_scale(shape, global_scale, name)
    scales = global_scale.detach().float().reshape(-1).to(device).contiguous()
    return scales, max(n_blocks // count, 1)


def global_scale(*tensors: torch.Tensor) -> torch.Tensor:
    """``global_scale_from_amax`` of the largest ``|x|`` over ``tensors``, computed on the device.

    Equal bit for bit to ``format.global_scale_from_amax(torch.stack([t.abs().amax() for t in
    tensors]))``: one read of each tensor (a program's maximum each), then one program for
    the scale; nothing waits for the host, and no ``|x|`` temporary is written.

    Args:
        tensors: bf16, fp16 or fp32 tensors on one device, last dimensions multiples of 16
            (e.g. a weight and the weights that share its global scale).

    Returns:
        The float32 ``[1]`` global scale ``2688 / amax`` (1.0 when that is not finite).
    """
    if not tensors:
        raise ValueError("global_scale needs at least one tensor.")
    device = tensors[0].device
    views, programs = [], []
    for x in tensors:
        _check_blocks(x)
        if x.device != device:
            raise ValueError(f"global_scale takes tensors on one device, got {device} and {x.device}.")
        views.append(_rows(x))
        programs.append(triton.cdiv(x.numel() // BLOCK_SIZE, _AMAX_BLOCKS_PER_PROGRAM))
    # Every program writes its partial; only empty tensors leave nothing, whose amax is 0.
    total = sum(programs)
    partials = torch.empty(total, dtype=torch.int32, device=device) if total else torch.zeros(1, dtype=torch.int32,
                                                                                              device=device)
    start = 0
    for rows, count in zip(views, programs):
        if count:
            _amax_partials_kernel[(count,)](
                rows, partials[start:], rows.numel() // BLOCK_SIZE, rows.shape[1] // BLOCK_SIZE, rows.stride(0),
                BLOCKS=_AMAX_BLOCKS_PER_PROGRAM,
            )  # fmt: skip
        start += count
    scale = torch.empty(1, dtype=torch.float32, device=device)
    _global_scale_kernel[(1,)](partials, partials.numel(), scale, CHUNK=_AMAX_REDUCE_CHUNK)
    return scale


def _autotuning(device: torch.device) -> bool:
    """Whether launches on ``device`` time their candidate configs (CUDA, unless turned off)."""
    return device.type == "cuda" and os.environ.get("HF_QAD_TRITON_AUTOTUNE", "1") != "0"


def _fastest(key: tuple, candidates: tuple | list, launch) -> NamedTuple:
    """The candidate whose ``launch(candidate)`` runs fastest, timed once per ``key`` and process.

    Candidates that do not compile on this GPU (too much shared memory, a layout this
    Triton cannot lower) are skipped with a warning; if none compiles, the first is kept
    and its error surfaces at the launch.
    """
    if key not in _TUNED:
        timings = {}
        for config in candidates:
            try:
                timings[config] = do_bench(lambda: launch(config), warmup=5, rep=20, return_mode="median")
            except (OutOfResources, CompilationError) as error:
                warnings.warn(f"hf_qad: {key[0]} config {config} skipped by autotuning: {type(error).__name__}",
                              stacklevel=3)
        _TUNED[key] = min(timings, key=timings.get) if timings else candidates[0]
    return _TUNED[key]


def _launch_elementwise(kernel, n_blocks: int, *args, **constexprs) -> None:
    """Launch an elementwise kernel over ``n_blocks`` blocks of 16 (its first argument the
    input), with the program size autotuned on CUDA per kernel, tensor dtypes, options and
    power-of-two bucket of ``n_blocks``."""

    def launch(config: _ElementwiseConfig) -> None:
        kernel[(triton.cdiv(n_blocks, config.blocks),)](*args, BLOCKS=config.blocks, num_warps=config.num_warps,
                                                        **constexprs)  # fmt: skip

    if n_blocks == 0:
        return
    config = _ELEMENTWISE_CANDIDATES[0]
    if _autotuning(args[0].device):
        dtypes = tuple(arg.dtype for arg in args if torch.is_tensor(arg))
        key = (kernel.fn.__name__, dtypes, tuple(sorted(constexprs.items())), triton.next_power_of_2(n_blocks),
               args[0].device)  # fmt: skip
        config = _fastest(key, _ELEMENTWISE_CANDIDATES, launch)
    launch(config)


def _given_scale_bits(
    x: torch.Tensor, block_scale: torch.Tensor | None, name: str | None
) -> torch.Tensor | None:
    """Given block scales as the kernels read them: contiguous e4m3 bytes, one per block."""
    if block_scale is None:
        return None
    check_block_scale(x, block_scale, name)
    return block_scale.detach().to(x.device).contiguous().view(torch.uint8)


def fake_quant(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    block_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` to NVFP4; equal bit for bit to :func:`reference.fake_quant`.

    Args:
        x: bf16, fp16 or fp32 tensor whose last dimension is a multiple of 16 (finite:
            unlike the reference, NaN and Inf are not checked, which would cost a sync).
        global_scale: static global scale ``2688 / amax``, or one per leading index (shape
            ``x.shape[:d]``, e.g. ``[E]`` for fused experts ``[E, N, K]``); computed from ``x`` when ``None``.
        block_scale: chosen e4m3 block scales ``[..., K / 16]`` (see
            :mod:`hf_qad.nvfp4.scale_search`), read by the kernel; ``e4m3(gs * amax / 6)``
            when ``None``.
        name: how to call ``x`` in error messages.

    Returns:
        A contiguous tensor of ``x``'s shape and dtype.
    """
    _check_blocks(x, name)
    scale_bits = _given_scale_bits(x, block_scale, name)
    rows = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_blocks = rows.numel() // BLOCK_SIZE
    gs, blocks_per_scale = _global_scales(x.shape, n_blocks, _global_scale(x, global_scale), x.device, name)
    _launch_elementwise(
        _fake_quant_kernel, n_blocks,
        rows, gs, out if scale_bits is None else scale_bits, out,
        n_blocks, rows.shape[1] // BLOCK_SIZE, rows.stride(0), blocks_per_scale, GIVEN_SCALE=scale_bits is not None,
    )  # fmt: skip
    return out


def fake_quant_activation(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Activations rounded as serving kernels do; equal bit for bit to
    :func:`reference.fake_quant_activation`.

    Args:
        x: bf16, fp16 or fp32 tensor whose last dimension is a multiple of 16 (finite).
        global_scale: static (calibrated) global scale ``2688 / amax``; computed from ``x``
            when ``None``.
        name: how to call ``x`` in error messages.

    Returns:
        A contiguous tensor of ``x``'s shape and dtype.
    """
    _check_blocks(x, name)
    rows = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_blocks = rows.numel() // BLOCK_SIZE
    _launch_elementwise(
        _fake_quant_activation_kernel, n_blocks,
        rows, _scale_on(_global_scale(x, global_scale), x.device), out, n_blocks, rows.shape[1] // BLOCK_SIZE,
        rows.stride(0),
    )  # fmt: skip
    return out


def quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    block_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> NVFP4Quantized:
    """Quantize ``x`` to packed NVFP4; the same bytes as :func:`reference.quantize`.

    Args:
        x: bf16, fp16 or fp32 tensor whose last dimension is a multiple of 16 (finite).
        global_scale: static global scale ``2688 / amax``, or one per leading index (shape
            ``x.shape[:d]``); computed from ``x`` when ``None``.
        block_scale: chosen e4m3 block scales ``[..., K / 16]``, read by the kernel and
            returned as given; ``e4m3(gs * amax / 6)`` when ``None``.
        name: how to call ``x`` in error messages.

    Returns:
        ``packed`` uint8 ``[..., K / 2]``, ``block_scale`` float8_e4m3fn ``[..., K / 16]``
        and the float32 global scale used (``[1]``, or the given per-leading-index shape).
    """
    _check_blocks(x, name)
    given_bits = _given_scale_bits(x, block_scale, name)
    rows = _rows(x)
    leading, k = x.shape[:-1], x.shape[-1]
    packed = torch.empty((*leading, k // 2), dtype=torch.uint8, device=x.device)
    scale_bits = given_bits
    if scale_bits is None:
        scale_bits = torch.empty((*leading, k // BLOCK_SIZE), dtype=torch.uint8, device=x.device)
    n_blocks = rows.numel() // BLOCK_SIZE
    given_gs = _global_scale(x, global_scale)
    gs, blocks_per_scale = _global_scales(x.shape, n_blocks, given_gs, x.device, name)
    _launch_elementwise(
        _quantize_kernel, n_blocks,
        rows, gs, packed, scale_bits, n_blocks, k // BLOCK_SIZE, rows.stride(0), blocks_per_scale,
        GIVEN_SCALE=given_bits is not None,
    )  # fmt: skip
    gs = gs.view(given_gs.shape) if gs.numel() > 1 else gs  # one per leading index keeps its shape
    if block_scale is not None:
        return NVFP4Quantized(packed, block_scale, gs)
    return NVFP4Quantized(packed, scale_bits.view(torch.float8_e4m3fn), gs)


def dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize packed NVFP4 to ``dtype``; equal bit for bit to :func:`reference.dequantize`.

    Args:
        packed: ``uint8 [..., K / 2]``, element ``2i`` in the low nibble.
        block_scale: ``float8_e4m3fn [..., K / 16]``.
        global_scale: ``float32 [1]``, ``2688 / amax``, or one per leading index (shape ``packed.shape[:d]``).
        dtype: bf16, fp16 or fp32.
    """
    _check_packed(packed, block_scale)
    out = torch.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=dtype, device=packed.device)
    n_blocks = block_scale.numel()
    gs, blocks_per_scale = _global_scales(packed.shape, n_blocks, global_scale, packed.device, "packed")
    _launch_elementwise(
        _dequantize_kernel, n_blocks,
        packed.contiguous(), block_scale.contiguous().view(torch.uint8), gs, out, n_blocks, blocks_per_scale,
    )  # fmt: skip
    return out


class _MatmulConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    target_programs: int = _TARGET_PROGRAMS  # K is split until there are about this many programs
    dot: bool = True  # tl.dot; False: elementwise products summed (a GEMV, block_m <= 4)


def _matmul_candidates(m: int, dtype: torch.dtype) -> list[_MatmulConfig]:
    """The tile configs autotuning times for ``m`` rows, the default (untuned) one first.

    Decode (small M) is bound by reading the weights: the smallest M tile tensor cores allow,
    or for M <= 4 a GEMV without them, and split-K for the parallelism, at a few program
    counts (one, two or four per SM of an H100). Prefill (large M) takes big tiles to reuse
    each dequantized weight tile. float32 inputs (no tensor cores unless TF32 is allowed)
    take half the K tile and two stages, so shared memory fits ~100 KiB GPUs too.
    """
    if m <= 16:
        tiles = [_MatmulConfig(16, 64, 128, 4, 4), _MatmulConfig(16, 32, 256, 4, 3),
                 _MatmulConfig(16, 64, 256, 4, 3), _MatmulConfig(16, 128, 128, 4, 3),
                 _MatmulConfig(16, 128, 256, 8, 3)]  # fmt: skip
        if m <= 4:
            gemv_m = triton.next_power_of_2(m)
            tiles += [_MatmulConfig(gemv_m, 64, 128, 4, 3, dot=False), _MatmulConfig(gemv_m, 128, 64, 4, 3, dot=False),
                      _MatmulConfig(gemv_m, 32, 256, 4, 3, dot=False)]  # fmt: skip
        candidates = [tile._replace(target_programs=programs) for tile in tiles for programs in (256, 132, 528)]
    elif m <= 64:
        candidates = [_MatmulConfig(64, 64, 128, 4, 3), _MatmulConfig(32, 64, 128, 4, 4),
                      _MatmulConfig(64, 128, 64, 4, 3), _MatmulConfig(64, 128, 128, 8, 3)]  # fmt: skip
    else:
        candidates = [_MatmulConfig(128, 128, 64, 8, 3), _MatmulConfig(128, 256, 64, 8, 3),
                      _MatmulConfig(64, 128, 64, 4, 4), _MatmulConfig(128, 64, 64, 4, 4)]  # fmt: skip
    if dtype == torch.float32:
        return [c._replace(block_k=c.block_k // 2, num_stages=2) for c in candidates]
    return candidates


def _k_tiles_per_split(tiles: int, k_tiles: int, target_programs: int) -> int:
    """K tiles per program, splitting K only when the output has too few tiles."""
    split_k = max(1, min(k_tiles, target_programs // tiles))
    return triton.cdiv(k_tiles, split_k)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs follow PyTorch's TF32 switch, as ``F.linear`` does; 16-bit ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check_linear(
    x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor, bias: torch.Tensor | None
) -> None:
    _check_blocks(x)
    _check_packed(packed, block_scale)
    if packed.dim() != 2 or packed.shape[1] * 2 != x.shape[-1]:
        raise ValueError(
            f"packed weight {tuple(packed.shape)} does not match input {tuple(x.shape)}: "
            "expected [N, K / 2] with K the input's last dimension."
        )
    if bias is not None and bias.shape != packed.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match N = {packed.shape[0]}.")


def _matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_bits: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: _MatmulConfig,
) -> None:
    """Launch the W4A16 kernel on ``x [M, K]`` into ``out [M, N]`` (M > 0) with ``config``.

    With split-K the programs write float32 partial sums that a second kernel adds up in
    a fixed order (deterministic, unlike atomics), adding the bias and rounding once.
    """
    (m, k), n = x.shape, packed.shape[0]
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(k, config.block_k)
    per_split = _k_tiles_per_split(tiles, k_tiles, config.target_programs)
    split_k = triton.cdiv(k_tiles, per_split)
    target = out if split_k == 1 else torch.empty((split_k, m, n), device=x.device)
    bias_arg = out if bias is None else bias.contiguous()  # any pointer when there is none
    _w4a16_kernel[(tiles, split_k)](
        x, packed, scale_bits, global_scale, bias_arg, target,
        m, n, k, x.stride(0), packed.stride(0), scale_bits.stride(0), per_split,
        HAS_BIAS=bias is not None, SPLIT=split_k > 1,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=8,
        INTERPRET=x.device.type != "cuda", PRECISION=_dot_precision(x.dtype), DOT=config.dot,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split_k > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](
            target, bias_arg, out, m * n, n, split_k, HAS_BIAS=bias is not None, BLOCK=1024,
        )  # fmt: skip


def tuned_configs() -> dict[tuple, NamedTuple]:
    """The configs autotuning chose so far in this process, for benchmarks to report.

    Keys start with the kernel's name: ``("_w4a16_kernel", rows bucket, N, K, dtype, device)``
    for the matmul, ``(kernel, input dtype, options, blocks bucket, device)`` for the
    elementwise kernels.
    """
    return dict(_TUNED)


def _matmul_config(args: tuple, m: int) -> _MatmulConfig:
    """The config for these operands: autotuned on CUDA unless ``HF_QAD_TRITON_AUTOTUNE=0``.

    Rows are bucketed to powers of two so that a training run's varying token counts
    retune a few times, not every step.
    """
    candidates = _matmul_candidates(m, args[0].dtype)
    x, packed = args[0], args[1]
    if not _autotuning(x.device):
        return candidates[0]
    key = ("_w4a16_kernel", triton.next_power_of_2(m), packed.shape[0], x.shape[1], x.dtype, x.device)
    return _fastest(key, candidates, lambda config: _matmul(*args, config))


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with ``W = dequantize(packed, block_scale, global_scale, x.dtype)``.

    The weight is dequantized tile by tile in registers (never materialized), multiplied
    with float32 accumulation, and the result is rounded once to ``x``'s dtype.

    Args:
        x: ``[..., K]`` activations (bf16, fp16 or fp32).
        packed: ``uint8 [N, K / 2]``.
        block_scale: ``float8_e4m3fn [N, K / 16]``.
        global_scale: ``float32 [1]``.
        bias: optional ``[N]``.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    _check_linear(x, packed, block_scale, bias)
    rows = _rows(x)
    out = torch.empty((*x.shape[:-1], packed.shape[0]), dtype=x.dtype, device=x.device)
    if rows.shape[0] > 0:
        args = (rows, _rows(packed), _rows(block_scale).view(torch.uint8), _scale_on(global_scale, x.device), bias,
                out.view(-1, packed.shape[0]))  # fmt: skip
        _matmul(*args, _matmul_config(args, rows.shape[0]))
    return out


def w4a4_linear(
    x: torch.Tensor,
    input_global_scale: torch.Tensor,
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`w4a16_linear` of ``fake_quant_activation(x, input_global_scale)``: NVFP4
    weights and activations, the activations rounded as vLLM's kernels round them.

    Args:
        x: ``[..., K]`` activations (bf16, fp16 or fp32).
        input_global_scale: the calibrated static activation global scale, ``float32 [1]``.
        packed, block_scale, global_scale: the packed weight (see :func:`w4a16_linear`).
        bias: optional ``[N]``.
    """
    x_hat = fake_quant_activation(x, input_global_scale)
    return w4a16_linear(x_hat, packed, block_scale, global_scale, bias)
