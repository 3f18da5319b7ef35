"""Which Linear layers become NVFP4Linear: the scheme, modules_to_not_convert, shapes that cannot be quantized."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config, NVFP4Linear
from tests.tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


def _load(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**config), dtype=torch.bfloat16)


def test_w4a16_and_modules_to_not_convert(bf16_path):
    model = _load(bf16_path, scheme="w4a16", modules_to_not_convert=["lm_head", "model.layers.1"])
    layers = hf_qad.nvfp4.conversion.nvfp4_modules(model)
    assert len(layers) == 7 and all(name.startswith("model.layers.0") for name in layers)
    assert not any(layer.quantize_activations for layer in layers.values())
    assert "model.layers.1.mlp.down_proj" in model.hf_quantizer.unconverted_linears


def test_layers_with_in_features_not_multiple_of_16_are_kept_and_ignored(tmp_path):
    path = save_tiny_llama(tmp_path / "odd", hidden_size=64, intermediate_size=72)  # down_proj in=72
    model = _load(path, scheme="w4a16")
    assert not isinstance(model.model.layers[0].mlp.down_proj, NVFP4Linear)
    model.save_pretrained(tmp_path / "packed")
    ignore = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.mlp.down_proj" in ignore and "lm_head" in ignore
