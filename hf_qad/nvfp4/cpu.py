"""Fast NVFP4 in eager PyTorch, bit for bit equal to :mod:`hf_qad.nvfp4.reference`.

The backend :mod:`hf_qad.nvfp4.functional` picks for CPU tensors (and for CUDA tensors
when ``HF_QAD_DISABLE_TRITON=1``); its ops take the same arguments as
:mod:`hf_qad.nvfp4.triton_kernels`'.

The reference builds a dozen full-size temporaries; this path runs every CPU
fake-quant of the training loop, so it is organised around memory traffic instead:

1. A first pass takes every block's absolute maximum on the integer view of ``x``:
   with the sign bit cleared, the bits of ``|x|`` order like its values (NaN above
   Inf), and an integer max is several times faster than a float max, which has to
   propagate NaN. The tensor's amax, and so the NaN/Inf check, come from these block
   maxima for free, with no ``isfinite`` pass.
2. The block and effective scales are computed once for the whole tensor (1/16 of
   the data), with the reference's operations in the reference's order.
3. A second pass works on chunks of :data:`CHUNK` elements with three float32
   scratch buffers that stay in cache, using in-place operations only, and writes
   each result chunk once.

Rounding without comparisons or float8 conversions: a float format with ``p``
mantissa bits has, at a value ``v``, the step ``2**(e - p)`` with
``e = max(floor(log2 v), emin)``. Adding ``C = 2**(23 - p + e)``, whose float32 ulp is
that step, makes the FPU round ``v`` onto the grid, to nearest even (the tie rule of
both formats); subtracting ``C`` again is exact. E2M1 (``p = 1, emin = 0``) is
rounded this way after clamping to 6, e4m3 block scales (``p = 3, emin = -6``) after
clamping to 448. For E2M1 the float32 bits of ``v + C`` are ``bits(C) + n``, where
``n`` counts grid steps, so the 3-bit code ``n + 2e`` takes two integer operations.
The formats' parameters (mantissa bits, smallest normals) come from
:mod:`hf_qad.nvfp4.format`.

The linear ops dequantize the weight to the activations' dtype and call ``F.linear``.

Example:
    >>> import torch
    >>> from hf_qad.nvfp4 import cpu, reference
    >>> w = torch.randn(64, 128, dtype=torch.bfloat16)
    >>> torch.equal(cpu.fake_quant(w), reference.fake_quant(w))
    True
    >>> q = cpu.quantize(w)
    >>> torch.equal(q.packed, reference.quantize(w).packed)
    True
    >>> torch.equal(cpu.dequantize(*q), reference.dequantize(*q))
    True
    >>> x = torch.randn(2, 128, dtype=torch.bfloat16)
    >>> cpu.w4a16_linear(x, *q).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from hf_qad.nvfp4.format import (
    BLOCK_SIZE,
    E2M1_MANTISSA_BITS,
    E2M1_MAX,
    E2M1_MAX_RECIPROCAL,
    E2M1_SMALLEST_NORMAL,
    E2M1_VALUES,
    E4M3_MANTISSA_BITS,
    E4M3_MAX,
    E4M3_SMALLEST_NORMAL,
    ZERO_BLOCK_SCALE,
    NVFP4Quantized,
    check_block_scale,
    check_global_scale,
    check_quantizable,
    global_scale_from_amax,
)
from hf_qad.nvfp4.reference import effective_scales

__all__ = [
    "CHUNK",
    "dequantize",
    "fake_quant",
    "fake_quant_activation",
    "global_scale",
    "quantize",
    "search_block_scales",
    "w4a16_linear",
    "w4a4_linear",
]

CHUNK = 1 << 19
"""Elements per chunk of the second pass (a multiple of :data:`BLOCK_SIZE`).

