"""NVIDIA ModelOpt's NVFP4 checkpoint layout, what TensorRT-LLM (and vLLM) load.

Per converted Linear ``<name>``:

* ``<name>.weight``: uint8 ``[out, in/2]``, two E2M1 codes per byte (element ``2i`` in
  the low nibble, sign in bit 3: the same bytes as compressed-tensors' ``weight_packed``);
* ``<name>.weight_scale``: float8_e4m3fn ``[out, in/16]``, block scales;
* ``<name>.weight_scale_2``: float32 scalar (shape ``[]``), the per-tensor scale as a
  *multiplier*: ``1 / weight_global_scale`` (about ``amax / 2688``);
* ``<name>.input_scale``: float32 scalar, ``1 / input_global_scale``, W4A4 only.

A weight is ``value(code) * weight_scale * weight_scale_2``. Every other tensor is
written unchanged. Next to the weights: ``hf_quant_config.json`` and a ``config.json``
whose ``quantization_config`` mirrors it (``quant_method: "modelopt"``), as ModelOpt's
``export_hf_checkpoint`` writes them (``modelopt/torch/export/unified_export_hf.py``
and ``convert_hf_config.py`` in NVIDIA/Model-Optimizer).

How this relates to the compressed-tensors export
-------------------------------------------------
The checkpoint is the compressed-tensors export with tensors renamed: codes and block
scales are the same bytes, and the per-tensor scales are float32 reciprocals. ModelOpt
itself picks block scales as ``e4m3(clamp(block_amax / (6 * weight_scale_2), min=2**-9))``
and stores 1.0 for an all-zero block (``NVFP4QTensor.get_weights_scaling_factor``);
hf_qad keeps its own, compressed-tensors-ordered scales
(``e4m3(global_scale * (block_amax / 6))``, 0.125 for a block whose scale rounds to
zero, see :mod:`hf_qad.nvfp4.format`). The two rules can pick a different e4m3 value at a
rounding tie or for tiny blocks; a zero block has zero codes either way. Reusing ours
keeps the codes those scales were trained with, so both exports hold the same weights:
``value * weight_scale * weight_scale_2`` and compressed-tensors'
``value * weight_scale / weight_global_scale`` agree to float32 rounding (a few ulps).

``weight_scale_2`` is the float32 reciprocal of our stored ``weight_global_scale``, not
``amax / 2688`` recomputed from a master weight: vLLM computes this same reciprocal
when it loads a compressed-tensors NVFP4 checkpoint, so an engine multiplies by the
same number whichever of our two exports it reads. For W4A4 activations vLLM divides by
``input_scale`` (it quantizes with ``1 / input_scale``), which can be one float32 ulp away
from our ``input_global_scale``: an activation exactly at a rounding boundary may then
round the other way.

Scheme names (``quant_algo``): ``"NVFP4"`` for W4A4 and ``"W4A16_NVFP4"`` for weight
only, the names ModelOpt's ``process_layer_quant_config`` writes (``NVFP4_AWQ`` is a
different recipe, with an AWQ ``pre_quant_scale`` per layer). vLLM reads both
(``QUANT_ALGOS`` in ``vllm/model_executor/layers/quantization/modelopt.py``);
TensorRT-LLM's ``QuantAlgo`` lists ``NVFP4`` but, in the releases examined, no
``W4A16_NVFP4``, so serve W4A16 exports with vLLM.

Example:
    >>> # model = AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config())
    >>> # hf_qad.calibrate(model, batches); ...train...
    >>> # save_modelopt_checkpoint(model, "out/model-nvfp4-modelopt", tokenizer=tokenizer)
    >>> # then: trtllm-serve out/model-nvfp4-modelopt   or   vllm serve out/model-nvfp4-modelopt
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_qad.nvfp4.conversion import nvfp4_experts
from hf_qad.nvfp4.format import BLOCK_SIZE
from hf_qad.quantizer.config import NVFP4Config
from hf_qad.quantizer.quantizer import nvfp4_quantizer
from hf_qad.quantizer.serialization import expert_checkpoint_slices
from hf_qad.version import __version__

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["HF_QUANT_CONFIG", "hf_quant_config", "modelopt_state_dict", "save_modelopt_checkpoint"]

HF_QUANT_CONFIG = "hf_quant_config.json"

# compressed-tensors tensor name -> ModelOpt tensor name, for the last name component.
_RENAMES = {
    "weight_packed": "weight",
    "weight_global_scale": "weight_scale_2",
    "input_global_scale": "input_scale",
}
# Stored as reciprocals: compressed-tensors' global scales divide, ModelOpt's multiply.
_RECIPROCALS = ("weight_global_scale", "input_global_scale")


def _modelopt_name(name: str) -> str:
    module, dot, leaf = name.rpartition(".")
    return module + dot + _RENAMES.get(leaf, leaf)


def modelopt_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert compressed-tensors NVFP4 tensors (a state dict or one shard) to ModelOpt's.

    ``weight_packed`` becomes ``weight`` (same bytes), ``weight_global_scale`` and
    ``input_global_scale`` become the float32 scalars ``weight_scale_2`` and
    ``input_scale`` (their reciprocals); everything else is passed through.

    Example:
        >>> import torch
        >>> ct = {"fc.weight_packed": torch.zeros(4, 8, dtype=torch.uint8),
        ...       "fc.weight_global_scale": torch.tensor([0.25])}
        >>> mo = modelopt_state_dict(ct)
        >>> sorted(mo), mo["fc.weight_scale_2"].shape, mo["fc.weight_scale_2"].item()
        (['fc.weight', 'fc.weight_scale_2'], torch.Size([]), 4.0)
    """
    converted = {}
    for name, tensor in tensors.items():
        if name.rpartition(".")[2] in _RECIPROCALS:
            # ModelOpt writes these as float32 scalars (shape []), and vLLM's
            # ModelOptNvFp4LinearMethod documents them so ("input_scale: torch.float32, scalar").
            tensor = (1.0 / tensor.float()).reshape(())
        converted[_modelopt_name(name)] = tensor
    return converted


