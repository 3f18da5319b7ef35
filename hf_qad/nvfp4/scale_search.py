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

Each candidate costs about one fake-quantization of the weight. The search runs on the eager
fast path (:func:`hf_qad.nvfp4.cpu.search_block_scales`, on any device), which makes the same
choices as the readable :func:`hf_qad.nvfp4.reference.search_block_scales`.

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

from hf_qad.nvfp4 import cpu

__all__ = ["SCALE_METHODS", "SCALE_TARGETS", "search_block_scales"]

SCALE_TARGETS: dict[str, tuple[float, ...]] = {
    "amax": (6.0,),
    "four_over_six": (6.0, 4.0),
    "mse": (6.0, 4.0, 4.5, 5.0, 5.5, 6.5, 7.0, 7.5, 8.0),
}
"""The values each method may map a block's amax onto; 6.0 (the amax scale) comes first so that ties keep the default."""

SCALE_METHODS = tuple(SCALE_TARGETS)
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
    if method not in SCALE_TARGETS:
        raise ValueError(f"unknown scale method {method!r}; choose one of {', '.join(SCALE_METHODS)}.")
    return cpu.search_block_scales(x, global_scale, SCALE_TARGETS[method])
