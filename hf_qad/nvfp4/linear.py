"""``NVFP4Linear``: a Linear layer whose weights (and activations) are NVFP4.

Two modes:

* **fake** (training): a trainable master ``weight`` in any float dtype. The forward
  fake-quantizes the weight (and, for W4A4, the input) and multiplies; gradients reach
  the master weight through the straight-through estimator.
* **packed** (inference/export): buffers ``weight_packed`` (uint8 ``[out, in/2]``),
  ``weight_scale`` (float8_e4m3fn ``[out, in/16]``) and ``weight_global_scale``
  (float32 ``[1]``), the names compressed-tensors' ``nvfp4-pack-quantized`` checkpoints
  use. The forward dequantizes (or runs the Triton W4A16 matmul on CUDA).

Both modes hold ``input_global_scale`` (float32 ``[1]``) when activations are quantized.
:meth:`NVFP4Linear.pack` converts fake to packed losslessly: the packed forward equals
the fake forward bit for bit on the same inputs (on CPU, where both use PyTorch's matmul).

Example:
    >>> import torch
    >>> from hf_qad.nvfp4.linear import NVFP4Linear
    >>> layer = NVFP4Linear.from_linear(torch.nn.Linear(32, 8), quantize_activations=False)
    >>> x = torch.randn(4, 32)
    >>> y_fake = layer(x)
    >>> _ = layer.pack()
    >>> torch.equal(layer(x), y_fake)
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_qad.nvfp4 import functional, learned_scales
from hf_qad.nvfp4.format import (
    BLOCK_SIZE,
    E4M3_MAX,
    E4M3_SUBNORMAL_STEP,
    NVFP4Quantized,
)
from hf_qad.nvfp4.scale_search import SCALE_METHODS, search_block_scales

__all__ = ["CLIP_PARAMETERS", "NVFP4Linear", "ZeroedBlocks", "keep_scale_dtypes", "zeroed_blocks"]

# Buffers that must keep their dtype when the model is cast with .to(dtype)/.half():
# packed codes, e4m3 block scales, and float32 global scales (rounding a global scale
# to bf16 would change every code computed from it).
_PROTECTED_BUFFERS = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")

# A weight block's scale is e4m3(gs * amax_block / 6) with gs = 448 * 6 / amax (amax of the
# tensor, or of its fused group): e4m3(448 * amax_block / amax). Below half the smallest e4m3
# subnormal (2**-9 / 2) it rounds to zero and the whole block quantizes to zero, so blocks vanish
# once amax / amax_block reaches 448 / 2**-10 (about 4.6e5; the 6 of E2M1 cancels out).
ZEROED_BLOCK_RATIO = E4M3_MAX / (E4M3_SUBNORMAL_STEP / 2)

CLIP_PARAMETERS = ("weight_clip", "input_clip")
"""Names of the learned clipping factors of ``learn_scales`` (:mod:`hf_qad.nvfp4.learned_scales`), ordinary parameters."""


class ZeroedBlocks(NamedTuple):
    """A quantized tensor most of whose weight blocks quantize to zero next to an outlier (:func:`zeroed_blocks`)."""

    index: int
    """Which of the tensors given to :func:`zeroed_blocks`."""
    amax: float
    """The largest weight magnitude setting its global scale."""
    ratio: float
    """``amax`` over the median non-zero block amax."""
    zeroed: int
    """Blocks that quantize to zero."""
    blocks: int
    """All its blocks."""

    def message(self, subject: str, fix: str) -> str:
        """The warning about it: ``subject`` names the weight (``"NVFP4Linear x: its"``), ``fix`` the way out."""
        return (
            f"{subject} largest weight ({self.amax:.3g}) is {self.ratio:.3g}x the median block amax, so {self.zeroed} "
            f"of its {self.blocks} weight blocks quantize to zero (from {ZEROED_BLOCK_RATIO:.3g}x on, block scales "
            f"underflow e4m3). Check the checkpoint for corrupt values, or {fix}."
        )


def zeroed_blocks(block_amax: torch.Tensor, amax: torch.Tensor) -> list[ZeroedBlocks]:
    """The tensors of a batch that lose at least half of their non-zero weight blocks to an outlier.

    A block quantizes to zero when its amax is :data:`ZEROED_BLOCK_RATIO` or more below the amax
    that sets its global scale. All-zero blocks (a pruned weight) are zero anyway and not counted.

    Args:
        block_amax: ``[G, B]``, the absolute maximum of each of the ``B`` blocks of ``G`` tensors.
        amax: the amax setting each block's global scale (that of its tensor, or of a fused group
            sharing one), broadcastable to ``[G, B]``.

    Example:
        >>> blocks = torch.tensor([[1.0, 1.0, 1e6], [1.0, 2.0, 3.0]])
        >>> [(z.index, z.zeroed, z.blocks) for z in zeroed_blocks(blocks, blocks.amax(-1, keepdim=True))]
        [(0, 2, 3)]
    """
    block_amax = block_amax.float()
    amax = amax.float().expand_as(block_amax)
    nonzero = block_amax > 0
    zeroed = (nonzero & (block_amax * ZEROED_BLOCK_RATIO <= amax)).sum(-1)
    flagged = ((zeroed > 0) & (2 * zeroed >= nonzero.sum(-1))).nonzero()[:, 0].tolist()
    found = []
    for index in flagged:
        largest = amax[index].max()
        median = block_amax[index][nonzero[index]].median()
        found.append(ZeroedBlocks(index, float(largest), float(largest / median), int(zeroed[index]),
                                  block_amax.shape[-1]))
    return found


@contextmanager
def keep_scale_dtypes(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], names: Iterable[str]) -> Iterator[None]:
    """Within this block (around ``nn.Module._apply``) the buffers ``names`` of ``module`` are set aside,
    then only moved to the device ``fn`` moves tensors to, never cast.

    ``nn.Module._apply`` casts every floating-point buffer on ``.to(dtype)`` / ``.half()``; float8 block
    scales and float32 global scales must keep their dtype (a global scale rounded to bf16 would
    change every code computed from it).
    """
    protected = {name: module._buffers.pop(name) for name in names if module._buffers.get(name) is not None}
    try:
        yield
    finally:
        for name, buffer in protected.items():
            probe = fn(torch.empty(0, device=buffer.device))
            module._buffers[name] = buffer.to(probe.device)


class NVFP4Linear(nn.Linear):
    """Linear layer with NVFP4 weights (W4A16) or weights and activations (W4A4).

    Args:
        in_features: size of each input sample; must be a multiple of 16.
        out_features: size of each output sample.
        bias: whether to learn an additive bias (kept in high precision).
        quantize_activations: W4A4 when ``True`` (needs calibrated input global
            scales, see :func:`hf_qad.nvfp4.calibration.calibrate`), W4A16 otherwise.
        packed: build the layer in packed mode (buffers, no master weight), as when
            loading a packed checkpoint.
        scale_method: how weight block scales are chosen, one of
            :data:`hf_qad.nvfp4.scale_search.SCALE_METHODS` (``"amax"`` by default).
        learn_scales: give the fake-mode layer trainable clipping factors in front of its scales
            (``weight_clip``, one per weight block, and for W4A4 ``input_clip``), starting at 1,
            where the layer equals the ``amax`` one bit for bit; see
            :mod:`hf_qad.nvfp4.learned_scales`. :meth:`pack` and the export store the scales they
            give. Needs ``scale_method="amax"``.
        device, dtype: of the master weight and bias (and of the clipping factors).

    Attributes:
        input_global_scale: ``2688 / amax`` of calibrated inputs; 0 until calibrated.
        global_scale_peers: other layers that must share this layer's weight global
            scale (fused q/k/v or gate/up in serving engines); empty by default.
        cache_frozen_weight: ``False`` by default. ``True`` quantizes a frozen master weight
            once and reuses it until the weight changes in place (PyTorch's version counter),
            as a LoRA base needs; set by :class:`hf_qad.quantizer.peft.NVFP4LoraLinear`, whose
            merges write through ``weight.data`` and call :meth:`mark_weight_changed`.
        quantization_enabled: ``True`` by default. ``False`` makes a fake-mode layer a
            plain high-precision Linear (no weight or activation quantization), so a
            frozen base computes its original logits, e.g. as the distillation teacher
            (:func:`hf_qad.teacher_mode`). A packed layer has no high-precision weight
            and refuses to run with it off.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quantize_activations: bool = True,
        packed: bool = False,
        scale_method: str = "amax",
        learn_scales: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if in_features % BLOCK_SIZE != 0:
            raise ValueError(
                f"NVFP4Linear needs in_features to be a multiple of {BLOCK_SIZE}, got "
                f"{in_features}; leave this layer unquantized (modules_to_not_convert)."
            )
        if scale_method not in SCALE_METHODS:
            raise ValueError(f"unknown scale_method {scale_method!r}; choose one of {', '.join(SCALE_METHODS)}.")
        if learn_scales and scale_method != "amax":
            raise ValueError(
                f"learn_scales starts from the amax scales; it cannot be combined with scale_method={scale_method!r}."
            )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quantize_activations = quantize_activations
        self.scale_method = scale_method
        self.learn_scales = learn_scales
        self.module_name: str | None = None
        self.global_scale_peers: tuple[NVFP4Linear, ...] = ()
        self.input_calibrated = False
        self.quantization_enabled = True
        self.cache_frozen_weight = False
        self._warned_uncalibrated = False
        self._frozen_cache: tuple[tuple, torch.Tensor] | None = None
        self._pinned_global_scale: tuple[int, torch.Tensor] | None = None
        if quantize_activations:
            self.register_buffer("input_global_scale", torch.zeros(1, dtype=torch.float32, device=device))
        if packed:
            self._become_packed(
                torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                torch.zeros(out_features, in_features // BLOCK_SIZE, dtype=torch.float8_e4m3fn, device=device),
                torch.ones(1, dtype=torch.float32, device=device),
            )
        elif learn_scales:
            self._add_clip_parameters(device, dtype)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quantize_activations: bool = True,
        scale_method: str = "amax",
        learn_scales: bool = False,
    ) -> NVFP4Linear:
        """A fake-mode layer sharing ``linear``'s weight and bias parameters."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            quantize_activations=quantize_activations,
            scale_method=scale_method,
            learn_scales=learn_scales,
            device="meta",
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        if quantize_activations:
            layer.input_global_scale = torch.zeros(1, dtype=torch.float32, device=linear.weight.device)
        if learn_scales:
            layer._add_clip_parameters(linear.weight.device, linear.weight.dtype)
        return layer

    def _add_clip_parameters(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        # In the master weight's dtype: FSDP2 needs one dtype for all trainable parameters of a unit.
        self.weight_clip = nn.Parameter(
            torch.ones(self.out_features, self.in_features // BLOCK_SIZE, device=device, dtype=dtype)
        )
        if self.quantize_activations:
            self.input_clip = nn.Parameter(torch.ones(1, device=device, dtype=dtype))

    @property
    def clip_parameters(self) -> dict[str, nn.Parameter]:
        """The learned clipping factors by name (``weight_clip``, ``input_clip``); empty without ``learn_scales``."""
        return {name: self._parameters[name] for name in CLIP_PARAMETERS if self._parameters.get(name) is not None}

    @property
    def is_packed(self) -> bool:
        """Whether the layer holds packed NVFP4 buffers instead of a master weight."""
        return "weight_packed" in self._buffers

    @property
    def qweight(self) -> torch.Tensor:
        """The packed weight buffer; absent in fake mode.

        peft looks up ``qweight`` before ``weight`` to find a quantized base layer's
        device, so LoRA can wrap a packed layer (whose ``weight`` is ``None``).
        """
        if not self.is_packed:
            raise AttributeError("qweight: NVFP4Linear in fake mode has a master `weight` instead.")
        return self.weight_packed

    def _become_packed(self, packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> None:
        # `weight` stays an attribute, set to None (no parameter, nothing in the state
        # dict): peft reads `layer.weight` of every nn.Linear it wraps.
        self.register_parameter("weight", None)
        self._frozen_cache = None
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", block_scale)
        self.register_buffer("weight_global_scale", global_scale)

    # ------------------------------------------------------------------ weight quantization
    def weight_global_scale_from_master(self) -> torch.Tensor:
        """``2688 / amax`` over this layer's master weight and its global-scale peers.

        Right after :meth:`unpack` (or :meth:`pin_weight_global_scale`), and until any weight of
        the group changes, the pinned scale (the checkpoint's stored one) is returned instead:
        recomputing it from the dequantized amax can land one float32 ulp away and shift block scales.
        """
        group = (self, *self.global_scale_peers)
        if all(layer._pinned_weight_unchanged() for layer in group):
            return self._pinned_global_scale[1]
        return functional.global_scale(*(layer.weight for layer in group))

    def pin_weight_global_scale(self, global_scale: torch.Tensor) -> None:
        """Quantize the current master weight with ``global_scale`` (float32 ``[1]``) until it changes.

        For a master weight written from quantized values (a packed checkpoint, GPTQ's result): their
        own amax gives a global scale slightly off the one they were quantized with. Once this
        layer's weight, or a global-scale peer's, changes in place (an optimizer step), or a peer has
        no pin, the scale is computed from the master weights again.
        """
        self._pinned_global_scale = (self.weight._version, global_scale.detach().float().reshape(1).clone())
        self._frozen_cache = None

    def weight_block_scales(
        self, weight: torch.Tensor, global_scale: torch.Tensor, weight_clip: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The e4m3 block scales this layer gives ``weight`` under ``global_scale``; ``None`` for ``amax``
        (computed inside the quantizer).

        ``weight`` may be any slice of whole 16-blocks of the master weight (``weight_clip`` the
        matching slice of the learned clips): a block's scale depends only on the block and the
        global scale, so slices get the scales the whole weight gets.
        """
        if weight_clip is not None:
            return learned_scales.clipped_block_scales(weight, global_scale, weight_clip)
        if self.scale_method == "amax":
            return None
        return search_block_scales(weight, global_scale, self.scale_method)

    def _weight_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global scale and, for a searched scale method or learned clips, the block scales."""
        global_scale = self.weight_global_scale_from_master()
        return global_scale, self.weight_block_scales(self.weight, global_scale, self.clip_parameters.get("weight_clip"))

    def quantized_weight(self) -> NVFP4Quantized:
        """The weight as packed NVFP4 (what :meth:`pack` stores and exporters write)."""
        if self.is_packed:
            return NVFP4Quantized(self.weight_packed, self.weight_scale, self.weight_global_scale)
        global_scale, block_scale = self._weight_scales()
        return functional.quantize(self.weight, global_scale, name=self._name(), block_scale=block_scale)

    def fake_quantized_weight(self) -> torch.Tensor:
        """The fake-quantized master weight, differentiable through the STE.

        With :attr:`cache_frozen_weight`, a frozen master weight (a LoRA base) is quantized
        once and cached until it changes in place (PyTorch bumps the tensor's version counter).
        """
        weight = self.weight
        clip = self.clip_parameters.get("weight_clip")
        trainable = weight.requires_grad or (clip is not None and clip.requires_grad)
        if trainable or not self.cache_frozen_weight:
            self._frozen_cache = None
            if clip is not None:
                global_scale = self.weight_global_scale_from_master()
                return learned_scales.fake_quant_clipped(weight, global_scale, clip, name=self._name())
            return functional.fake_quant(weight, *self._weight_scales(), name=self._name())
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device,
               tuple(p.weight._version for p in self.global_scale_peers), None if clip is None else clip._version)
        if self._frozen_cache is None or self._frozen_cache[0] != key:
            with torch.no_grad():
                value = functional.fake_quant(weight, *self._weight_scales(), name=self._name())
            self._frozen_cache = (key, value)
        return self._frozen_cache[1]

    @torch.no_grad()
    def pack(self) -> NVFP4Linear:
        """Convert to packed mode in place (drops the master weight and clips) and return ``self``.

        Learned clips are folded into what is stored: the weight's block scales, and the input clip
        into ``input_global_scale`` (see :meth:`exported_input_global_scale`).
        """
        if not self.is_packed:
            input_scale = self.exported_input_global_scale() if self.quantize_activations else None
            self._become_packed(*self.quantized_weight())
            if input_scale is not None:
                self.input_global_scale.copy_(input_scale)
            for name in self.clip_parameters:
                del self._parameters[name]
        return self

    @torch.no_grad()
    def unpack(self, dtype: torch.dtype = torch.bfloat16) -> NVFP4Linear:
        """Convert packed mode to fake mode in place, with the dequantized weight as master.

        Used to continue QAD from a packed checkpoint. With the ``amax`` scale method
        the dequantized master reproduces the stored scales and codes (tested), except
        that a stored negative zero comes back as positive zero (same value); searched
        scales may be chosen differently on the next search.
        """
        if self.is_packed:
            weight = functional.dequantize(*self.quantized_weight(), dtype=dtype)
            global_scale = self.weight_global_scale
            for name in ("weight_packed", "weight_scale", "weight_global_scale"):
                del self._buffers[name]
            self.weight = nn.Parameter(weight)
            self.pin_weight_global_scale(global_scale)
            if self.learn_scales:  # the stored scales are folded in: clipping starts again from 1
                self._add_clip_parameters(weight.device, dtype)
        return self

    def mark_weight_changed(self) -> None:
        """Forget everything derived from the master weight; call after writing it through ``.data``.

        Writes through ``weight.data`` (peft's LoRA merge and unmerge use them) bypass
        PyTorch's version counter, which the frozen-weight cache and the stored global
        scale of :meth:`unpack` rely on. The global-scale peers share the weight global
        scale, so their caches go too.
        """
        for layer in (self, *self.global_scale_peers):
            layer._frozen_cache = None
        self._pinned_global_scale = None

    @contextmanager
    def using_master_weight(self, weight: torch.Tensor, clips: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        """Within this block the layer reads ``weight`` as its master weight; the live one is put back after.

        For quantizing from weights the layer does not hold, such as the full weight FSDP or
        ZeRO-3 gathered from shards for a save (fused peers read it too). The stored global scale
        of :meth:`unpack` belongs to the live weight, so it is set aside meanwhile. ``clips``: the
        learned clipping factors gathered with it, by name, read in place of the live ones.

        Example:
            >>> import torch
            >>> layer = NVFP4Linear(32, 8, quantize_activations=False)
            >>> full = torch.randn(8, 32)
            >>> with layer.using_master_weight(full):
            ...     packed = layer.quantized_weight().packed
            >>> layer.weight is not full
            True
        """
        if self.is_packed:
            raise ValueError(f"NVFP4Linear {self._name() or ''} is packed: it has no master weight to replace.")
        replaced = {"weight": weight, **(clips or {})}
        live = {name: self._parameters[name] for name in replaced}
        pinned = self._pinned_global_scale
        for name, value in replaced.items():
            self._parameters[name] = nn.Parameter(value, requires_grad=False)
        self._pinned_global_scale = None
        self._frozen_cache = None
        try:
            yield
        finally:
            self._parameters.update(live)
            self._pinned_global_scale = pinned
            self._frozen_cache = None

    def checkpoint_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each NVFP4 tensor a checkpoint of this layer must hold, by name.

        Packed: ``weight_packed``, ``weight_scale``, ``weight_global_scale``; both modes:
        ``input_global_scale`` for W4A4. The master weight and bias are ordinary parameters.
        """
        tensors = {}
        if self.is_packed:
            tensors["weight_packed"] = ((self.out_features, self.in_features // 2), torch.uint8)
            tensors["weight_scale"] = ((self.out_features, self.in_features // BLOCK_SIZE), torch.float8_e4m3fn)
            tensors["weight_global_scale"] = ((1,), torch.float32)
        if self.quantize_activations:
            tensors["input_global_scale"] = ((1,), torch.float32)
        return tensors

    def warn_if_outlier_zeroes_blocks(self) -> float | None:
        """Warn when the weight's amax is so far above its typical block that blocks quantize to zero.

        Meant for load time, not for every step: one min/max pass over the master weight (and its
        fused peers, whose amax sets the shared global scale). It warns when at least half of the
        non-zero blocks fall :data:`ZEROED_BLOCK_RATIO` or more below that amax, i.e. when the ratio
        of the amax to the median non-zero block amax reaches it (all-zero blocks, as in a pruned
        weight, are zero anyway). Packed layers, and weights that are not whole on this process
        (ZeRO-3 shards), are skipped.

        Returns:
            the ratio of the amax to the median non-zero block amax when it warned, else ``None``.
        """
        weight = self.weight
        if self.is_packed or weight.is_meta or weight.numel() != self.out_features * self.in_features:
            return None
        low, high = weight.detach().unflatten(-1, (-1, BLOCK_SIZE)).aminmax(dim=-1)
        block_amax = torch.maximum(-low, high).float()
        own = block_amax.max()
        peers = [torch.stack(torch.aminmax(peer.weight.detach())).abs().amax().float()
                 for peer in self.global_scale_peers]
        amax = torch.stack([own, *peers]).amax()
        found = zeroed_blocks(block_amax.reshape(1, -1), amax.reshape(1, 1))
        if not found:
            return None
        source = "its" if bool(own >= amax) else "its fused group's"
        warnings.warn(
            found[0].message(f"NVFP4Linear {self._name() or ''}: {source}",
                             "keep this layer in high precision (modules_to_not_convert)"),
            stacklevel=2,
        )
        return found[0].ratio

    def _pinned_weight_unchanged(self) -> bool:
        record = self._pinned_global_scale
        return record is not None and self.weight is not None and self.weight._version == record[0]

    # ------------------------------------------------------------------ activations
    def exported_input_global_scale(self) -> torch.Tensor:
        """The W4A4 ``input_global_scale`` a checkpoint stores: the calibrated one, over the learned input clip.

        Exactly the global scale the fake-mode forward quantizes calibrated inputs with.
        """
        clip = self.clip_parameters.get("input_clip")
        if clip is None:
            return self.input_global_scale
        return learned_scales.clipped_global_scale(self.input_global_scale, clip)

    def _input_global_scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_calibrated:
            return self.input_global_scale
        if not self._warned_uncalibrated:
            warnings.warn(
                f"NVFP4Linear {self._name() or ''} quantizes activations (W4A4) but was not "
                "calibrated: using a per-batch global scale (2688 / amax of the current input) "
                "until hf_qad.calibrate(model, dataloader) sets a static one. Serving engines "
                "need the static scale.",
                stacklevel=3,
            )
            self._warned_uncalibrated = True
        return functional.global_scale(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantization_enabled:
            if self.is_packed:
                raise RuntimeError(
                    f"NVFP4Linear {self._name() or ''} is packed: it holds no high-precision weight, "
                    "so its quantization cannot be turned off."
                )
            return F.linear(x, self.weight, self.bias)
        input_scale = self._input_global_scale(x) if self.quantize_activations else None
        if self.is_packed:
            return functional.linear(x, self.quantized_weight(), self.bias, input_scale)
        clip = self.clip_parameters.get("input_clip")
        if input_scale is not None and clip is not None:
            x = learned_scales.fake_quant_activation_clipped(x, input_scale, clip, name=self._name())
        elif input_scale is not None:
            x = functional.fake_quant_activation(x, input_scale, name=self._name())
        return F.linear(x, self.fake_quantized_weight(), self.bias)

    # ------------------------------------------------------------------ state handling
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        scale = state_dict.get(prefix + "input_global_scale")
        if scale is not None:
            self.input_calibrated = bool((scale != 0).all())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        with keep_scale_dtypes(self, fn, _PROTECTED_BUFFERS):
            super()._apply(fn, recurse)
        self._frozen_cache = None
        return self

    def _name(self) -> str | None:
        return self.module_name

    def extra_repr(self) -> str:
        mode = "packed" if self.is_packed else "fake"
        scheme = "W4A4" if self.quantize_activations else "W4A16"
        learned = ", learned scales" if self.clip_parameters else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {scheme}, {mode}, scale_method={self.scale_method}{learned}"
        )

    @staticmethod
    def share_weight_global_scale(layers: Sequence[NVFP4Linear]) -> None:
        """Make ``layers`` (e.g. q/k/v) use one weight global scale, from their largest amax.

        vLLM fuses such layers into one matmul with a single global scale, so the
        exported block scales must be computed against that shared scale.
        """
        for layer in layers:
            layer.global_scale_peers = tuple(other for other in layers if other is not layer)
            layer._frozen_cache = None

