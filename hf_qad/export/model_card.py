"""README.md model cards for hf_qad's packed NVFP4 exports.

The card names the format (NVFP4, compressed-tensors ``nvfp4-pack-quantized``,
W4A4/W4A16), the base model, the quantization settings and, when a trainer records
them, the QAD training settings; it says how to serve the model with vLLM and how to
load it with transformers.

Where the card gets written
---------------------------
transformers gives a quantizer no hook that knows the save directory, so a card is written
by whoever saves: ``QADTrainer.save_model`` / ``push_to_hub`` and the ``hf-qad`` commands do it;
after a plain ``model.save_pretrained(folder)`` call :func:`write_model_card` yourself. A plain
``model.push_to_hub`` uploads the packed export with transformers' card, tagged ``hf_qad`` and
``nvfp4`` (the quantizer adds the tags to the model); for the full card, save the folder,
write the card and upload the folder.

A README.md is replaced only if it is ours (it carries :data:`CARD_MARKER`) or is
transformers' generated template; a card the user wrote is kept. Master-weight checkpoints
and adapter-only saves get no card.

Example:
    >>> # model.save_pretrained("out")
    >>> # write_model_card(model, "out", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    >>> #                  training={"teacher": "HuggingFaceTB/SmolLM2-135M-Instruct", "steps": 1000})
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedModel

from hf_qad.version import __version__
from hf_qad.quantizer.config import NVFP4Config
from hf_qad.quantizer.quantizer import nvfp4_quantizer
from hf_qad.quantizer.serialization import FORMAT

__all__ = ["CARD_MARKER", "attach_model_card", "model_card", "write_model_card"]

logger = logging.getLogger("hf_qad")

CARD_MARKER = "<!-- hf_qad model card: rewritten on every save. Delete this line to keep your own edits. -->"
"""First line of the body of every card hf_qad writes; a README.md without it is the user's."""

# The description transformers' create_and_tag_model_card puts in the card it
# generates when the Hub repository has none: such a card holds nothing to keep.
_TRANSFORMERS_TEMPLATE = "This model card has been automatically generated."

_TAGS = ("hf_qad", "nvfp4", "compressed-tensors", "quantized")


def attach_model_card(
    model: PreTrainedModel, *, base_model: str | None = None, training: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Deprecated: record what :func:`write_model_card` says by default for ``model``.

    It used to make every ``save_pretrained`` write the card, by replacing the model's methods;
    saving no longer does. Pass ``base_model`` and ``training`` to :func:`write_model_card` after
    saving instead (``QADTrainer`` and the ``hf-qad`` commands write the card themselves).
    """
    warnings.warn(
        "attach_model_card no longer makes save_pretrained write a model card; call "
        "hf_qad.write_model_card(model, folder, base_model=..., training=...) after saving.",
        DeprecationWarning,
        stacklevel=2,
    )
    recorded = nvfp4_quantizer(model).model_card
    if base_model is not None:
        recorded["base_model"] = base_model
    recorded.setdefault("training", {}).update(training or {})
    return recorded


def write_model_card(
    model: PreTrainedModel,
    directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    training: Mapping[str, Any] | None = None,
) -> bool:
    """Write ``directory/README.md`` for the packed export of ``model`` saved there.

    Keeps a README.md the user wrote (one without :data:`CARD_MARKER` that is not transformers'
    template), and the tags of the card it replaces.

    Args:
        model: the hf_qad model the folder holds.
        directory: the saved folder.
        repo_id: the Hub repository, for the usage snippets (default: ``directory``).
        base_model: the Hub id to credit as base model (default: where ``model`` was loaded from).
        training: settings of the QAD run to list (teacher, loss, steps, data...), in order.

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
    card = model_card(model, repo_id=repo_id or os.fspath(directory), tags=tags, base_model=base_model,
                      training=training)
    card.save(path)
    return True


def model_card(
    model: PreTrainedModel,
    *,
    repo_id: str,
    tags: Iterable[str] = (),
    base_model: str | None = None,
    training: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The model card of ``model``'s packed export, published as ``repo_id`` (arguments as in
    :func:`write_model_card`).

    Example:
        >>> # print(model_card(model, repo_id="me/Llama-3.2-1B-NVFP4").text)
    """
    quantizer = nvfp4_quantizer(model)
    recorded = quantizer.model_card  # what the deprecated attach_model_card recorded
    base_model = base_model or recorded.get("base_model") or model.config.name_or_path or None
    training = {**recorded.get("training", {}), **(training or {})}
    hub_base_model = base_model if base_model and _is_hub_id(base_model) else None
    all_tags = list(dict.fromkeys([*_TAGS, *(getattr(model, "model_tags", None) or []), *tags]))
    data = ModelCardData(library_name="transformers", tags=all_tags, base_model=hub_base_model)
    if hub_base_model:
        data.base_model_relation = "quantized"
    body = _body(model, quantizer.quantization_config, quantizer.unconverted_linears, training, repo_id=repo_id,
                 base_model=base_model, hub_base_model=hub_base_model)
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
    unconverted_linears: list[str],
    training: Mapping[str, Any],
    *,
    repo_id: str,
    base_model: str | None,
    hub_base_model: str | None,
) -> str:
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
        "Kept in high precision": sorted(unconverted_linears),
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
    if training:
        sections += ["## Training", _table(training)]
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
