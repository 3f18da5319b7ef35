"""An independent copy of the serving engines' run-time activation rounding, and its hard inputs.

The formula of vLLM's ``cvt_warp_fp16_to_fp4`` kernel (TensorRT-LLM and FlashInfer share
it), written from scratch in NumPy float32 with every rounding step spelled out, so that
the library's three implementations (:func:`hf_qad.nvfp4.reference.fake_quant_activation`,
the CPU path and the Triton kernel) are checked against something that shares no code with
them. The kernel's ``rcp.approx`` reciprocals are taken correctly rounded (see "Activations"
in :mod:`hf_qad.nvfp4.format`). Only the float8 conversion is borrowed from PyTorch.
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _round_to_e2m1(y: np.ndarray) -> np.ndarray:
    """Nearest E2M1 value of float32 ``y`` after saturating at 6, ties to the even index,
    keeping ``y``'s sign bit (``-0.0`` stays negative)."""
    magnitude = np.minimum(np.abs(y), F32(6)).astype(np.float64)  # float64: exact distances
    distance = np.abs(magnitude[..., None] - E2M1_GRID)
    nearest = distance == distance.min(-1, keepdims=True)  # one value, or two on a tie
    even = nearest & (np.arange(len(E2M1_GRID)) % 2 == 0)
    index = np.where(even.any(-1), even.argmax(-1), nearest.argmax(-1))
    return np.copysign(E2M1_GRID[index], y).astype(F32)


def runtime_fake_quant(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` (last dim a multiple of 16) as the serving kernel rounds it."""
    blocks = x.detach().float().numpy().reshape(-1, 16)
    gs = F32(global_scale.item())
    amax = np.abs(blocks).max(axis=1)  # exact: a float32 maximum of the input's values
    sixth = F32(1) / F32(6)  # the kernel's reciprocal of 6 in float32
    scale = gs * (amax * sixth)  # float32, this order
    scale = np.minimum(scale, F32(448))  # satfinite
    sb = torch.from_numpy(scale).to(torch.float8_e4m3fn).float().numpy()  # e4m3, nearest even
    inverse_gs = F32(1) / gs
    denominator = np.where(sb == 0, F32(1), sb * inverse_gs)
    reciprocal = np.where(sb == 0, F32(0), F32(1) / denominator)  # 0 for a zero scale
    y = blocks * reciprocal[:, None]  # float32
    values = _round_to_e2m1(y)
    dequantized = values * (sb / gs)[:, None]  # float32: value * (sb / gs)
    return torch.from_numpy(dequantized.reshape(x.shape)).to(x.dtype)


def adversarial_activations(dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(x, global_scale)`` pairs where run-time rounding is easiest to get wrong.

    * ``ties_gs1`` / ``ties_gs4``: every element is an exact E2M1 midpoint (0.25 .. 5) of its
      block, both signs, with global scales 1 and 4 and power-of-two block scales (so the
      reciprocals are exact and the midpoints survive the products);
    * ``zero_blocks``: all-zero blocks, all-negative-zero blocks, and blocks whose scale
      underflows e4m3 to zero beside normal ones;
    * ``saturated``: blocks up to 8x beyond the calibrated amax (block scale clamped at 448,
      elements saturating at 6);
    * ``subnormal_scales``: block scales in e4m3's subnormal range (2**-9 .. 2**-6);
    * ``negative_zeros``: ``-0.0`` and tiny negative values that round to negative zero;
    * ``near_midpoints``: values one float ulp either side of every midpoint;
    * ``random_heavy``: heavy-tailed values, where the two formulas differ most.
    """
    g = torch.Generator().manual_seed(11)
    one, four = torch.tensor([1.0]), torch.tensor([4.0])  # 2688 / 2688 and 2688 / 672
    midpoints = torch.tensor(E2M1_MIDPOINTS + (6.0,))

    def ties(c: float) -> torch.Tensor:
        block = torch.cat([midpoints * c, -midpoints * c])  # amax 6c: block scale c (gs = 1)
        return torch.stack([block, block.flip(0), block.roll(3)])

    ties_gs4 = torch.cat([ties(2.0**e) for e in range(-8, 3)]) / 4  # block scale 4c / 4: q = 1 / c
    zero = torch.randn(6, 64, generator=g)
    zero[0] = 0.0
    zero[1] = -0.0
    zero[2, :16] = 0.0
    zero[3, 16:32] = -0.0
    zero[4, 32:48] = torch.randn(16, generator=g) * 1e-4  # 1e-4 * gs / 6 underflows e4m3
    saturated = torch.randn(8, 64, generator=g) * 8
    subnormal = torch.randn(8, 64, generator=g) * torch.logspace(-4, -1.5, 8).unsqueeze(-1)
    negative = -torch.rand(4, 32, generator=g) * 1e-3
    negative[:, ::3] = -0.0
    negative[:, 15] = 6.0  # block amax 6: tiny values round to -0, the -0.0 stay -0.0
    near = torch.tensor(E2M1_MIDPOINTS).repeat_interleave(3).reshape(-1, 3)
    near = torch.stack([torch.nextafter(near[:, 0], torch.tensor(0.0)), near[:, 1],
                        torch.nextafter(near[:, 2], torch.tensor(9.0))], -1).reshape(-1)
    near = torch.cat([near, torch.tensor([6.0, -6.0, -2.5])]).reshape(1, 24)
    near = torch.cat([near, near[:, :8]], -1).repeat(4, 1) * torch.tensor([[1.0], [0.5], [3.0], [0.1]])
    cases = {
        "ties_gs1": (torch.cat([ties(2.0**e) for e in range(-8, 7)]), one),
        "ties_gs4": (ties_gs4, four),
        "zero_blocks": (zero, None),
        "saturated": (saturated, torch.tensor([2688 / 4.0])),  # calibrated amax 4
        "subnormal_scales": (subnormal, one),
        "negative_zeros": (negative, None),
        "near_midpoints": (near, None),
        "random_heavy": (torch.distributions.StudentT(2.0).sample((64, 128)), None),
    }
    out = {}
    for name, (x, gs) in cases.items():
        x = x.to(dtype)
        if gs is None:  # the per-batch fallback: the input's own amax
            gs = (2688 / x.float().abs().amax()).reshape(1)
        out[name] = (x, gs.float())
    return out
