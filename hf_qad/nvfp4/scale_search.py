"""Choosing weight block scales better than ``amax / 6``.

The default NVFP4 block scale maps each block's absolute maximum onto the largest
E2M1 value, 6. That is not always the scale with the least error: E2M1's top step
(4 -> 6) is coarse, so mapping the maximum onto 4 (a finer grid near the top, as in
"Four Over Six", Cook et al. 2025) or letting a few large values clip in exchange
for finer steps can both reduce a block's error. Any e4m3 block scale is valid
NVFP4 — serving engines only read the stored scales — so for *weights* we can pick,
per block, the candidate with the smallest squared error. Activations keep
``amax / 6``: serving engines compute their block scales at run time.

Methods:

* ``"amax"``: ``e4m3(gs * amax / 6)``, compressed-tensors' and ModelOpt's default;
* ``"four_over_six"``: per block, the better of mapping the amax onto 6 or onto 4;
* ``"mse"``: per block, the best of mapping the amax onto each of
  ``4, 4.5, ..., 8`` (above 6 the largest values clip).

Each candidate costs one fake-quantization pass over the weight.

Example:
    >>> import torch
    >>> from hf_qad.nvfp4 import fake_quant, global_scale_from_amax
    >>> from hf_qad.nvfp4.scale_search import search_block_scales
    >>> w = torch.randn(64, 256)
    >>> gs = global_scale_from_amax(w.abs().amax())
    >>> err_amax = (fake_quant(w, gs) - w).pow(2).sum()
    >>> err_mse = (fake_quant(w, gs, block_scale=search_block_scales(w, gs, "mse")) - w).pow(2).sum()
    >>> bool(err_mse < err_amax)
    True
"""

from __future__ import annotations

import torch

from hf_qad.nvfp4.format import BLOCK_SIZE, E2M1_MAX, check_global_scale
from hf_qad.nvfp4.reference import (
    block_amax,
    block_scales,
    codes_to_values,
    effective_scales,
    round_to_e2m1_codes,
)

__all__ = ["SCALE_METHODS", "search_block_scales"]

# The value each block's amax is mapped onto; 6.0 (the amax scale) comes first so
# that ties keep the default.
_TARGETS: dict[str, tuple[float, ...]] = {
    "amax": (6.0,),
    "four_over_six": (6.0, 4.0),
    "mse": (6.0, 4.0, 4.5, 5.0, 5.5, 6.5, 7.0, 7.5, 8.0),
}

SCALE_METHODS = tuple(_TARGETS)
"""Names accepted by :func:`search_block_scales`."""


@torch.no_grad()
def search_block_scales(x: torch.Tensor, global_scale: torch.Tensor, method: str = "amax") -> torch.Tensor:
    """Per-block e4m3 scales of ``x`` (blocks of 16 along the last dim) chosen by ``method``.

    Args:
        x: the weight, last dimension a multiple of 16.
        global_scale: its global scale (``2688 / amax``), float32 ``[1]``, or one per leading
            index (shape ``x.shape[:d]``, e.g. ``[E]`` for fused experts ``[E, N, K]``).
        method: one of :data:`SCALE_METHODS`.

    Returns:
        ``float8_e4m3fn [..., K / 16]``, to pass as ``block_scale`` to quantize/fake_quant.
    """
    if method not in _TARGETS:
        raise ValueError(f"unknown scale method {method!r}; choose one of {', '.join(SCALE_METHODS)}.")
    count = check_global_scale(tuple(x.shape), global_scale)
    gs = global_scale.detach().float().to(x.device)
    # [1], or the leading shape followed by ones so that it broadcasts over each slice's blocks
    gs = gs.reshape(1) if count == 1 else gs.reshape(*gs.shape, *([1] * (x.dim() - gs.dim())))
    amax = block_amax(x)
    blocks = x.detach().float().unflatten(-1, (-1, BLOCK_SIZE))
    best_scale = best_error = None
    for target in _TARGETS[method]:
        scale = block_scales(amax * (E2M1_MAX / target), gs, x.dtype)
        if best_scale is None and len(_TARGETS[method]) == 1:
            return scale
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
