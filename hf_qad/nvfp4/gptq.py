"""GPTQ for NVFP4: error-compensating weight rounding from calibration activations.

Rounding each weight to its nearest NVFP4 value minimizes the weight's own error; GPTQ
(Frantar et al. 2022) minimizes the layer's *output* error on calibration inputs ``X``,
``||X W^T - X Q^T||``, by rounding the columns (input features) one at a time and moving the
columns not yet rounded to compensate, through the inverse of the Hessian ``H = X^T X``.

The NVFP4 version (:func:`gptq`)
--------------------------------
* **Scales fixed first.** Every block scale and the global scale are the layer's own, computed
  from the original weights before any column moves (its ``scale_method``, its learned clips):
  llm-compressor's GPTQModifier does the same for its NVFP4 (``tensor_group``) scheme, whose
  observer sets the group scales from the original weights once. GPTQ then only chooses codes.
* **Columns in 16-blocks.** Columns are rounded in order, each with its block's scale, by
  :func:`hf_qad.nvfp4.fake_quant` (the format's exact math), and each block of 16 columns is
  finished before the next one starts. Optionally (``act_order``) whole 16-column blocks go
  in the order of their Hessian diagonal, largest first (GPTQ's "act-order", at block
  granularity, so NVFP4's contiguous blocks and their scales are untouched).

How the result becomes the student
----------------------------------
A fake-quant student re-quantizes its master weight with scales derived from it at every forward
(the global scale from its amax, block scales from each block's amax, a search, or learned clips).
Writing GPTQ's dequantized values as the master does not by itself give back GPTQ's scales: a
block whose largest value GPTQ rounded below the top code (6) gets a smaller amax scale, and its
values round again. So GPTQ here is *constrained to what the student reproduces*:

1. the master weight becomes GPTQ's dequantized values (in its dtype), and the global scale
   GPTQ used is pinned (:meth:`~hf_qad.nvfp4.linear.NVFP4Linear.pin_weight_global_scale`) until
   the weight changes, as when a packed checkpoint is unpacked;
2. with learned clips (``NVFP4Config(learn_scales=True)``) each block's ``weight_clip`` is set so
   that the clipped amax scale *is* GPTQ's block scale, so every block keeps GPTQ's scale (a
   clip lands outside :data:`~hf_qad.nvfp4.learned_scales.CLIP_RANGE` only for a block GPTQ
   rounded to at most 2 times its scale);
3. each finished block's value is then what the student's own quantizer gives the new master
   block (computed with :meth:`~hf_qad.nvfp4.linear.NVFP4Linear.weight_block_scales`), and
   that value's error, not the one GPTQ first saw, is compensated in the remaining columns. A
   block the student rounds again (without clips: one with no ±6 code) is therefore still
   accounted for exactly.

So the student's fake-quant forward computes the returned rounding bit for bit, :meth:`pack` and
both exports write its codes and scales, and QAD continues from it like from any master weight
(the pin lapses at the first step; the scales then follow the trained weights as usual).

Inputs are the layer inputs of the *unquantized* model (every NVFP4 layer computes in high
precision while ``H`` is collected), all layers at once from one pass, as GPTQ without
"sequential" updates; ``H`` is float32 ``[in, in]`` per layer. W4A4 layers use the same
high-precision inputs. Fused experts (:class:`~hf_qad.nvfp4.moe.NVFP4Experts`) keep their
rounding (a warning names them).

Example:
    >>> import torch
    >>> from hf_qad.nvfp4.linear import NVFP4Linear
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(NVFP4Linear(64, 32, quantize_activations=False))
    >>> mixing = torch.randn(64, 64)  # correlated inputs, where compensation pays
    >>> result = gptq(model, [torch.randn(256, 64) @ mixing for _ in range(4)])
    >>> result["0"].gptq < result["0"].nearest
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import ExitStack, contextmanager
from itertools import islice
from typing import Any, Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from hf_qad.nvfp4 import functional
from hf_qad.nvfp4.calibration import run_batch
from hf_qad.nvfp4.format import BLOCK_SIZE, E2M1_MAX, NVFP4Quantized
from hf_qad.nvfp4.learned_scales import CLIP_RANGE
from hf_qad.nvfp4.linear import NVFP4Linear
from hf_qad.nvfp4.moe import NVFP4Experts
from hf_qad.nvfp4.reference import block_amax

__all__ = ["GPTQLayer", "gptq"]


class GPTQLayer(NamedTuple):
    """What :func:`gptq` did to one layer: relative output errors on the calibration inputs.

    Each error is ``||X (W - Q)^T||^2 / ||X W^T||^2`` for the layer's original weight ``W``.
    """

    nearest: float
    """With the layer's plain rounding (each weight to its nearest value)."""
    gptq: float
    """With the GPTQ rounding the layer now holds."""
    rerounded: float
    """Fraction of weight blocks whose GPTQ rounding the student could not keep and rounded again."""