Each in-place operation costs a few microseconds of dispatch whatever its size, so
the chunk is as large as cache allows: three 2 MiB float32 buffers. On 2 Zen 4
cores, 2**19 beat L2-sized chunks (2**16 by about 35%, 2**17 by 20%) and 2**21 (15%).
"""

_F32_MANTISSA_BITS = 23
_F32_EXPONENT_BIAS = 127
_EXPONENT_MASK = 0x7F800000  # float32 exponent field
_SIGN_BIT = -(2**31)  # 0x80000000 as an int32
# For E2M1, C = 2**(23 - p + e) with p mantissa bits, so bits(C) >> (23 - p) is
# (127 + 23 - p + e) << p == _CODE_BIAS + (e << p), and e << p is the code of the
# first value of binade e.
_CODE_BIAS = (_F32_EXPONENT_BIAS + _F32_MANTISSA_BITS - E2M1_MANTISSA_BITS) << E2M1_MANTISSA_BITS
_SIGN_CODE = len(E2M1_VALUES)  # the sign bit sits just above the magnitude's index
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_dtype_and_shape(x: torch.Tensor, name: str | None) -> None:
    """``check_quantizable`` without its full ``isfinite`` pass (see :func:`_check_finite`)."""
    if not x.is_floating_point() or x.dim() == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        check_quantizable(x, name)  # raises, with the reference's message


def _check_finite(amax: float, x: torch.Tensor, name: str | None) -> None:
    """NaN or Inf anywhere makes the amax non-finite; the reference check then names them."""
    if not math.isfinite(amax):
        check_quantizable(x, name)  # raises, with the reference's message


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous ``[num_blocks, 16]`` rows, detached from autograd."""
    return x.detach().contiguous().view(-1, BLOCK_SIZE)


def _slices(num_rows: int, chunk_rows: int) -> Iterator[slice]:
    """Consecutive row ranges of at most ``chunk_rows`` rows covering ``num_rows``."""
    for start in range(0, num_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, num_rows))


