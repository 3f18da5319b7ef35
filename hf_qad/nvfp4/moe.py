"""``NVFP4Experts``: transformers 5's fused MoE experts with NVFP4 weights (and activations).

transformers 5 holds a MoE layer's experts as one module with two 3-D parameters,
``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj [E, H, I]``. This module
keeps those names (so transformers' weight conversion still loads and saves the per-expert
``experts.N.gate_proj.weight`` ... of the checkpoint) and quantizes each expert as its own NVFP4
tensor: block scales along the input dimension (``H`` for gate_up, ``I`` for down), one weight
global scale per expert, shared by its gate and up halves (vLLM runs them as one ``w13`` matmul
with a single global scale).

Why a replacement module
------------------------
The quantizer swaps the model's experts module for this one, as transformers' own FP8 quantizer
swaps in ``FP8Experts`` (``integrations/finegrained_fp8.py``). The alternatives do not fit W4A4:
an ``ExpertsInterface`` function (``use_experts_implementation``) reads ``self.gate_up_proj``
directly and is chosen per config, not per module, and a parametrization of ``gate_up_proj``
renames the parameter (``parametrizations.gate_up_proj.original``) and still leaves the
activations of each expert's two matmuls out of reach. The forward here follows transformers'
default ``grouped_mm`` experts (one grouped matmul per projection over all experts), so with
quantization off it computes the original module's outputs bit for bit.

Two modes, as :class:`~hf_qad.nvfp4.linear.NVFP4Linear`:

* **fake** (training): the master parameters ``gate_up_proj`` / ``down_proj``, fake-quantized in
  one batched call per projection (a global scale per expert, no loop over experts), gradients
  through the straight-through estimator;
* **packed**: per projection ``P`` in ``gate_up_proj``, ``down_proj``, the buffers ``P_packed``
  (uint8 ``[E, N, K/2]``), ``P_scale`` (float8_e4m3fn ``[E, N, K/16]``) and ``P_global_scale``
  (float32 ``[E, shards]``; 2 shards, gate and up, for gate_up_proj and 1 for down_proj).

Both hold ``P_input_global_scale`` (float32 ``[E, shards]``) for W4A4: these are the names
transformers' reversed weight conversion gives the per-expert checkpoint tensors
``experts.N.gate_proj.weight_packed`` ... (stacked over experts, gate and up concatenated).

Layouts
-------
transformers marks each experts class with its layout (``use_experts_implementation``:
``is_transposed``, ``is_concatenated``, ``has_bias``) and gives it a gating function
(``_apply_gate``). :meth:`NVFP4Experts.from_experts` keeps all of it: gpt-oss' experts store
their weights transposed (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``), gate and up
interleaved, with biases ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias [E, H]`` and a clamped
SwiGLU; the master parameters keep that layout, and the weight is quantized through its
transpose, so block scales still run along each expert's input dimension. The packed buffers
are ``[E, N, K]`` in every layout (rows = output features, as any NVFP4 Linear), biases stay in
high precision, and the gate is transformers' own function (with the module's ``alpha`` /
``limit``), called on the same ``gate_up`` output.

W4A4 activations
----------------
Each expert's input scales are calibrated from the tokens routed to it (:func:`calibrate`), and
exported per expert. At serving, vLLM's NVFP4 MoE kernels (FlashInfer and its emulation backend)
quantize every expert's input with one scale per layer and projection: it takes
``a_scale = 1 / input_global_scale`` per expert and uses ``1 / max(a_scale)`` over the experts
(``prepare_nvfp4_moe_layer_for_fi_or_cutlass`` and ``convert_to_nvfp4_moe_kernel_format`` in
vLLM). The student quantizes its activations with that same scale
(:meth:`NVFP4Experts.serving_input_global_scale`), rounded as the serving kernels round.

Example:
    >>> import torch
    >>> from hf_qad.nvfp4.moe import NVFP4Experts
    >>> experts = NVFP4Experts(4, 32, 16, quantize_activations=False)
    >>> _ = torch.nn.init.normal_(experts.gate_up_proj), torch.nn.init.normal_(experts.down_proj)
    >>> x, index, weights = torch.randn(5, 32), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    >>> y_fake = experts(x, index, weights)
    >>> _ = experts.pack()
    >>> torch.equal(experts(x, index, weights), y_fake)
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

# _grouped_linear: transformers' grouped matmul of experts, torch's grouped_mm where the device, dtype and
# torch version allow it, else its own loop with a one-op backward. Private, but that dispatch is what we want.
from transformers.integrations.moe import _default_apply_gate, _grouped_linear

from hf_qad.nvfp4 import functional
from hf_qad.nvfp4.format import BLOCK_SIZE, NVFP4Quantized, global_scale_from_amax, global_scales_from_amax
from hf_qad.nvfp4.linear import keep_scale_dtypes, zeroed_blocks
from hf_qad.nvfp4.scale_search import SCALE_METHODS, search_block_scales

__all__ = ["EXPERT_PROJECTIONS", "EXPERT_TENSOR_SUFFIXES", "NVFP4Experts", "unsupported_experts_layout"]

EXPERT_PROJECTIONS: dict[str, int] = {"gate_up_proj": 2, "down_proj": 1}
"""The fused projections and how many checkpoint Linears (shards) each holds per expert."""

EXPERT_TENSOR_SUFFIXES: dict[str, str] = {
    "weight_packed": "_packed",
    "weight_scale": "_scale",
    "weight_global_scale": "_global_scale",
    "input_global_scale": "_input_global_scale",
}
"""Checkpoint tensor name of a per-expert Linear -> suffix of the fused attribute holding it
(``experts.N.gate_proj.weight_packed`` -> ``experts.gate_up_proj_packed``), transformers'
convention for quantized companions of fused parameters (``gate_up_proj_scale_inv`` for FP8)."""


def unsupported_experts_layout(module: nn.Module) -> str | None:
    """Why ``module`` (a fused experts module) cannot become :class:`NVFP4Experts`, or ``None``.

    Supported: the layouts transformers' ``use_experts_implementation`` describes for gated
    experts without a post-expert norm: concatenated (``[gate; up]``) or interleaved gate and up
    rows, stored ``[E, N, K]`` or transposed ``[E, K, N]``, with or without biases
    (``gate_up_proj_bias`` / ``down_proj_bias``), with the class's own gating function
    (``_apply_gate``, e.g. gpt-oss' clamped SwiGLU) or the default ``act_fn(gate) * up``; and
    dimensions that are multiples of 16.
    """
    gate_up, down = (getattr(module, name, None) for name in EXPERT_PROJECTIONS)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        return "it has no 3-D gate_up_proj and down_proj parameters"
    if not getattr(module, "has_gate", True) or getattr(module, "has_post_expert_norm", False):
        return "its experts have no gate_up projection or a norm after each expert"
    biases = {n for n, _ in module.named_parameters(recurse=False) if n.endswith("_bias")}
    if biases - {name + "_bias" for name in EXPERT_PROJECTIONS} or (biases and not getattr(module, "has_bias", False)):
        return f"its expert biases {sorted(biases)} are not the gate_up_proj_bias and down_proj_bias transformers describes"
    if not callable(getattr(module, "act_fn", None)) and not hasattr(type(module), "_apply_gate"):
        return "it has no act_fn"
    transposed = getattr(module, "is_transposed", False)
    num_experts, two_i, hidden = gate_up.shape if not transposed else gate_up.transpose(1, 2).shape
    expected = (num_experts, hidden, two_i // 2) if not transposed else (num_experts, two_i // 2, hidden)
    if tuple(down.shape) != expected or two_i % 2:
        layout = "[E, H, 2I] and [E, I, H]" if transposed else "[E, 2I, H] and [E, H, I]"
        return f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not {layout}"
    if hidden % BLOCK_SIZE or (two_i // 2) % BLOCK_SIZE:
        return f"its hidden ({hidden}) and intermediate ({two_i // 2}) sizes are not multiples of {BLOCK_SIZE}"
    return None


class NVFP4Experts(nn.Module):
    """Fused MoE experts with NVFP4 weights (W4A16) or weights and activations (W4A4).

    Args:
        num_experts: ``E``.
        hidden_size: ``H``, a multiple of 16.
        intermediate_size: ``I`` of one expert, a multiple of 16.
        act_fn: the gate activation (the model's ``experts.act_fn``); SiLU when ``None``.
        is_transposed: master weights stored ``[E, K, N]`` (``gate_up_proj [E, H, 2I]``), as gpt-oss.
        is_concatenated: gate and up rows as ``[gate; up]``; ``False``: interleaved (gate, up, gate, ...),
            which needs ``share_gate_up_global_scale``.
        has_bias: experts with biases ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]``
            (kept in high precision).
        apply_gate: ``fn(module, gate_up_out) -> intermediate``, transformers' ``_apply_gate`` of the
            experts class (it reads its settings, e.g. gpt-oss' ``alpha`` / ``limit``, from the module);
            transformers' default ``act_fn(gate) * up`` when ``None``.
        quantize_activations: W4A4 when ``True`` (needs :func:`hf_qad.calibrate`), else W4A16.
        packed: build in packed mode (buffers, no master weights), as when loading an export.
        scale_method: weight block scales, one of :data:`~hf_qad.nvfp4.scale_search.SCALE_METHODS`.
        share_gate_up_global_scale: one weight global scale for an expert's gate and up halves
            (what vLLM's fused w13 needs); ``False`` gives each half its own.
        device, dtype: of the master weights.

    Attributes:
        input_calibrated: whether the input global scales come from calibration.
        quantization_enabled: ``False`` makes a fake-mode module compute in high precision
            (the original experts' outputs), e.g. as the distillation teacher.
        module_name: the module's name in the model, for messages.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        quantize_activations: bool = True,
        packed: bool = False,
        scale_method: str = "amax",
        share_gate_up_global_scale: bool = True,
        is_transposed: bool = False,
        is_concatenated: bool = True,
        has_bias: bool = False,
        apply_gate: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not is_concatenated and not share_gate_up_global_scale:
            # The [E, 2] global scales are gate and up halves of the rows; interleaved rows would
            # need a de-interleaving copy per step for a variant vLLM cannot serve anyway.
            raise ValueError(
                "NVFP4Experts with interleaved gate and up rows needs share_gate_up_global_scale=True "
                "(one weight global scale per expert, what vLLM's fused w13 uses)."
            )
        if hidden_size % BLOCK_SIZE or intermediate_size % BLOCK_SIZE:
            raise ValueError(
                f"NVFP4Experts needs hidden ({hidden_size}) and intermediate ({intermediate_size}) sizes that are "
                f"multiples of {BLOCK_SIZE}; keep these experts in high precision (modules_to_not_convert)."
            )
        if scale_method not in SCALE_METHODS:
            raise ValueError(f"unknown scale_method {scale_method!r}; choose one of {', '.join(SCALE_METHODS)}.")
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()
        self.quantize_activations = quantize_activations
        self.scale_method = scale_method
        self.share_gate_up_global_scale = share_gate_up_global_scale
        self.is_transposed = is_transposed
        self.is_concatenated = is_concatenated
        self.has_bias = has_bias
        self.gate_function = apply_gate if apply_gate is not None else _default_apply_gate
        self.module_name: str | None = None
        self.input_calibrated = False
        self.quantization_enabled = True
        self._warned_uncalibrated = False
        self._observed: dict[str, torch.Tensor] | None = None
        self._unpacked_global_scales: dict[str, tuple[int, torch.Tensor]] = {}
        shapes = self.weight_shapes()
        for name, (e, n, k) in shapes.items():
            shape = (e, k, n) if is_transposed else (e, n, k)
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
            if has_bias:
                self.register_parameter(name + "_bias", nn.Parameter(torch.empty(e, n, device=device, dtype=dtype)))
        if quantize_activations:
            for name, shards in EXPERT_PROJECTIONS.items():
                self.register_buffer(name + "_input_global_scale",
                                     torch.zeros(num_experts, shards, dtype=torch.float32, device=device))
        if packed:
            for name, (e, n, k) in shapes.items():
                self._become_packed(name, NVFP4Quantized(
                    torch.zeros(e, n, k // 2, dtype=torch.uint8, device=device),
                    torch.zeros(e, n, k // BLOCK_SIZE, dtype=torch.float8_e4m3fn, device=device),
                    torch.ones(e, EXPERT_PROJECTIONS[name], dtype=torch.float32, device=device),
                ))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_experts(
        cls,
        module: nn.Module,
        *,
        quantize_activations: bool = True,
        scale_method: str = "amax",
        share_gate_up_global_scale: bool = True,
        packed: bool = False,
    ) -> NVFP4Experts:
        """An NVFP4Experts for a transformers experts module, on its device and dtype.

        In fake mode it shares ``module``'s parameters; packed, it has empty buffers to load into.
        Biases are shared in both modes. The layout, biases and gating function are ``module``'s
        (:func:`unsupported_experts_layout` lists what is supported), and its plain settings
        (gpt-oss' ``alpha``, ``limit``, ...) are copied, since its gating function reads them.

        Raises:
            ValueError: if :func:`unsupported_experts_layout` names a reason.
        """
        reason = unsupported_experts_layout(module)
        if reason is not None:
            raise ValueError(
                f"hf_qad cannot quantize these fused experts ({type(module).__name__}): {reason}. Keep them in high "
                "precision with modules_to_not_convert=[..., '<their module name>']."
            )
        transposed = getattr(module, "is_transposed", False)
        gate_up = module.gate_up_proj.transpose(1, 2) if transposed else module.gate_up_proj
        num_experts, two_i, hidden = gate_up.shape
        has_bias = getattr(module, "has_bias", False)
        layer = cls(
            num_experts, hidden, two_i // 2, getattr(module, "act_fn", None),
            quantize_activations=quantize_activations, packed=packed, scale_method=scale_method,
            share_gate_up_global_scale=share_gate_up_global_scale, is_transposed=transposed,
            is_concatenated=getattr(module, "is_concatenated", True), has_bias=has_bias,
            apply_gate=getattr(type(module), "_apply_gate", None), device="meta", dtype=module.gate_up_proj.dtype,
        )  # fmt: skip
        for key, value in vars(module).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float)) and not hasattr(layer, key):
                setattr(layer, key, value)
        if not packed:
            layer.gate_up_proj, layer.down_proj = module.gate_up_proj, module.down_proj
        if has_bias:
            layer.gate_up_proj_bias, layer.down_proj_bias = module.gate_up_proj_bias, module.down_proj_bias
        device = module.gate_up_proj.device
        for name, tensor in list(layer._buffers.items()):
            layer._buffers[name] = torch.zeros_like(tensor, device=device) if tensor.is_meta else tensor
        return layer

    def weight_shapes(self) -> dict[str, tuple[int, int, int]]:
        """The weights' shapes ``[E, N, K]`` (output, input) by projection, as quantized and packed.

        Also in packed mode, which holds no master weights; transposed master weights are ``[E, K, N]``.
        """
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}

    @property
    def is_packed(self) -> bool:
        """Whether the module holds packed NVFP4 buffers instead of master weights."""
        return "gate_up_proj_packed" in self._buffers

    def _become_packed(self, name: str, quantized: NVFP4Quantized) -> None:
        self.register_parameter(name, None)
        for tensor_name, tensor in zip(("weight_packed", "weight_scale", "weight_global_scale"), quantized):
            self.register_buffer(name + EXPERT_TENSOR_SUFFIXES[tensor_name], tensor)

    # ------------------------------------------------------------------ weight quantization
    def _shards(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight [E, N, K]`` as ``[E, shards, N / shards, K]`` (gate and up apart when concatenated;
        interleaved rows share their expert's scale, so the grouping does not matter); a copy when
        ``weight`` is a transposed master's view."""
        shards = EXPERT_PROJECTIONS[name]
        return weight.reshape(weight.shape[0], shards, weight.shape[1] // shards, weight.shape[2])

    def output_major(self, weight: torch.Tensor) -> torch.Tensor:
        """A master-layout weight (this module's, or a teacher's of the same layout) as ``[E, N, K]``, a view:
        NVFP4 blocks run along each expert's input ``K``; transposed layouts are transposed back."""
        return weight.transpose(1, 2) if self.is_transposed else weight

    def weight_global_scales(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``2688 / amax`` per expert and shard, float32 ``[E, shards]``, from the master weight.

        Gate and up share their expert's scale unless ``share_gate_up_global_scale`` is off. Right
        after :meth:`unpack`, while the weight is unchanged, the checkpoint's stored scales are
        returned (recomputing them from the dequantized amax could land one ulp away).

        Args:
            name: ``"gate_up_proj"`` or ``"down_proj"``.
            weight: a full master weight to use instead of the live one (e.g. gathered for a save).
        """
        live = getattr(self, name)
        if weight is None:
            weight = live
            record = self._unpacked_global_scales.get(name)
            if record is not None and record[0] == weight._version:
                return record[1]
        view = self._shards(name, self.output_major(weight.detach()))
        amax = torch.maximum(-view.amin(dim=(-2, -1)), view.amax(dim=(-2, -1))).float()  # [E, shards]
        if self.share_gate_up_global_scale:
            amax = amax.amax(dim=1, keepdim=True).expand_as(amax)
        return global_scales_from_amax(amax).contiguous()

    def _weight_scales(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        global_scale = self.weight_global_scales(name, weight if weight is not getattr(self, name) else None)
        if self.scale_method == "amax":
            return global_scale, None
        return global_scale, search_block_scales(self._shards(name, self.output_major(weight)), global_scale,
                                                 self.scale_method)

    def quantized_weight(self, name: str, weight: torch.Tensor | None = None) -> NVFP4Quantized:
        """Projection ``name`` as packed NVFP4: ``[E, N, K/2]``, ``[E, N, K/16]``, ``[E, shards]``.

        Args:
            name: ``"gate_up_proj"`` or ``"down_proj"``.
            weight: a full master weight to quantize instead of the live one (e.g. gathered from
                shards for a save); fake mode only.
        """
        if self.is_packed:
            return NVFP4Quantized(*(getattr(self, name + EXPERT_TENSOR_SUFFIXES[t])
                                    for t in ("weight_packed", "weight_scale", "weight_global_scale")))
        weight = getattr(self, name) if weight is None else weight
        global_scale, block_scale = self._weight_scales(name, weight)
        packed, block_scale, _ = functional.quantize(self._shards(name, self.output_major(weight)), global_scale,
                                                     block_scale, name=self._label(name))
        e, n, k = self.weight_shapes()[name]
        return NVFP4Quantized(packed.reshape(e, n, k // 2), block_scale.reshape(e, n, k // BLOCK_SIZE), global_scale)

    def fake_quantized_weight(self, name: str) -> torch.Tensor:
        """Projection ``name`` fake-quantized (all experts in one call), ``[E, N, K]``, differentiable through the STE."""
        weight = getattr(self, name)
        global_scale, block_scale = self._weight_scales(name, weight)
        return functional.fake_quant(self._shards(name, self.output_major(weight)), global_scale, block_scale,
                                     name=self._label(name)).view(self.weight_shapes()[name])

    def dequantized_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Projection ``name`` as its NVFP4 values, ``[E, N, K]`` in ``dtype``: the packed buffers dequantized,
        or in fake mode the master weight quantized and dequantized (no gradient)."""
        packed, block_scale, global_scale = self.quantized_weight(name)
        shards = self._shards(name, packed)
        return functional.dequantize(shards, block_scale.view(*shards.shape[:-1], -1), global_scale,
                                     dtype=dtype).view(*packed.shape[:-1], -1)

    def _weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if self.is_packed:
            return self.dequantized_weight(name, dtype)
        if not self.quantization_enabled:
            return self.output_major(getattr(self, name))
        return self.fake_quantized_weight(name)

    @torch.no_grad()
    def warn_if_outlier_zeroes_blocks(self) -> dict[tuple[str, int], float]:
        """Warn, per expert and projection, when an outlier weight makes most of its blocks quantize to zero.

        :meth:`hf_qad.nvfp4.linear.NVFP4Linear.warn_if_outlier_zeroes_blocks` for each tensor with
        its own weight global scale: an expert's ``gate_up_proj`` (gate and up together when they
        share their scale, else each half) and its ``down_proj``, in one pass over the master weights. Meant for load time; packed
        modules and weights not whole on this process (ZeRO-3 shards) are skipped.

        Returns:
            ``{(projection, expert): ratio of its amax to its median non-zero block amax}`` for each warning.

        Example:
            >>> experts = NVFP4Experts(2, 32, 16, quantize_activations=False)
            >>> _ = torch.nn.init.ones_(experts.gate_up_proj), torch.nn.init.ones_(experts.down_proj)
            >>> experts.gate_up_proj.data[1, 0, 0] = 1e7
            >>> import warnings
            >>> with warnings.catch_warnings(record=True):
            ...     list(experts.warn_if_outlier_zeroes_blocks())
            [('gate_up_proj', 1)]
        """
        shapes = self.weight_shapes()
        if self.is_packed or any(getattr(self, name).is_meta or tuple(self.output_major(getattr(self, name)).shape)
                                 != shape for name, shape in shapes.items()):
            return {}
        warned: dict[tuple[str, int], float] = {}
        for name in shapes:
            low, high = self._shards(name, self.output_major(getattr(self, name).detach())).unflatten(-1, (-1, BLOCK_SIZE)).aminmax(dim=-1)
            block_amax = torch.maximum(-low, high).float()  # [E, shards, N / shards, K / 16]
            amax = block_amax.amax(dim=(-2, -1), keepdim=True)  # what each shard's global scale comes from
            # One tensor per global scale: an expert's gate and up together when they share it
            groups = 1 if self.share_gate_up_global_scale else EXPERT_PROJECTIONS[name]
            if self.share_gate_up_global_scale:
                amax = amax.amax(dim=1, keepdim=True)
            flat = block_amax.reshape(self.num_experts * groups, -1)
            for found in zeroed_blocks(flat, amax.expand_as(block_amax).reshape_as(flat)):
                expert, shard = divmod(found.index, groups)
                half = f" ({('gate', 'up')[shard]} half)" if groups > 1 else ""
                warnings.warn(
                    found.message(f"NVFP4Experts {self.module_name or ''} expert {expert} {name}{half}: its",
                                  "keep these experts in high precision (modules_to_not_convert)"),
                    stacklevel=2,
                )
                warned[name, expert] = max(found.ratio, warned.get((name, expert), 0.0))
        return warned

    @torch.no_grad()
    def pack(self) -> NVFP4Experts:
        """Convert to packed mode in place (drops the master weights) and return ``self``."""
        if not self.is_packed:
            quantized = {name: self.quantized_weight(name) for name in EXPERT_PROJECTIONS}
            for name, tensors in quantized.items():
                self._become_packed(name, tensors)
        return self

    @torch.no_grad()
    def unpack(self, dtype: torch.dtype = torch.bfloat16) -> NVFP4Experts:
        """Convert packed mode to fake mode in place, the dequantized weights as masters (see
        :meth:`hf_qad.nvfp4.linear.NVFP4Linear.unpack` for what is reproduced exactly)."""
        if self.is_packed:
            weights = {name: (self._weight(name, dtype), self.quantized_weight(name).global_scale)
                       for name in EXPERT_PROJECTIONS}
            for name, (weight, global_scale) in weights.items():
                for tensor_name in ("weight_packed", "weight_scale", "weight_global_scale"):
                    del self._buffers[name + EXPERT_TENSOR_SUFFIXES[tensor_name]]
                setattr(self, name, nn.Parameter(self.output_major(weight).contiguous()))
                self._unpacked_global_scales[name] = (getattr(self, name)._version, global_scale)
        return self

    def checkpoint_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each NVFP4 buffer a checkpoint of this module must hold, by attribute name."""
        tensors = {}
        for name, (e, n, k) in self.weight_shapes().items():
            shards = EXPERT_PROJECTIONS[name]
            if self.is_packed:
                tensors[name + "_packed"] = ((e, n, k // 2), torch.uint8)
                tensors[name + "_scale"] = ((e, n, k // BLOCK_SIZE), torch.float8_e4m3fn)
                tensors[name + "_global_scale"] = ((e, shards), torch.float32)
            if self.quantize_activations:
                tensors[name + "_input_global_scale"] = ((e, shards), torch.float32)
        return tensors

    # ------------------------------------------------------------------ activations
    def serving_input_global_scale(self, name: str) -> torch.Tensor:
        """The one input global scale vLLM's NVFP4 MoE kernels use for projection ``name``, float32 ``[1]``.

        vLLM takes ``1 / input_global_scale`` of every expert (and shard), their max, and quantizes
        with its reciprocal: ``1 / max(1 / gs)``, computed here with the same float32 divisions.
        """
        scales = getattr(self, name + "_input_global_scale").float()
        return (1.0 / (1.0 / scales).amax()).reshape(1)

    def _input_scale(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.input_calibrated:
            return self.serving_input_global_scale(name)
        if not self._warned_uncalibrated:
            warnings.warn(
                f"NVFP4Experts {self.module_name or ''} quantizes activations (W4A4) but was not calibrated: "
                "using a per-batch global scale (2688 / amax of the current input) until "
                "hf_qad.calibrate(model, dataloader) sets static ones. Serving engines need the static scales.",
                stacklevel=3,
            )
            self._warned_uncalibrated = True
        return global_scale_from_amax(x.detach().abs().amax())

    @contextmanager
    def observing_inputs(self) -> Iterator[dict[str, torch.Tensor]]:
        """Within this block the forward runs in high-precision activations and records, per projection,
        the absolute maximum of each expert's inputs (float32 ``[E]``, -1 for an expert no token reached).

        What :func:`hf_qad.calibrate` reads. Example:
            >>> experts = NVFP4Experts(2, 16, 16)
            >>> _ = torch.nn.init.ones_(experts.gate_up_proj), torch.nn.init.ones_(experts.down_proj)
            >>> with experts.observing_inputs() as amax:
            ...     _ = experts(torch.full((1, 16), -3.0), torch.tensor([[1]]), torch.ones(1, 1))
            >>> amax["gate_up_proj"].tolist()
            [-1.0, 3.0]
        """
        device = next(t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None).device
        observed = {name: torch.full((self.num_experts,), -1.0, device=device) for name in EXPERT_PROJECTIONS}
        self._observed = observed
        try:
            yield observed
        finally:
            self._observed = None

    def _observe(self, name: str, expert_ids: torch.Tensor, x: torch.Tensor) -> None:
        """Fold the absolute max of each row of ``x`` (routed to ``expert_ids``) into its expert's recorded amax."""
        row_amax = x.detach().abs().amax(dim=-1).float()
        finite = torch.isfinite(row_amax)
        if not bool(finite.all()):
            expert = int(expert_ids[~finite][0])
            raise ValueError(f"calibration input of '{self._label(name)}' (expert {expert}) contains NaN or Inf.")
        self._observed[name].scatter_reduce_(0, expert_ids, row_amax, "amax")

    def _quantize_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_activations or self._observed is not None or not self._quantizing():
            return x
        return functional.fake_quant_activation(x, self._input_scale(name, x), name=self._label(name))

    def _quantizing(self) -> bool:
        if not self.quantization_enabled and self.is_packed:
            raise RuntimeError(
                f"NVFP4Experts {self.module_name or ''} is packed: it holds no high-precision weights, so its "
                "quantization cannot be turned off."
            )
        return self.quantization_enabled

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' experts call: ``hidden_states [T, H]``, the routed experts ``[T, k]`` and their weights.

        The computation of transformers' ``grouped_mm`` experts (its default): the (token, expert)
        pairs sorted by expert, one grouped matmul per projection over all experts, the weighted
        outputs summed per token. A loop over experts would, in its backward, build a zero
        gradient of the whole 3-D weight for every expert it indexes.
        """
        num_tokens, num_top_k = top_k_index.shape
        gate_up = self._weight("gate_up_proj", hidden_states.dtype)
        down = self._weight("down_proj", hidden_states.dtype)
        x = self._quantize_input("gate_up_proj", hidden_states)  # one scale per layer: each token once
        expert_ids, order = torch.sort(top_k_index.reshape(-1))
        # offsets[e]: how many pairs go to experts 0..e, the group ends grouped_mm takes
        offsets = torch.searchsorted(expert_ids, torch.arange(self.num_experts, device=expert_ids.device),
                                     right=True, out_int32=True)
        routed = x[order // num_top_k]
        if self._observed is not None:
            self._observe("gate_up_proj", expert_ids, routed)
        bias = self.gate_up_proj_bias[expert_ids] if self.has_bias else None
        intermediate = self.gate_function(self, _grouped_linear(routed, gate_up, offsets, bias=bias))
        intermediate = self._quantize_input("down_proj", intermediate)
        if self._observed is not None:
            self._observe("down_proj", expert_ids, intermediate)
        bias = self.down_proj_bias[expert_ids] if self.has_bias else None
        out = _grouped_linear(intermediate, down, offsets, bias=bias) * top_k_weights.reshape(-1)[order, None]
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=order.device)
        return out[restore].view(num_tokens, num_top_k, -1).sum(dim=1).to(hidden_states.dtype)

    # ------------------------------------------------------------------ state handling
    @torch.no_grad()
    def set_input_amax(self, amax: dict[str, torch.Tensor]) -> None:
        """Set the input global scales from each expert's calibrated input amax (``[E]`` per projection)."""
        for name, values in amax.items():
            scales = getattr(self, name + "_input_global_scale")
            scales.copy_(global_scales_from_amax(values).to(scales.device).unsqueeze(1).expand_as(scales))
        self.input_calibrated = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        scales = [state_dict.get(f"{prefix}{name}_input_global_scale") for name in EXPERT_PROJECTIONS]
        if all(scale is not None for scale in scales):
            self.input_calibrated = all(bool((scale != 0).all()) for scale in scales)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        names = [name for name in self._buffers if name.endswith(tuple(EXPERT_TENSOR_SUFFIXES.values()))]
        with keep_scale_dtypes(self, fn, names):
            return super()._apply(fn, recurse)

    def _label(self, name: str) -> str:
        return f"{self.module_name}.{name}" if self.module_name else name

    def extra_repr(self) -> str:
        mode = "packed" if self.is_packed else "fake"
        scheme = "W4A4" if self.quantize_activations else "W4A16"
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_dim}, intermediate_size={self.intermediate_dim}, "
            f"{scheme}, {mode}, scale_method={self.scale_method}"
            + (", transposed" if self.is_transposed else "") + ("" if self.is_concatenated else ", interleaved")
            + (", bias" if self.has_bias else "")
        )