@contextmanager
def _high_precision(model: nn.Module) -> Iterator[None]:
    """Every NVFP4 module of ``model`` computes unquantized inside this block."""
    modules = [m for m in model.modules() if isinstance(m, (NVFP4Linear, NVFP4Experts))]
    saved = [m.quantization_enabled for m in modules]
    try:
        for module in modules:
            module.quantization_enabled = False
        yield
    finally:
        for module, enabled in zip(modules, saved):
            module.quantization_enabled = enabled


def _hessians(model: nn.Module, layers: dict[str, NVFP4Linear], dataloader: Iterable[Any],
              num_batches: int | None) -> dict[str, torch.Tensor]:
    """``X^T X`` (float32) of each layer's inputs over the batches, summed over ranks under torch.distributed."""
    hessians = {name: torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device)
                for name, layer in layers.items()}
    seen = {name: 0 for name in layers}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, module.in_features).float().to(hessians[name].device)
            if not torch.isfinite(x).all():
                raise ValueError(f"gptq() calibration input of '{name}' contains NaN or Inf.")
            hessians[name].addmm_(x.T, x)
            seen[name] += x.shape[0]

        return hook

    was_training = model.training
    device = next(model.parameters()).device
    batches = 0
    with ExitStack() as stack:
        stack.callback(model.train, was_training)
        for name, layer in layers.items():
            stack.callback(layer.register_forward_pre_hook(recorder(name)).remove)
        stack.enter_context(_high_precision(model))
        model.eval()
        for batch in islice(dataloader, num_batches):
            run_batch(model, batch, device)
            batches += 1
    if batches == 0:
        raise ValueError("gptq() got an empty dataloader; pass at least one calibration batch.")
    names = sorted(layers)
    if dist.is_available() and dist.is_initialized():  # every rank rounds from the same H, to the same weights
        counts = torch.tensor([seen[name] for name in names], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        seen = dict(zip(names, counts.tolist()))
        for name in names:
            dist.all_reduce(hessians[name])
    missing = [name for name in names if seen[name] == 0]
    if missing:
        raise ValueError(f"gptq() calibration batches never reached these layers: {', '.join(missing)}")
    return hessians


def _inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``U^T U``), GPTQ's form of the inverse.

    Inputs that were always zero (a zero diagonal) get a unit diagonal: no compensation flows through them.
    """
    hessian = hessian.clone()
    diagonal = hessian.diagonal()
    diagonal[diagonal == 0] = 1
    diagonal += dampening * diagonal.mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


def _round_column(column: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """``column`` ``[N]`` rounded with one e4m3 block scale per row, through the format's own fake-quant."""
    # A block of 16 copies: the op quantizes whole blocks, and every copy rounds alike.
    blocks = column.unsqueeze(1).expand(-1, BLOCK_SIZE).contiguous()
    return functional.fake_quant(blocks, global_scale, block_scale.unsqueeze(1))[:, 0]


