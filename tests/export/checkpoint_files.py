"""Reading an exported checkpoint's tensors back, for the export tests."""

from pathlib import Path

import torch
from safetensors import safe_open


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``directory``, by name."""
    tensors = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes, to compare float8 and signed zeros exactly."""
    return tensor.reshape(-1).view(torch.uint8)
