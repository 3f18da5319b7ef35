"""README.md model cards for hf_qad's packed NVFP4 exports.

The card names the format (NVFP4, compressed-tensors ``nvfp4-pack-quantized``,
W4A4/W4A16), the base model, the quantization settings and, when a trainer records
them, the QAD training settings; it says how to serve the model with vLLM and how to
load it with transformers.

Where the card gets written
---------------------------
transformers gives a quantizer no hook that knows the save directory, and both of its
upload paths write README.md themselves after the weights: ``push_to_hub`` saves into
a temporary folder and then writes the Hub's card (or a generic template) over
whatever is there; ``save_pretrained(..., push_to_hub=True)`` does the same in the
save folder. Both then call the model's ``_upload_modified_files(folder, repo_id)``.
So :func:`attach_model_card` overrides two methods *on the model instance* (the way
accelerate's hooks replace ``forward``; the class and other models are untouched):

* ``save_pretrained`` writes the card after transformers has saved a packed export;
* ``_upload_modified_files`` writes it once more, over transformers' card, just before
  the upload, with the repository id for the usage snippets.

A README.md is replaced only if it is ours (it carries :data:`CARD_MARKER`) or is
transformers' generated template; a card the user wrote, locally or on the Hub, is
kept. Master-weight checkpoints and adapter-only saves get no card.

Example:
    >>> # model = AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config())
    >>> # attach_model_card(model, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> # ...calibrate, train...
    >>> # model.push_to_hub("me/SmolLM2-135M-Instruct-NVFP4")   # weights + README.md
"""

from __future__ import annotations

import functools
import json
import logging
import os
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedModel

from hf_qad.quantizer.checkpoints import _nvfp4_config
from hf_qad.quantizer.config import NVFP4Config

__all__ = ["CARD_MARKER", "ModelCardInfo", "attach_model_card", "model_card", "write_model_card"]

logger = logging.getLogger("hf_qad")

CARD_MARKER = "<!-- hf_qad model card: rewritten on every save. Delete this line to keep your own edits. -->"
"""First line of the body of every card hf_qad writes; a README.md without it is the user's."""

# The description transformers' create_and_tag_model_card puts in the card it
# generates when the Hub repository has none: such a card holds nothing to keep.
_TRANSFORMERS_TEMPLATE = "This model card has been automatically generated."

_INFO_ATTRIBUTE = "hf_qad_model_card"
_TAGS = ("hf_qad", "nvfp4", "compressed-tensors", "quantized")


@dataclass
class ModelCardInfo:
    """What the card says beyond the model's quantization config.

    Attributes:
        base_model: Hub id of the model that was quantized; ``None`` uses the
            ``_name_or_path`` the model was loaded from.
        training: QAD settings to list (teacher, loss, steps, data...); filled by the
            caller or a trainer, rendered as a table in insertion order.
    """

    base_model: str | None = None
    training: dict[str, Any] = field(default_factory=dict)


def attach_model_card(
    model: PreTrainedModel, *, base_model: str | None = None, training: Mapping[str, Any] | None = None
) -> ModelCardInfo:
    """Make every packed export of ``model`` carry a README.md model card.

    Calling it again updates what the card says; ``training`` entries are merged.

    Args:
        model: a model loaded with :class:`hf_qad.NVFP4Config`.
        base_model: the Hub id to credit as base model (default: where ``model`` was
            loaded from, when that is a Hub id).
        training: settings of the QAD run, e.g. ``{"teacher": ..., "steps": 1000}``.

    Returns:
        The card's settings, which can also be edited in place.

    Example:
        >>> # info = attach_model_card(model, base_model="meta-llama/Llama-3.2-1B")
        >>> # info.training["kl_temperature"] = 1.0
        >>> # model.save_pretrained("out")   # writes out/README.md next to the weights
    """
    _nvfp4_config(model)
    info = getattr(model, _INFO_ATTRIBUTE, None)
    if info is None:
        info = ModelCardInfo()
        setattr(model, _INFO_ATTRIBUTE, info)
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        model._upload_modified_files = types.MethodType(_upload_modified_files, model)
    if base_model is not None:
        info.base_model = base_model
    info.training.update(training or {})
    return info


@functools.wraps(PreTrainedModel.save_pretrained)
def _save_pretrained(self: PreTrainedModel, save_directory, is_main_process: bool = True, *args, **kwargs):
    # Decided before saving: a Trainer callback may switch master-weight saving off afterwards.
    # With push_to_hub, _upload_modified_files has already written the card, naming the repository.
    write_card = _saves_packed_export(self, kwargs) and not kwargs.get("push_to_hub", False)
    result = type(self).save_pretrained(self, save_directory, is_main_process, *args, **kwargs)
    if write_card and self.should_save_on_this_rank(is_main_process):
        write_model_card(self, save_directory)
    return result


@functools.wraps(PreTrainedModel._upload_modified_files)
def _upload_modified_files(self: PreTrainedModel, working_dir, repo_id: str, *args, **kwargs):
    if _saves_packed_export(self, {}):
        write_model_card(self, working_dir, repo_id=repo_id)
    return type(self)._upload_modified_files(self, working_dir, repo_id, *args, **kwargs)


def _saves_packed_export(model: PreTrainedModel, save_kwargs: Mapping[str, Any]) -> bool:
    config = getattr(model.config, "quantization_config", None)
    return (
        isinstance(config, NVFP4Config)
        and not config.save_master_weights
        and not getattr(model, "_hf_peft_config_loaded", False)  # adapters only
        and not save_kwargs.get("distributed_checkpoint", False)  # sharded training state
    )