def _group_args(config: NVFP4Config) -> dict[str, Any]:
    """compressed-tensors-style description of the scheme, as ModelOpt puts in config.json."""
    weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": BLOCK_SIZE}
    activations = {"input_activations": dict(weights)} if config.quantize_activations else {}
    return {**activations, "weights": weights, "targets": ["Linear"]}


def hf_quant_config(config: NVFP4Config, exclude_modules: Iterable[str] = ()) -> dict[str, Any]:
    """The ``hf_quant_config.json`` content for a model quantized with ``config``.

    ``exclude_modules`` names the layers kept in high precision (the quantizer's
    ``unconverted_linears``).

    ``producer.name`` must be ``"modelopt"``: vLLM infers the quantization method from
    it and TensorRT-LLM's AutoDeploy reader rejects any other producer. The ``hf_qad``
    entry records who actually wrote the checkpoint; both engines ignore it.

    Example:
        >>> from hf_qad import NVFP4Config
        >>> hf_quant_config(NVFP4Config(scheme="w4a16"))["quantization"]["quant_algo"]
        'W4A16_NVFP4'
    """
    return {
        "producer": {"name": "modelopt", "version": __version__},
        "quantization": {
            "quant_algo": "NVFP4" if config.quantize_activations else "W4A16_NVFP4",
            # vLLM refuses an NVFP4 hf_quant_config.json without these three keys.
            "kv_cache_quant_algo": None,
            "group_size": BLOCK_SIZE,
            # ModelOpt's entries are fnmatch wildcards; exact names match themselves.
            "exclude_modules": sorted(set(exclude_modules)),
        },
        "hf_qad": {"version": __version__, **config.settings()},
    }


def _inline_quantization_config(quant_config: dict[str, Any], config: NVFP4Config) -> dict[str, Any]:
    """config.json's ``quantization_config``: ModelOpt's flat form of ``hf_quant_config.json``.

    ``group_size`` is repeated at the top level although ModelOpt leaves it out: vLLM's
    flat reader takes it from there, and TensorRT-LLM warns when it differs from
    ``hf_quant_config.json`` (``warn_if_inline_quant_config_differs``).
    """
    quantization = quant_config["quantization"]
    return {
        "config_groups": {"group_0": _group_args(config)},
        "ignore": quantization["exclude_modules"],
        "quant_algo": quantization["quant_algo"],
        "group_size": quantization["group_size"],
        "producer": quant_config["producer"],
        "quant_method": "modelopt",
        "hf_qad": quant_config["hf_qad"],
    }


def _convert_weight_files(directory: Path) -> None:
    """Rename the compressed-tensors tensors of every shard (and the shard index) in place."""
    for path in sorted(directory.glob("model*.safetensors")):
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        save_file(modelopt_state_dict(tensors), path, metadata=metadata)
    for index_path in directory.glob("model*.safetensors.index.json"):
        index = json.loads(index_path.read_text())
        index["weight_map"] = {_modelopt_name(k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def save_modelopt_checkpoint(
    model: PreTrainedModel,
    save_directory: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``model`` (fake or packed mode) as a ModelOpt NVFP4 checkpoint for TensorRT-LLM.

    Args:
        model: a model loaded with :class:`hf_qad.NVFP4Config`; a W4A4 model must be
            calibrated (:func:`hf_qad.calibrate`) so that it has input scales.
        save_directory: the folder to write (created if missing).
        tokenizer: saved into the folder too when given, as serving engines expect.
        max_shard_size: largest safetensors shard; each shard is held in memory
            once more while its tensors are renamed.

    Returns:
        The folder, for ``trtllm-serve`` / ``vllm serve``.

    Raises:
        ValueError: if ``model`` is not an hf_qad model, if it is saving master weights
            (inside :func:`hf_qad.master_weight_checkpoint`), if a W4A4 layer was
            never calibrated, or if it has NVFP4 experts its architecture stores fused on disk
            (gpt-oss), for which no ModelOpt layout is served (vLLM 0.33's ModelOpt NVFP4 MoE
            registers no expert biases).

    Example:
        >>> # save_modelopt_checkpoint(model, "out/llama-nvfp4-trtllm", tokenizer=tokenizer)
    """
    quantizer = nvfp4_quantizer(model)
    if quantizer.saving_master_weights:
        raise ValueError("a ModelOpt checkpoint holds packed weights; call it outside master_weight_checkpoint().")
    fused = [name for name, experts in nvfp4_experts(model).items() if not expert_checkpoint_slices(model, name, experts)]
    if fused:
        raise ValueError(
            f"hf_qad has no ModelOpt layout for the NVFP4 experts '{fused[0]}' ({type(model).__name__} stores its experts "
            "fused, with biases, and vLLM 0.33 loads no NVFP4 gpt-oss experts). Use model.save_pretrained (reloads "
            "with hf_qad.load_packed_model), or keep the experts in high precision with modules_to_not_convert."
        )
    directory = Path(save_directory)
    # transformers writes the compressed-tensors export (shards, index, tied weights,
    # config, generation config), which is then renamed in place.
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    _convert_weight_files(directory)
    config = quantizer.quantization_config
    quant_config = hf_quant_config(config, quantizer.unconverted_linears)
    _write_json(directory / HF_QUANT_CONFIG, quant_config)
    model_config = json.loads((directory / "config.json").read_text())
    model_config["quantization_config"] = _inline_quantization_config(quant_config, config)
    _write_json(directory / "config.json", model_config)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
