"""Whether a pre-quantized checkpoint holds the NVFP4 tensors its ``quantization_config`` promises.

Two checks give the same one-line error, naming the missing tensors and those of a wrong shape
or dtype:

* :func:`check_loaded_tensors`, after loading: every NVFP4 buffer of the model was loaded, with
  its shape and dtype (a Linear's on-disk tensors are its buffers, under the same names);
* :func:`check_expert_tensors_on_disk`, before loading: the per-expert tensors of fused MoE
  experts (``experts.3.gate_proj.weight_packed`` ...) are all in the checkpoint's safetensors
  headers, with their shapes and dtypes. transformers stacks them into the fused buffers while
  loading, so a missing or misshapen one would otherwise stop it inside its weight conversion
  (a stacking error, or a fused tensor one expert short), far from the on-disk name to fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike

import torch
import torch.nn as nn
from safetensors import safe_open

from hf_qad.nvfp4.conversion import nvfp4_experts
from hf_qad.nvfp4.linear import NVFP4Linear
from hf_qad.nvfp4.moe import EXPERT_TENSOR_SUFFIXES, NVFP4Experts
from hf_qad.quantizer.serialization import expert_checkpoint_slices

__all__ = ["check_expert_tensors_on_disk", "check_loaded_tensors"]

_LISTED = 4  # tensors named in a loading error; the rest are counted

# safetensors' header dtype codes (the format's specification), for the messages and the comparison.
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_FLOATING = "floating point"  # the expected dtype of a master weight: transformers casts it to the model's


def _listing(names: list[str]) -> str:
    more = f" (and {len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _spec(shape: Sequence[int], dtype: torch.dtype | str) -> str:
    return f"{str(dtype).removeprefix('torch.')} [{'x'.join(map(str, shape))}]"


def _raise_if_incomplete(missing: list[str], wrong: list[str], path: str | PathLike) -> None:
    if missing or wrong:
        problems = ([f"missing {len(missing)}: {_listing(missing)}"] if missing else []) + (
            [f"wrong {len(wrong)}: {_listing(wrong)}"] if wrong else []
        )
        raise ValueError(
            f"{path} does not hold the NVFP4 tensors its quantization_config promises ({'; '.join(problems)}); "
            "it is incomplete or was not written for this model: export it again (save_pretrained, hf-qad export)."
        )


def check_loaded_tensors(layers: Mapping[str, NVFP4Linear | NVFP4Experts], path: str | PathLike) -> None:
    """Raise unless every NVFP4 tensor the checkpoint's config promises was loaded, with its shape and dtype.

    transformers marks each tensor it loads from the checkpoint with ``_is_hf_initialized`` (what
    its own missing-key initialization goes by); a missing one is left as uninitialized memory.
    """
    missing, wrong = [], []
    for name, layer in layers.items():
        for tensor_name, (shape, dtype) in layer.checkpoint_tensors().items():
            key = f"{name}.{tensor_name}"
            tensor = getattr(layer, tensor_name)
            if not getattr(tensor, "_is_hf_initialized", False):
                missing.append(key)
            elif tuple(tensor.shape) != shape or tensor.dtype != dtype:
                wrong.append(f"{key} ({_spec(tensor.shape, tensor.dtype)}, expected {_spec(shape, dtype)})")
    _raise_if_incomplete(missing, wrong, path)


def _expected_per_expert(
    model: nn.Module, name: str, experts: NVFP4Experts
) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """The on-disk tensors a checkpoint holds for ``experts``, with their shapes and dtypes.

    Packed: each expert's NVFP4 tensors (its rows of the fused buffers, scales ``[1]``); master
    weights: each expert's ``weight`` (its input scales are stored fused, checked after loading).
    """
    buffers = experts.checkpoint_tensors()
    shapes = experts.weight_shapes()
    expected = {}
    for piece in expert_checkpoint_slices(model, name, experts):
        rows = piece.rows.stop - piece.rows.start
        if not experts.is_packed:
            expected[f"{piece.module}.weight"] = ((rows, shapes[piece.projection][2]), _FLOATING)
            continue
        for tensor_name, suffix in EXPERT_TENSOR_SUFFIXES.items():
            spec = buffers.get(piece.projection + suffix)
            if spec is not None:
                shape, dtype = spec
                expected[f"{piece.module}.{tensor_name}"] = ((rows, shape[2]) if len(shape) == 3 else (1,), dtype)
    return expected


def _header(files: Sequence[str | PathLike]) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """Shape and dtype of every tensor in safetensors ``files``, from their headers (no data is read)."""
    tensors = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                code = tensor.get_dtype()
                tensors[key] = (tuple(tensor.get_shape()), _SAFETENSORS_DTYPES.get(code, code))
    return tensors


def check_expert_tensors_on_disk(
    model: nn.Module, checkpoint_files: Sequence[str | PathLike] | None, path: str | PathLike
) -> None:
    """Raise unless the checkpoint holds every per-expert tensor of the model's NVFP4 experts, right-shaped.

    Run before loading, on the safetensors headers. Experts none of whose on-disk names appear
    (a checkpoint stored under other names, which transformers maps while loading) are left to
    :func:`check_loaded_tensors`, as are other checkpoint formats.
    """
    all_experts = nvfp4_experts(model)
    if not all_experts or not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return
    on_disk = _header(checkpoint_files)
    missing, wrong = [], []
    for name, experts in all_experts.items():
        expected = _expected_per_expert(model, name, experts)
        if not expected.keys() & on_disk.keys():
            continue
        for key, (shape, dtype) in expected.items():
            if key not in on_disk:
                missing.append(key)
                continue
            found_shape, found_dtype = on_disk[key]
            if dtype == _FLOATING:
                dtype_ok = isinstance(found_dtype, torch.dtype) and found_dtype.is_floating_point
            else:
                dtype_ok = found_dtype == dtype
            if found_shape != shape or not dtype_ok:
                wrong.append(f"{key} ({_spec(found_shape, found_dtype)}, expected {_spec(shape, dtype)})")
    _raise_if_incomplete(missing, wrong, path)