def write_model_card(model: PreTrainedModel, directory: str | os.PathLike, *, repo_id: str | None = None) -> bool:
    """Write ``directory/README.md`` unless a card the user wrote is already there.

    Args:
        model: the hf_qad model the folder holds.
        directory: the saved folder.
        repo_id: the Hub repository, for the usage snippets (default: ``directory``).

    Returns:
        Whether the card was written.
    """
    path = Path(directory) / "README.md"
    existing = path.read_text(encoding="utf-8") if path.exists() else None
    if existing is not None and CARD_MARKER not in existing and _TRANSFORMERS_TEMPLATE not in existing:
        logger.info("hf_qad: keeping %s, which hf_qad did not write.", path)
        return False
    # Tags already set (push_to_hub(tags=...), the model's tags, a previous card) are kept.
    tags = (ModelCard(existing).data.tags or []) if existing else []
    model_card(model, repo_id=repo_id or os.fspath(directory), tags=tags).save(path)
    return True


def model_card(model: PreTrainedModel, *, repo_id: str, tags: Iterable[str] = ()) -> ModelCard:
    """The model card of ``model``'s packed export, published as ``repo_id``.

    Example:
        >>> # print(model_card(model, repo_id="me/Llama-3.2-1B-NVFP4").text)
    """
    config = _nvfp4_config(model)
    info = getattr(model, _INFO_ATTRIBUTE, None) or ModelCardInfo()
    base_model = info.base_model or model.config.name_or_path or None
    hub_base_model = base_model if base_model and _is_hub_id(base_model) else None
    all_tags = list(dict.fromkeys([*_TAGS, *(getattr(model, "model_tags", None) or []), *tags]))
    data = ModelCardData(library_name="transformers", tags=all_tags, base_model=hub_base_model)
    if hub_base_model:
        data.base_model_relation = "quantized"
    body = _body(model, config, info, repo_id=repo_id, base_model=base_model, hub_base_model=hub_base_model)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _is_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not os.path.isdir(name)


def _cell(value: Any) -> str:
    if value is None:
        text = "default"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (list, tuple)):
        text = ", ".join(f"`{v}`" for v in value) or "none"
    elif isinstance(value, dict):
        text = f"`{json.dumps(value)}`"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| Setting | Value |", "|---|---|"] + [f"| {name} | {_cell(value)} |" for name, value in rows.items()]
    return "\n".join(lines)


def _body(
    model: PreTrainedModel,
    config: NVFP4Config,
    info: ModelCardInfo,
    *,
    repo_id: str,
    base_model: str | None,
    hub_base_model: str | None,
) -> str:
    from hf_qad import __version__
    # Imported here: hf_qad.export.compressed_tensors and the quantizer import each other,
    # and hf_qad.export (this package) is imported first.
    from hf_qad.export.compressed_tensors import FORMAT

    scheme = config.scheme.upper()
    name = repo_id.rstrip("/").rsplit("/", 1)[-1]
    if hub_base_model:
        base = f"[{hub_base_model}](https://huggingface.co/{hub_base_model})"
    elif base_model:
        base = f"`{Path(base_model).name}` (a local checkpoint)"
    else:
        base = "a model"
    if config.quantize_activations:
        activations = (
            "NVFP4 at run time: one calibrated FP32 scale per layer, FP8 scales per 16 values computed on the fly"
        )
    else:
        activations = "not quantized (BF16/FP16)"
    format_rows = {
        "Weights": "NVFP4: 4-bit E2M1 values, one FP8 (E4M3) scale per 16 values, one FP32 scale per tensor",
        "Activations": activations,
        "Checkpoint format": f"compressed-tensors `{FORMAT}` (`quant_method: compressed-tensors`)",
        "Kept in high precision": sorted(config.unconverted_linears),
    }
    sections = [
        CARD_MARKER,
        f"# {name}",
        f"{base} quantized to **NVFP4 {scheme}** with hf_qad (quantization-aware distillation to NVFP4 "
        "for Hugging Face transformers and TRL).",
        "## Format",
        _table(format_rows),
        "## Quantization settings",
        _table({**config.settings(), "hf_qad version": __version__}),
    ]
    if info.training:
        sections += ["## Training", _table(info.training)]
    sections += [
        "## Serving with vLLM",
        f"```bash\nvllm serve {repo_id}\n```",
        "```python\nfrom vllm import LLM\n\n"
        f'llm = LLM(model="{repo_id}")\n'
        'print(llm.generate("The capital of France is")[0].outputs[0].text)\n```',
        _serving_note(config),
        "## Loading with transformers",
        "```python\n"
        f"from transformers import {type(model).__name__}\n\n"
        f'model = {type(model).__name__}.from_pretrained("{repo_id}")  # pip install compressed-tensors\n'
        "```",
        "compressed-tensors decompresses the weights to BF16 at the first forward pass"
        + (" and fake-quantizes the activations" if config.quantize_activations else "")
        + ": outputs match hf_qad's NVFP4 model, memory use and speed do not. With `import hf_qad` first, the "
        "model loads with packed NVFP4 layers instead; `hf_qad.unpack_model(model)` makes it trainable "
        "again to continue QAD.",
    ]
    return "\n\n".join(sections) + "\n"


def _serving_note(config: NVFP4Config) -> str:
    note = (
        "NVFP4 runs on the FP4 tensor cores of NVIDIA Blackwell GPUs (compute capability 10.x and 12.x). "
        "On older GPUs (from compute capability 8.0) vLLM falls back to its weight-only FP4 Marlin kernel: "
        "FP4 weights, 16-bit arithmetic"
    )
    if config.quantize_activations:
        note += (
            ". Activations are then not quantized, so outputs differ slightly from W4A4 on Blackwell; "
            "`VLLM_USE_NVFP4_CT_EMULATIONS=1` emulates W4A4 instead, slowly"
        )
    return note + "."