def _clips_reproducing(master: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """Learned clips ``[N, B]`` under which ``master``'s amax block scales become ``block_scale``.

    ``e4m3(gs * clip * amax / 6)`` lands on ``sb`` at ``clip = sb / (gs * amax / 6)``; far from the
    e4m3 rounding boundaries (3 mantissa bits against the clip's 8 or more). All-zero blocks keep 1.
    """
    amax = block_amax(master)
    clip = block_scale.float() / (global_scale.float() * amax.to(master.dtype).float() / E2M1_MAX)
    clip = torch.where(amax > 0, clip, torch.ones_like(clip))
    return clip.clamp(*CLIP_RANGE).to(dtype)


def _round_layer(layer: NVFP4Linear, hessian: torch.Tensor, scales: NVFP4Quantized, dampening: float,
                 act_order: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """GPTQ of one layer: its new master weight, learned clips (or ``None``), the values the student computes
    from them (its fake-quantized weight) and the count of blocks it rounds again."""
    weight = layer.weight.detach().float().clone()
    rows, columns = weight.shape
    blocks = columns // BLOCK_SIZE
    clip = layer.clip_parameters.get("weight_clip")
    global_scale, block_scale = scales.global_scale, scales.block_scale
    order = (torch.argsort(hessian.diagonal().reshape(blocks, BLOCK_SIZE).sum(-1), descending=True, stable=True)
             if act_order else torch.arange(blocks, device=weight.device))
    columns_order = (order.unsqueeze(1) * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=weight.device)).flatten()
    weight = weight[:, columns_order]
    factor = _inverse_hessian_factor(hessian[columns_order][:, columns_order], dampening)
    master = torch.empty(rows, columns, dtype=layer.weight.dtype, device=weight.device)
    final = torch.empty_like(master)
    clips = None if clip is None else torch.empty_like(clip)
    rerounded = 0
    for position, block in enumerate(order.tolist()):
        start, stop = position * BLOCK_SIZE, (position + 1) * BLOCK_SIZE
        current = weight[:, start:stop].clone()
        original = current.clone()
        block_factor = factor[start:stop, start:stop]
        scale = block_scale[:, block]
        rounded = torch.empty_like(current)
        for i in range(BLOCK_SIZE):
            rounded[:, i] = _round_column(current[:, i], global_scale, scale)
            error = (current[:, i] - rounded[:, i]) / block_factor[i, i]
            current[:, i:] -= error.unsqueeze(1) * block_factor[i, i:].unsqueeze(0)
        values = rounded.to(master.dtype)
        block_clip = None
        if clip is not None:
            block_clip = _clips_reproducing(values, global_scale, scale.unsqueeze(1), clip.dtype)
            clips[:, block] = block_clip[:, 0]
        # What the student computes from this master block: GPTQ's rounding, or the student's own again.
        kept = functional.fake_quant(values, global_scale, layer.weight_block_scales(values, global_scale, block_clip))
        rerounded += int((kept != values).any(-1).sum())
        master[:, block * BLOCK_SIZE:(block + 1) * BLOCK_SIZE] = values
        final[:, block * BLOCK_SIZE:(block + 1) * BLOCK_SIZE] = kept
        # Scaled errors e with e @ U_block = W_block - Q_block: the sequential updates' errors, for the kept values.
        errors = torch.linalg.solve_triangular(block_factor, original - kept.float(), upper=True, left=False)
        weight[:, stop:] -= errors @ factor[start:stop, stop:]
    return master, clips, final, rerounded


def _relative_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = weight.float() - rounded.float()
    reference = ((weight.float() @ hessian) * weight.float()).sum()
    return float(((delta @ hessian) * delta).sum() / reference) if reference > 0 else 0.0


@torch.no_grad()
def gptq(
    model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: int | None = 8,
    *,
    dampening: float = 0.01,
    act_order: bool = False,
) -> dict[str, GPTQLayer]:
    """Round every fake-mode :class:`NVFP4Linear` of ``model`` with GPTQ on calibration batches, in place.

    Afterwards each layer's master weight holds the GPTQ rounding (see the module docstring for
    how the student reproduces it exactly); training, :meth:`~NVFP4Linear.pack` and the exports
    continue from there. Run it after :func:`hf_qad.calibrate` (W4A4) and before training.

    Args:
        model: a model with fake-mode NVFP4 layers (master weights, whole on this process).
        dataloader: calibration batches as the model takes them (dicts of keyword arguments,
            tuples, or tensors), as for :func:`hf_qad.calibrate`.
        num_batches: how many batches to use; ``None`` uses all of them. Under torch.distributed
            the Hessians are summed over ranks, so every rank rounds alike.
        dampening: added to the Hessian's diagonal, as a fraction of its mean (GPTQ's ``percdamp``).
        act_order: round whole 16-column blocks in the order of their Hessian diagonal, largest first.

    Returns:
        Per layer (by module name), the relative output error on the calibration inputs before and
        after (:class:`GPTQLayer`).

    Raises:
        ValueError: no fake-mode NVFP4Linear, a packed or sharded one, a bad setting, an empty
            dataloader, or a layer the batches never reach.
    """
    if not 0 <= dampening < 1:
        raise ValueError(f"gptq() dampening must be in [0, 1), got {dampening}.")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"gptq() num_batches must be positive or None, got {num_batches}.")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    if not layers:
        raise ValueError("gptq() found no NVFP4Linear layer in the model; load it with an NVFP4Config first.")
    packed = sorted(name for name, layer in layers.items() if layer.is_packed)
    if packed:
        raise ValueError(f"gptq() needs master weights, but these layers are packed: {', '.join(packed[:4])}; "
                         "unpack them first (hf_qad.unpack_model).")
    sharded = sorted(name for name, layer in layers.items()
                     if layer.weight.numel() != layer.out_features * layer.in_features)
    if sharded:
        raise ValueError(f"gptq() needs whole weights, but these are sharded (FSDP / ZeRO-3): {', '.join(sharded[:4])}; "
                         "run it before sharding the model.")
    experts = sorted(name for name, m in model.named_modules() if isinstance(m, NVFP4Experts))
    if experts:
        warnings.warn(f"gptq() keeps the plain rounding of fused experts: {', '.join(experts)}.", stacklevel=2)
    hessians = _hessians(model, layers, dataloader, num_batches)
    # Every scale first: a layer's global scale may be shared with peers (fused q/k/v) whose weights change below.
    scales = {name: layer.quantized_weight() for name, layer in layers.items()}
    results = {}
    for name in sorted(layers):
        layer, hessian = layers[name], hessians.pop(name)
        master, clips, final, rerounded = _round_layer(layer, hessian, scales[name], dampening, act_order)
        nearest = functional.dequantize(*scales[name], dtype=torch.float32)
        results[name] = GPTQLayer(
            nearest=_relative_error(layer.weight, nearest, hessian),
            gptq=_relative_error(layer.weight, final, hessian),
            rerounded=rerounded / (master.numel() // BLOCK_SIZE),
        )
        layer.weight.copy_(master)
        if clips is not None:
            layer.weight_clip.copy_(clips)
        layer.pin_weight_global_scale(scales[name].global_scale)
    return results
