"""Which Linear layers become NVFP4Linear: the scheme, modules_to_not_convert, shapes that cannot be quantized."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.quantizers_utils import should_convert_module

import hf_qad
from hf_qad import NVFP4Config, NVFP4Linear
from hf_qad.nvfp4.conversion import DEFAULT_MODULES_TO_NOT_CONVERT
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


def _prefix_rule(name: str, patterns: list[str]) -> bool:
    """transformers 5.20's should_convert_module: a pattern matches as a bare prefix (re.match), no boundary."""
    return not any(re.match(f"{key}\\.", name) or re.match(key, name) or name.endswith(key) for key in patterns)


@pytest.mark.parametrize("rule", [should_convert_module, _prefix_rule], ids=["installed", "transformers_5_20"])
def test_default_patterns_keep_routers_not_gate_proj_under_either_matching_rule(rule):
    patterns = list(DEFAULT_MODULES_TO_NOT_CONVERT)
    assert rule("model.layers.0.mlp.gate_proj", patterns)
    assert rule("model.layers.0.mlp.up_proj", patterns)
    for router in ("model.layers.0.mlp.gate", "model.layers.0.block_sparse_moe.gate", "model.layers.0.mlp.router",
                   "model.layers.0.mlp.shared_expert_gate", "lm_head"):
        assert not rule(router, patterns), router
