"""Block-wise warm start: train each NVFP4 decoder layer to reproduce its BF16 teacher layer, one at a time.

QAD starts from the PTQ student, whose every layer carries its own rounding error. EfficientQAT
(Chen et al. 2024, "Block-AP") first trains each transformer block of the quantized model alone, with a
mean-squared error against the full-precision block on a few hundred calibration rows, and only then
trains end to end. :func:`block_warm_start` does that for NVFP4 students: one decoder layer at a time,
with its own Adam optimizer, through the same fake-quant forward and straight-through gradients as QAD,
holding in memory one layer's activations and the cached hidden states of the rows.

Inputs and targets. Layer ``l`` of the student is run on the output of the student's own layers
``0..l-1`` (already warmed), and trained towards the teacher's layer ``l`` output *on the teacher's own
inputs*, i.e. the teacher's hidden states after layer ``l``. So each layer is trained to land on the
teacher's trajectory from wherever the quantized prefix left it: it learns to undo the error that
reaches it as well as its own, and errors do not compound with depth (at the last layer the target is
the teacher's final hidden state, which is what the head reads). Training on the teacher's inputs
instead would fit each layer to inputs it never sees once quantized; targets computed by the teacher's
layer from the *student's* inputs (EfficientQAT's and OmniQuant's reconstruction) leave every layer's
inherited error in place.

What trains: every trainable parameter of the decoder layer (master weights, norms, biases, routers;
learned clipping factors of ``NVFP4Config(learn_scales=True)`` at their own rate ``scale_lr``;
a peft student's adapters only, as its base is frozen). Embeddings, the final norm and the head are not
touched. W4A4 input global scales stay as calibrated: calibrate before (:func:`hf_qad.calibrate`).
The loss is the mean squared error over the non-padding tokens (``attention_mask``).

Each decoder layer is called as the model's own forward calls it: a forward pre-hook on every layer
records the keyword arguments transformers passes (position embeddings, attention mask of that layer's
type, position ids), from one forward of each model per batch; nothing of the model's forward is
re-implemented here.

Example:
    >>> import contextlib, io, tempfile, torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> import hf_qad
    >>> _ = torch.manual_seed(0)
    >>> config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> teacher = AutoModelForCausalLM.from_config(config).eval()
    >>> with tempfile.TemporaryDirectory() as path, contextlib.redirect_stdout(io.StringIO()):  # deepspeed's notice
    ...     teacher.save_pretrained(path)
    ...     student = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_qad.NVFP4Config())
    >>> batches = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    >>> _ = hf_qad.calibrate(student, batches)
    >>> errors = block_warm_start(student, teacher, batches, steps=20, lr=1e-3)
    >>> all(e.after < e.before for e in errors)
    True
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from hf_qad.nvfp4.conversion import nvfp4_experts, nvfp4_modules
from hf_qad.nvfp4.linear import CLIP_PARAMETERS
from hf_qad.quantizer.peft import causal_lm

__all__ = ["LayerWarmStart", "block_warm_start", "decoder_layers"]

logger = logging.getLogger("hf_qad")


class LayerWarmStart(NamedTuple):
    """One decoder layer's output error against the teacher's, before and after its warm start."""

    index: int
    """The layer's index in the decoder stack."""
    before: float
    """Mean squared error of its output (on the warmed prefix's output) against the teacher's hidden state."""
    after: float
    """The same after its training."""


class _Captured(Exception):
    """Raised by the first layer's hook to stop a forward once the layer inputs are recorded."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM, in order (through a peft wrapper too).

    Found as the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules of the classes the model lists in
    ``_no_split_modules`` (transformers' own name for its repeated blocks), so no attribute path is assumed.

    Raises:
        ValueError: if the model has no such list.
    """
    pretrained = causal_lm(model)
    block_classes = set(getattr(pretrained, "_no_split_modules", None) or ())
    config = getattr(pretrained, "config", None)
    count = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    for module in pretrained.modules():
        if (isinstance(module, nn.ModuleList) and len(module) == count
                and all(type(layer).__name__ in block_classes for layer in module)):
            return module
    named = ", ".join(sorted(block_classes)) or "none named"
    raise ValueError(
        f"block_warm_start: found no list of {count} decoder layers ({named}) in {type(pretrained).__name__}: "
        "it works on transformers causal LMs only; set warm_start_steps=0."
    )


