"""compressed-tensors' own NVFP4 pipeline, used as the oracle in tests.

Global scale from ``generate_gparam``, block scales from ``calculate_qparams`` (the
functions llm-compressor's min-max observers and compressed-tensors' run-time
activation quantization call, fed min/max in the tensor's own dtype), packing
from ``NVFP4PackedCompressor.compress`` and dequantization from its ``decompress``; and
plain transformers + compressed-tensors loading an export, in a process without hf_qad.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from hf_qad.nvfp4 import cpu

NVFP4_ARGS = QuantizationArgs(
    num_bits=4,
    type="float",
    strategy="tensor_group",
    group_size=16,
    symmetric=True,
    dynamic=False,
    scale_dtype=torch.float8_e4m3fn,
)
SCHEME = QuantizationScheme(targets=["Linear"], weights=NVFP4_ARGS)


def ct_global_scale(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return generate_gparam(x32.min(), x32.max())


def ct_block_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    blocks = x.unflatten(-1, (-1, 16))
    scale, _ = calculate_qparams(
        blocks.amin(-1), blocks.amax(-1), NVFP4_ARGS, global_scale=global_scale
    )
    return scale


def ct_compress(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> dict:
    """Returns weight_packed (uint8), weight_scale (e4m3), weight_global_scale (f32)."""
    if global_scale is None:
        global_scale = ct_global_scale(x)
    scale = ct_block_scales(x, global_scale)
    state = {"weight": x, "weight_scale": scale, "weight_global_scale": global_scale}
    return NVFP4PackedCompressor.compress(state, SCHEME)


def ct_decompress(compressed: dict) -> torch.Tensor:
    return NVFP4PackedCompressor.decompress(dict(compressed), SCHEME)["weight"]


def ct_fake_quant(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    if global_scale is None:
        global_scale = ct_global_scale(x)
    scale = ct_block_scales(x, global_scale)
    return fake_quantize(x, scale, None, NVFP4_ARGS, global_scale=global_scale)


@contextmanager
def compressed_tensors_activation_rounding() -> Iterator[None]:
    """Within this block hf_qad rounds W4A4 activations with compressed-tensors' offline formula.

    hf_qad rounds them as the serving kernel does (``fake_quant_activation``); plain transformers +
    compressed-tensors runs an export with its own formula, so an exact comparison of the two needs
    hf_qad's model computed this way (weights are the same bits either way).
    """
    with mock.patch.object(cpu, "fake_quant_activation", lambda x, global_scale=None, *, name=None:
                           cpu.fake_quant(x, global_scale, name=name)):
        yield


def assert_plain_transformers_logits(path, ids: torch.Tensor, model: torch.nn.Module, tmp_path) -> None:
    """``path`` loads in plain transformers + compressed-tensors, in a process without hf_qad, with the
    logits of hf_qad's ``model`` under compressed-tensors' activation rounding."""
    with torch.no_grad(), compressed_tensors_activation_rounding():
        expected = model(ids).logits
    torch.save((ids, expected), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(path)!r})
        ids, expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            got = model(ids).logits
        assert "hf_qad" not in sys.modules, "hf_qad was imported"
        assert torch.equal(got, expected), (got - expected).abs().max()
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