def _chunk_rows(num_rows: int, chunk: int) -> int:
    """Rows of 16 per chunk of ``chunk`` elements; at least 1, at most ``num_rows``."""
    return max(1, min(num_rows, chunk // BLOCK_SIZE))


def _block_amax(blocks: torch.Tensor) -> torch.Tensor:
    """Absolute maximum of each block in float32, as :func:`~hf_qad.nvfp4.reference.block_amax`."""
    bits = blocks.view(_INT_OF_WIDTH[blocks.element_size()])
    sign_off = torch.iinfo(bits.dtype).max
    amax_bits = bits.new_empty(bits.shape[0])
    scratch = bits.new_empty(_chunk_rows(bits.shape[0], CHUNK), BLOCK_SIZE)
    for rows in _slices(bits.shape[0], scratch.shape[0]):
        magnitude = scratch[: rows.stop - rows.start]
        torch.bitwise_and(bits[rows], sign_off, out=magnitude)
        torch.amax(magnitude, dim=-1, out=amax_bits[rows])
    return amax_bits.view(blocks.dtype).float()


def global_scale(*tensors: torch.Tensor) -> torch.Tensor:
    """``2688 / amax`` over ``tensors`` (a weight and its global-scale peers), one pass over each.

    Equal to ``global_scale_from_amax(torch.stack([t.abs().amax() for t in tensors]))``, with
    the amax taken on the integer view (:func:`_block_amax`) instead of an ``|x|`` temporary.
    """
    if not tensors:
        raise ValueError("global_scale needs at least one tensor.")
    maxima = []
    for x in tensors:
        _check_dtype_and_shape(x, None)
        amax = _block_amax(_blocks(x))
        maxima.append(amax.max() if amax.numel() else amax.new_zeros(()))
    return global_scale_from_amax(torch.stack(maxima))


def _global_scale(
    amax: torch.Tensor, global_scale: torch.Tensor | None, x: torch.Tensor, name: str | None
) -> torch.Tensor:
    """The given global scale, or ``2688 / amax`` of ``x``; checks ``x`` is finite on the way.

    A global scale per leading index (shape ``x.shape[:d]``, e.g. ``[E]`` for fused experts
    ``[E, N, K]``) comes back as one value per block, so that every later step stays elementwise.
    """
    tensor_amax = amax.max() if amax.numel() else amax.new_zeros(())
    _check_finite(tensor_amax.item(), x, name)
    if global_scale is None:
        global_scale = global_scale_from_amax(tensor_amax)
    if global_scale.numel() > 1:
        return _per_block_global_scale(global_scale, x.shape, x.numel() // BLOCK_SIZE, name).to(x.device)
    return global_scale.detach().float().reshape(1).to(x.device)


def _per_block_global_scale(
    global_scale: torch.Tensor, shape: torch.Size, num_blocks: int, name: str | None
) -> torch.Tensor:
    """A global scale of shape ``shape[:d]`` repeated over the ``num_blocks`` blocks of a tensor of ``shape``."""
    blocks_per_scale = num_blocks // check_global_scale(tuple(shape), global_scale, name)
    return global_scale.detach().float().reshape(-1).repeat_interleave(blocks_per_scale)


def _add_rounding_constant(
    values: torch.Tensor, constant: torch.Tensor, smallest_normal: float, mantissa_bits: int
) -> None:
    """Round ``values`` (non-negative float32) onto a float format's grid by adding ``C``.

    ``C = 2**(23 - mantissa_bits) * 2**floor(log2(max(v, smallest_normal)))`` has a float32
    ulp equal to the format's step at ``v`` (subnormal step below ``smallest_normal``), so
    ``v + C`` is rounded to that grid by the FPU, to nearest even. ``C`` is left in
    ``constant``; subtracting it is exact. ``values`` must not exceed the format's maximum.
    """
    torch.clamp(values, min=smallest_normal, out=constant)
    constant.view(torch.int32).bitwise_and_(_EXPONENT_MASK)
    constant.mul_(2.0 ** (_F32_MANTISSA_BITS - mantissa_bits))
    values.add_(constant)


def _amax_block_scales(amax: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`~hf_qad.nvfp4.reference.block_scales` as float32 values, in the same order.

    PyTorch's float8 conversion is scalar code (about 4 ns an element); the same
    round-to-nearest-even onto the e4m3 grid by :func:`_add_rounding_constant` is
    vectorized (checked equal on every float32 in [0, 448]).
    """
    scale = (amax.to(dtype) / E2M1_MAX).float()  # amax / 6 rounded in x's dtype, as the reference
    scale.mul_(global_scale).clamp_(-E4M3_MAX, E4M3_MAX)
    constant = torch.empty_like(scale)
    _add_rounding_constant(scale, constant, E4M3_SMALLEST_NORMAL, E4M3_MANTISSA_BITS)
    scale.sub_(constant)
    return scale.masked_fill_(scale == 0, ZERO_BLOCK_SCALE)


def _round_chunk(
    blocks: torch.Tensor,
    scale: torch.Tensor,
    signed: torch.Tensor,
    magnitude: torch.Tensor,
    magic: torch.Tensor,
    runtime: bool = False,
) -> None:
    """Leave ``y = x / scale`` in ``signed``, ``min(|y|, 6) + C`` in ``magnitude`` and the
    constant ``C`` of :func:`_add_rounding_constant` in ``magic``.

    With ``runtime``, ``scale`` is the run-time kernels' reciprocal: ``y = x * scale``,
    keeping the sign of zero as their E2M1 conversion does.
    """
    signed.copy_(blocks)  # in float32 like the reference, whatever x's dtype
    if runtime:
        signed.mul_(scale)
    else:
        signed.div_(scale)
        # The reference's sign is y < 0, so a zero y is positive; but -0.0 / s keeps its
        # sign bit. Adding +0.0 clears it and changes nothing else.
        signed.add_(0.0)
    torch.abs(signed, out=magnitude).clamp_(max=E2M1_MAX)
    _add_rounding_constant(magnitude, magic, E2M1_SMALLEST_NORMAL, E2M1_MANTISSA_BITS)


def _rounded_chunks(
    blocks: torch.Tensor, scale: torch.Tensor, runtime: bool = False
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, signed, magnitude, magic)`` of :func:`_round_chunk`, chunk by chunk.

    The buffers are reused: consume each chunk before asking for the next.
    """
    chunk_rows = _chunk_rows(blocks.shape[0], CHUNK)
    buffers = blocks.new_empty(3, chunk_rows, BLOCK_SIZE, dtype=torch.float32).unbind(0)
    for rows in _slices(blocks.shape[0], chunk_rows):
        signed, magnitude, magic = (buffer[: rows.stop - rows.start] for buffer in buffers)
        _round_chunk(blocks[rows], scale[rows], signed, magnitude, magic, runtime)
        yield rows, signed, magnitude, magic


def _prepare(
    x: torch.Tensor,
    global_scale: torch.Tensor | None,
    block_scale: torch.Tensor | None,
    name: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks ``x``; returns its blocks, float32 block scales, effective scales and global scale."""
    _check_dtype_and_shape(x, name)
    if block_scale is not None:
        check_block_scale(x, block_scale, name)
    blocks = _blocks(x)
    amax = _block_amax(blocks)
    global_scale = _global_scale(amax, global_scale, x, name)
    if block_scale is None:
        scale_b = _amax_block_scales(amax, global_scale, x.dtype)
    else:
        scale_b = block_scale.detach().reshape(-1).float()
    scale = (scale_b / global_scale).unsqueeze(-1)  # effective_scales' sb / gs
    return blocks, scale_b, scale, global_scale


def fake_quant(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    block_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``x``; bit for bit :func:`hf_qad.nvfp4.reference.fake_quant`.

    Args:
        x: floating-point tensor whose last dimension is a multiple of 16.
        global_scale: a fixed global scale (``2688 / amax``), or one per leading index (shape
            ``x.shape[:d]``, e.g. ``[E]`` for fused experts ``[E, N, K]``); computed from ``x`` when ``None``.
        block_scale: chosen e4m3 block scales ``[..., K / 16]`` (see
            :mod:`hf_qad.nvfp4.scale_search`); ``e4m3(gs * amax / 6)`` when ``None``.
        name: how to call ``x`` in error messages.

    Returns:
        A new tensor with the shape and dtype of ``x``, without autograd history.

    Example:
        >>> import torch
        >>> from hf_qad.nvfp4.cpu import fake_quant
        >>> fake_quant(torch.tensor([[0.1, -0.3] + [6.0] * 14])).tolist()[0][:3]
        [0.0, -0.5, 6.0]
    """
    blocks, _, scale, _ = _prepare(x, global_scale, block_scale, name)
    return _fake_quant_blocks(blocks, scale, scale).view(x.shape)


def _fake_quant_blocks(
    blocks: torch.Tensor, scale: torch.Tensor, dequantize_scale: torch.Tensor, runtime: bool = False
) -> torch.Tensor:
    """Blocks rounded by :func:`_rounded_chunks` times ``dequantize_scale`` (``sb / gs``)."""
    out = torch.empty_like(blocks)
    for rows, signed, magnitude, magic in _rounded_chunks(blocks, scale, runtime):
        magnitude.sub_(magic)  # exact: the E2M1 magnitude
        sign = signed.view(torch.int32).bitwise_and_(_SIGN_BIT)
        magnitude.view(torch.int32).bitwise_or_(sign)
        torch.mul(magnitude, dequantize_scale[rows], out=out[rows])  # float32, then one rounding to x.dtype
    return out


def fake_quant_activation(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Activations rounded as serving kernels do; bit for bit
    :func:`hf_qad.nvfp4.reference.fake_quant_activation`.

    The block scales take the reference's float32 steps (the e4m3 rounding by
    :func:`_add_rounding_constant`, which leaves zero at zero); the elements are
    multiplied by the reciprocal scale and rounded like :func:`fake_quant`'s.

    Args:
        x: floating-point tensor whose last dimension is a multiple of 16.
        global_scale: static (calibrated) global scale ``2688 / amax``; computed from
            ``x`` when ``None``.
        name: how to call ``x`` in error messages.

    Example:
        >>> import torch
        >>> from hf_qad.nvfp4.cpu import fake_quant_activation
        >>> fake_quant_activation(torch.tensor([[-0.0, -0.3] + [6.0] * 14])).tolist()[0][:3]
        [-0.0, -0.5, 6.0]
    """
    _check_dtype_and_shape(x, name)
    blocks = _blocks(x)
    amax = _block_amax(blocks)
    global_scale = _global_scale(amax, global_scale, x, name)
    block_scale = amax.mul_(torch.tensor(E2M1_MAX_RECIPROCAL)).mul_(global_scale).clamp_(max=E4M3_MAX)
    constant = torch.empty_like(block_scale)
    _add_rounding_constant(block_scale, constant, E4M3_SMALLEST_NORMAL, E4M3_MANTISSA_BITS)
    block_scale.sub_(constant)
    reciprocal = torch.reciprocal(block_scale * torch.reciprocal(global_scale))  # correctly rounded
    reciprocal.masked_fill_(block_scale == 0, 0.0)
    dequantize_scale = block_scale.div_(global_scale)  # effective_scales' sb / gs
    return _fake_quant_blocks(blocks, reciprocal.unsqueeze(-1), dequantize_scale.unsqueeze(-1), True).view(x.shape)


def search_block_scales(x: torch.Tensor, global_scale: torch.Tensor, targets: Sequence[float]) -> torch.Tensor:
    """Per block, the e4m3 scale mapping its amax onto one of ``targets`` with the least squared
    error; bit for bit :func:`hf_qad.nvfp4.reference.search_block_scales` (same errors, same ties).

    The training forward runs this on every weight at every step (``scale_method="mse"``), so it
    takes the fast path's shape: the candidates' scales are computed for all blocks at once (1/16
    of the data), then each chunk of ``|x|`` is rounded under every candidate in cache-sized
    in-place buffers, and only the index of the best candidate is kept per block. The error is
    taken on magnitudes: ``(|v| * s - |x|)**2`` equals the reference's ``(v * s - x)**2`` bit for
    bit, since ``v`` has ``x``'s sign and float rounding is symmetric. Arguments and result as the
    reference's.

    Example:
        >>> import torch
        >>> from hf_qad.nvfp4 import reference
        >>> w = torch.randn(64, 256)
        >>> gs = global_scale(w)
        >>> targets = (6.0, 4.0, 5.0)
        >>> torch.equal(search_block_scales(w, gs, targets).view(torch.uint8),
        ...             reference.search_block_scales(w, gs, targets).view(torch.uint8))
        True
    """
    _check_dtype_and_shape(x, None)
    blocks = _blocks(x)
    amax = _block_amax(blocks)
    if global_scale.numel() > 1:
        gs = _per_block_global_scale(global_scale, x.shape, blocks.shape[0], None).to(x.device)
    else:
        gs = global_scale.detach().float().reshape(1).to(x.device)
    candidates = torch.stack([_amax_block_scales(amax * (E2M1_MAX / target), gs, x.dtype) for target in targets])
    if len(targets) > 1:
        steps = (candidates / gs).unsqueeze(-1)  # effective_scales' sb / gs, [targets, blocks, 1]
        best = torch.zeros(blocks.shape[0], dtype=torch.long, device=x.device)
        chunk_rows = _chunk_rows(blocks.shape[0], CHUNK)
        buffers = blocks.new_empty(3, chunk_rows, BLOCK_SIZE, dtype=torch.float32).unbind(0)
        errors = blocks.new_empty(2, chunk_rows, dtype=torch.float32).unbind(0)
        for rows in _slices(blocks.shape[0], chunk_rows):
            count = rows.stop - rows.start
            magnitude, rounded, magic = (buffer[:count] for buffer in buffers)
            best_error, error = (buffer[:count] for buffer in errors)
            magnitude.copy_(blocks[rows]).abs_()  # in float32 like the reference, whatever x's dtype
            for index in range(len(targets)):
                step = steps[index, rows]
                torch.div(magnitude, step, out=rounded).clamp_(max=E2M1_MAX)
                _add_rounding_constant(rounded, magic, E2M1_SMALLEST_NORMAL, E2M1_MANTISSA_BITS)
                rounded.sub_(magic).mul_(step).sub_(magnitude).square_()
                torch.sum(rounded, dim=-1, out=best_error if index == 0 else error)
                if index > 0:
                    better = error < best_error
                    best[rows].masked_fill_(better, index)
                    best_error.copy_(torch.where(better, error, best_error))
        candidates = candidates.gather(0, best.unsqueeze(0))
    return _to_e4m3(candidates[0], x)


def _codes(signed: torch.Tensor, magnitude: torch.Tensor, magic: torch.Tensor) -> torch.Tensor:
    """The int32 codes ``sign << 3 | n + 2e`` of a rounded chunk, computed in place."""
    magic_bits = magic.view(torch.int32)
    codes = magnitude.view(torch.int32).sub_(magic_bits)  # n, the grid steps
    exponent = magic_bits.bitwise_right_shift_(_F32_MANTISSA_BITS - E2M1_MANTISSA_BITS)  # _CODE_BIAS + 2e
    codes.add_(exponent).sub_(_CODE_BIAS)
    sign = signed.view(torch.int32).bitwise_right_shift_(31).bitwise_and_(_SIGN_CODE)
    return codes.bitwise_or_(sign)


def _pack(codes: torch.Tensor, out: torch.Tensor) -> None:
    """Pack int32 codes two per byte into ``out`` (uint8): even element in the low nibble.

    Viewed as little-endian int64, a pair is ``lo | hi << 32``; ``>> 28`` moves ``hi``
    to bits 4-7, and the cast to uint8 drops everything above bit 7.
    """
    pairs = codes.view(torch.int64)
    torch.bitwise_or(pairs, pairs >> 28, out=out)


def quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    block_scale: torch.Tensor | None = None,
    *,
    name: str | None = None,
) -> NVFP4Quantized:
    """Quantize ``x`` to packed NVFP4; bit for bit :func:`hf_qad.nvfp4.reference.quantize`.

    Args:
        x: floating-point tensor whose last dimension is a multiple of 16.
        global_scale: a fixed global scale (``2688 / amax``), or one per leading index (shape
            ``x.shape[:d]``, e.g. ``[E]`` for fused experts ``[E, N, K]``); computed from ``x`` when ``None``.
        block_scale: chosen e4m3 block scales ``[..., K / 16]``, returned as given;
            ``e4m3(gs * amax / 6)`` when ``None``.
        name: how to call ``x`` in error messages.

    Example:
        >>> import torch
        >>> from hf_qad.nvfp4.cpu import quantize
        >>> q = quantize(torch.tensor([[0.5, -6.0] + [0.0] * 14]))
        >>> hex(q.packed[0, 0].item()), q.block_scale.float().tolist(), q.global_scale.tolist()
        ('0xf1', [[448.0]], [448.0])
    """
    given_global_scale = global_scale
    blocks, scale_b, scale, global_scale = _prepare(x, global_scale, block_scale, name)
    packed = blocks.new_empty(blocks.shape[0], BLOCK_SIZE // 2, dtype=torch.uint8)
    for rows, signed, magnitude, magic in _rounded_chunks(blocks, scale):
        _pack(_codes(signed, magnitude, magic), packed[rows])
    return NVFP4Quantized(
        packed.view(*x.shape[:-1], x.shape[-1] // 2),
        block_scale if block_scale is not None else _to_e4m3(scale_b, x),
        global_scale if global_scale.numel() == 1 else given_global_scale.detach().float().to(x.device),
    )


def _to_e4m3(scale_b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Float32 block scales (already e4m3 values, so exact) as e4m3 ``[..., K / 16]``."""
    return scale_b.to(torch.float8_e4m3fn).view(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE)


def _byte_table() -> torch.Tensor:
    """``[256, 2]`` float32: the values of a byte's low and high nibble codes."""
    magnitudes = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    values = torch.cat([magnitudes, -magnitudes])  # code 8 is -0.0, like the reference
    byte = torch.arange(256)
    return torch.stack([values[byte & 0xF], values[byte >> 4]], dim=-1)


_BYTE_TABLE = _byte_table()


def dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize packed NVFP4 to ``dtype``; bit for bit :func:`hf_qad.nvfp4.reference.dequantize`.

    Each byte is looked up in a 256-entry table of value pairs, then multiplied by its
    block's ``sb / gs`` in float32 and rounded once to ``dtype``. ``global_scale`` is one
    value, or one per leading index of ``packed`` (shape ``packed.shape[:d]``, as
    :func:`quantize` takes it).

    Example:
        >>> import torch
        >>> from hf_qad.nvfp4.cpu import dequantize, quantize
        >>> dequantize(*quantize(torch.tensor([[0.5, -6.0] + [0.0] * 14]))).tolist()[0][:3]
        [0.5, -6.0, 0.0]
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NVFP4 data must be uint8, got {packed.dtype}.")
    pairs = packed.contiguous().view(-1, BLOCK_SIZE // 2)
    if global_scale.numel() > 1:  # one per leading index, e.g. [E] for fused experts
        global_scale = _per_block_global_scale(global_scale, packed.shape, pairs.shape[0], "packed")
    scale = effective_scales(block_scale.reshape(-1, 1), global_scale.reshape(-1, 1).to(pairs.device))
    out = pairs.new_empty(pairs.shape[0], BLOCK_SIZE, dtype=dtype)
    chunk_rows = _chunk_rows(pairs.shape[0], CHUNK)
    index = pairs.new_empty(chunk_rows * BLOCK_SIZE // 2, dtype=torch.int32)
    values = pairs.new_empty(chunk_rows, BLOCK_SIZE, dtype=torch.float32)
    table = _BYTE_TABLE.to(pairs.device)
    for rows in _slices(pairs.shape[0], chunk_rows):
        count = rows.stop - rows.start
        chunk_index = index[: count * BLOCK_SIZE // 2]
        chunk_index.copy_(pairs[rows].view(-1))  # index_select wants int32/int64 indices
        torch.index_select(table, 0, chunk_index, out=values[:count].view(-1, 2))
        torch.mul(values[:count], scale[rows], out=out[rows])  # float32, then one rounding
    return out.view(*packed.shape[:-1], packed.shape[-1] * 2)


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with ``W = dequantize(packed, block_scale, global_scale, x.dtype)``.

    Args:
        x: ``[..., K]`` activations.
        packed: ``uint8 [N, K / 2]``.
        block_scale: ``float8_e4m3fn [N, K / 16]``.
        global_scale: ``float32 [1]``.
        bias: optional ``[N]``.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    return F.linear(x, dequantize(packed, block_scale, global_scale, dtype=x.dtype), bias)


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
        x: ``[..., K]`` activations.
        input_global_scale: the calibrated static activation global scale, ``float32 [1]``.
        packed, block_scale, global_scale: the packed weight (see :func:`w4a16_linear`).
        bias: optional ``[N]``.
    """
    return w4a16_linear(fake_quant_activation(x, input_global_scale), packed, block_scale, global_scale, bias)