def _on(value: Any, device: torch.device) -> Any:
    return value.to(device) if torch.is_tensor(value) else value


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, batch: Mapping[str, Any]) -> tuple[torch.Tensor, list[dict]]:
    """The first layer's input hidden states and each layer's keyword arguments, for one batch.

    The hooks let the model's forward compute what every layer gets; the forward is stopped at the last
    layer's input, so only the layers' own computation runs (in no_grad).
    """
    device = next(model.parameters()).device
    captured: dict[int, dict[str, Any]] = {}
    first: list[torch.Tensor] = []

    def record(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                first.append(hidden.detach())
            captured[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if index == len(layers) - 1:
                raise _Captured

        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**{k: _on(v, device) for k, v in batch.items()}, use_cache=False)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(layers):
        raise ValueError(f"block_warm_start: the forward reached {len(captured)} of {len(layers)} decoder layers.")
    return first[0], [captured[i] for i in range(len(layers))]


def _run(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older layers return (hidden_states, ...)


def _squared_error(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the tokens ``mask`` keeps (all when None), in float32."""
    error = (out.float() - target.to(out.device).float()).pow(2).mean(-1)
    if mask is None:
        return error.mean()
    mask = mask.to(error.device, error.dtype)
    return (error * mask).sum() / mask.sum().clamp(min=1)


def _check(student: nn.Module, teacher: nn.Module, batches: Sequence[Any], steps: int, lr: float,
           scale_lr: float) -> None:
    if steps < 1:
        raise ValueError(f"block_warm_start: steps must be at least 1, got {steps}.")
    if not lr > 0 or not scale_lr > 0:
        raise ValueError(f"block_warm_start: lr and scale_lr must be positive, got {lr} and {scale_lr}.")
    if not batches:
        raise ValueError("block_warm_start: no batches; pass at least one batch of input_ids.")
    if any(not isinstance(batch, Mapping) or "input_ids" not in batch for batch in batches):
        raise ValueError("block_warm_start: batches must be dicts of model inputs with input_ids.")
    modules = [*nvfp4_modules(student).values(), *nvfp4_experts(student).values()]
    if not modules:
        raise ValueError("block_warm_start: the student has no NVFP4 layers; load it with NVFP4Config().")
    if any(m.is_packed for m in modules):
        raise ValueError("block_warm_start: the student is packed NVFP4 (no master weights); load it in fake mode.")
    if any(m.quantize_activations and not m.input_calibrated for m in modules):
        raise ValueError("block_warm_start: the W4A4 student is not calibrated; call hf_qad.calibrate(student, "
                         "batches) first.")
    if nvfp4_modules(teacher) or nvfp4_experts(teacher) or {id(p) for p in student.parameters()} & {
            id(p) for p in teacher.parameters()}:
        raise ValueError("block_warm_start: the teacher must be a separate high-precision model, not the NVFP4 "
                         "student or one sharing its weights (LoRA's shared teacher): pass the BF16 model.")


def _optimizer(layer: nn.Module, lr: float, scale_lr: float) -> torch.optim.Optimizer | None:
    named = [(name, p) for name, p in layer.named_parameters() if p.requires_grad]
    clips = [p for name, p in named if name.rsplit(".", 1)[-1] in CLIP_PARAMETERS]
    weights = [p for name, p in named if name.rsplit(".", 1)[-1] not in CLIP_PARAMETERS]
    groups = [{"params": group, "lr": rate} for group, rate in ((weights, lr), (clips, scale_lr)) if group]
    return torch.optim.Adam(groups) if groups else None


def block_warm_start(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    *,
    steps: int = 32,
    lr: float = 1e-5,
    scale_lr: float = 1e-3,
) -> list[LayerWarmStart]:
    """Train each decoder layer of the NVFP4 ``student`` to reproduce the ``teacher``'s, layer by layer.

    See the module docstring for the inputs, targets and what trains.

    Args:
        student: a fake-mode NVFP4 causal LM (``NVFP4Config()``), calibrated when W4A4.
        teacher: its high-precision model (same architecture), a separate model.
        batches: model inputs (dicts with ``input_ids`` and optionally ``attention_mask``); their hidden
            states are cached, two per row and layer width, for the teacher and the student.
        steps: Adam steps per layer, each on the next batch (cycling through ``batches``).
        lr: Adam learning rate of the layer's parameters.
        scale_lr: learning rate of learned clipping factors (``learn_scales``), as in
            :attr:`~hf_qad.trainer.QADConfig.scale_learning_rate`.

    Returns:
        Per layer, the mean squared error of its output against the teacher's hidden state over all batches,
        before and after its training.

    Raises:
        ValueError: on bad settings, a student without NVFP4 layers, packed or uncalibrated, or a teacher
            that is not a separate high-precision model of the same depth.
    """
    _check(student, teacher, batches, steps, lr, scale_lr)
    student_layers, teacher_layers = decoder_layers(student), decoder_layers(teacher)
    if len(student_layers) != len(teacher_layers):
        raise ValueError(f"block_warm_start: the student has {len(student_layers)} decoder layers, the teacher "
                         f"{len(teacher_layers)}; pass the student's own BF16 model as the teacher.")
    modes = student.training, teacher.training
    student.eval()  # no dropout; the weights still get gradients (NVFP4Linear does not cache trainable weights)
    teacher.eval()
    try:
        masks = [batch.get("attention_mask") for batch in batches]
        student_inputs = [_layer_inputs(student, student_layers, batch) for batch in batches]
        teacher_inputs = [_layer_inputs(teacher, teacher_layers, batch) for batch in batches]
        hidden = [h for h, _ in student_inputs]
        targets = [h for h, _ in teacher_inputs]
        results = []
        for index, (layer, teacher_layer) in enumerate(zip(student_layers, teacher_layers)):
            kwargs = [k[index] for _, k in student_inputs]
            with torch.no_grad():
                targets = [_run(teacher_layer, h, k[index]) for h, (_, k) in zip(targets, teacher_inputs)]
                before = sum(float(_squared_error(_run(layer, h, kw), t, m))
                             for h, kw, t, m in zip(hidden, kwargs, targets, masks)) / len(batches)
            optimizer = _optimizer(layer, lr, scale_lr)
            if optimizer is not None:
                for step in range(steps):
                    i = step % len(batches)
                    loss = _squared_error(_run(layer, hidden[i], kwargs[i]), targets[i], masks[i])
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"block_warm_start: layer {index}'s error is {loss.item()} at "
                                                 f"step {step}; lower the warm-start learning rate.")
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                hidden = [_run(layer, h, kw) for h, kw in zip(hidden, kwargs)]
                after = sum(float(_squared_error(h, t, m)) for h, t, m in zip(hidden, targets, masks)) / len(batches)
            results.append(LayerWarmStart(index, before, after))
            logger.info("hf_qad: warm start of decoder layer %d/%d: output error %.4g -> %.4g",
                        index + 1, len(student_layers), before, after)
        return results
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
