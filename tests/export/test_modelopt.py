"""ModelOpt NVFP4 export: layout, scale relations, and equality with the compressed-tensors export."""

import json
from fnmatch import fnmatch

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config, save_modelopt_checkpoint
from hf_qad.nvfp4 import dequantize
from hf_qad.nvfp4.conversion import nvfp4_modules
from tests.export.checkpoint_files import as_bytes, read_tensors
from tests.tiny_models import save_tiny_llama, token_batches

# E2M1 values by 4-bit code (bit 3 is the sign), as ModelOpt's NVFP4QTensor dequantizes.
E2M1_BY_CODE = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


def _load(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**config), dtype=torch.bfloat16)


def _calibrated(path, scheme="w4a4", **config):
    model = _load(path, scheme=scheme, **config)
    if scheme == "w4a4":
        hf_qad.calibrate(model, token_batches(1))
    return model


def _modelopt_dequantize(weight, weight_scale, weight_scale_2):
    """ModelOpt's definition, written out: value(code) * weight_scale * weight_scale_2."""
    codes = torch.stack((weight & 0x0F, weight >> 4), dim=-1).flatten(-2)
    values = E2M1_BY_CODE[codes.long()].unflatten(-1, (-1, 16))
    return (values * (weight_scale.float() * weight_scale_2).unsqueeze(-1)).flatten(-2)


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_layout_names_dtypes_and_shapes(bf16_path, tmp_path, scheme):
    model = _calibrated(bf16_path, scheme)
    save_modelopt_checkpoint(model, tmp_path)
    tensors = read_tensors(tmp_path)
    layers = nvfp4_modules(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        out, inp = layer.out_features, layer.in_features
        assert tensors[f"{name}.weight"].dtype == torch.uint8 and tensors[f"{name}.weight"].shape == (out, inp // 2)
        assert tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        assert tensors[f"{name}.weight_scale"].shape == (out, inp // 16)
        assert tensors[f"{name}.weight_scale_2"].dtype == torch.float32 and tensors[f"{name}.weight_scale_2"].shape == ()
        if scheme == "w4a4":
            assert tensors[f"{name}.input_scale"].dtype == torch.float32 and tensors[f"{name}.input_scale"].shape == ()
        else:
            assert f"{name}.input_scale" not in tensors
    compressed_tensors_names = ("weight_packed", "weight_global_scale", "input_global_scale")
    assert not [k for k in tensors if k.rpartition(".")[2] in compressed_tensors_names]
    # everything else is the model's own tensors, unchanged
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert torch.equal(tensors[name], model.state_dict()[name])


def test_scales_are_reciprocals_and_weights_match_the_packed_model(bf16_path, tmp_path):
    model = _calibrated(bf16_path)
    model.save_pretrained(tmp_path / "ct")
    packed = hf_qad.load_packed_model(tmp_path / "ct")  # packed-mode NVFP4Linear layers
    save_modelopt_checkpoint(model, tmp_path / "from_fake")
    save_modelopt_checkpoint(packed, tmp_path / "from_packed")
    from_fake, from_packed = read_tensors(tmp_path / "from_fake"), read_tensors(tmp_path / "from_packed")
    assert from_fake.keys() == from_packed.keys()
    for name in from_fake:
        assert torch.equal(as_bytes(from_fake[name]), as_bytes(from_packed[name])), name

    for name, layer in nvfp4_modules(packed).items():
        assert layer.is_packed
        weight, scale, scale_2 = (from_fake[f"{name}.{t}"] for t in ("weight", "weight_scale", "weight_scale_2"))
        # codes and block scales are the compressed-tensors bytes; global scales are reciprocals
        assert torch.equal(weight, layer.weight_packed)
        assert torch.equal(as_bytes(scale), as_bytes(layer.weight_scale))
        assert torch.equal(scale_2, (1 / layer.weight_global_scale).reshape(()))
        assert torch.equal(from_fake[f"{name}.input_scale"], (1 / layer.input_global_scale).reshape(()))
        # code * scale * scale_2 versus code * scale / global_scale: the same up to float32 rounding
        expected = dequantize(*layer.quantized_weight(), dtype=torch.float32)
        torch.testing.assert_close(_modelopt_dequantize(weight, scale, scale_2), expected, rtol=2**-22, atol=0)


def test_fused_projections_share_their_scales(bf16_path, tmp_path):
    save_modelopt_checkpoint(_calibrated(bf16_path), tmp_path)
    tensors = read_tensors(tmp_path)
    for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
        for scale in ("weight_scale_2", "input_scale"):
            values = {tensors[f"model.layers.0.{proj}.{scale}"].item() for proj in group}
            assert len(values) == 1, (group, scale, values)


def test_quant_configs_and_excluded_linears(tmp_path):
    path = save_tiny_llama(tmp_path / "odd", hidden_size=64, intermediate_size=72)  # down_proj: in=72
    model = _calibrated(path, "w4a16")
    save_modelopt_checkpoint(model, tmp_path / "out")

    quant = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
    excluded = ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert quant["producer"]["name"] == "modelopt"
    assert quant["quantization"] == {
        "quant_algo": "W4A16_NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": 16,
        "exclude_modules": excluded,
    }
    assert quant["hf_qad"]["scheme"] == "w4a16"

    inline = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert inline["quant_method"] == "modelopt"
    assert (inline["quant_algo"], inline["group_size"], inline["ignore"]) == ("W4A16_NVFP4", 16, excluded)
    assert inline["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert "input_activations" not in inline["config_groups"]["group_0"]

    # every Linear is either excluded (full-precision weight) or quantized, as engines match them
    tensors = read_tensors(tmp_path / "out")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            is_excluded = any(fnmatch(name, pattern) for pattern in quant["quantization"]["exclude_modules"])
            assert is_excluded == (f"{name}.weight_scale" not in tensors), name
            if is_excluded:
                assert tensors[f"{name}.weight"].dtype == torch.bfloat16


def test_w4a4_configs_describe_activations(bf16_path, tmp_path):
    save_modelopt_checkpoint(_calibrated(bf16_path), tmp_path)
    quant = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
    inline = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant["quant_algo"] == inline["quant_algo"] == "NVFP4"
    assert inline["config_groups"]["group_0"]["input_activations"]["group_size"] == 16


def test_sharded_checkpoint_index_is_renamed(bf16_path, tmp_path):
    save_modelopt_checkpoint(_calibrated(bf16_path), tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for name, shard in index["weight_map"].items():
        with safe_open(tmp_path / shard, "pt") as f:
            assert name in f.keys(), name
    assert "model.layers.0.mlp.up_proj.weight_scale_2" in index["weight_map"]


def test_tokenizer_is_saved_alongside(bf16_path, tmp_path):
    class Tokenizer:
        def save_pretrained(self, directory):
            (directory / "tokenizer_config.json").write_text("{}")

    save_modelopt_checkpoint(_calibrated(bf16_path, "w4a16"), tmp_path, tokenizer=Tokenizer())
    assert (tmp_path / "tokenizer_config.json").exists()


def test_uncalibrated_w4a4_model_is_refused(bf16_path, tmp_path):
    with pytest.raises(ValueError, match="never calibrated.*hf_qad.calibrate"):
        save_modelopt_checkpoint(_load(bf16_path), tmp_path)


def test_only_hf_qad_models_are_accepted(bf16_path, tmp_path):
    with pytest.raises(ValueError, match="NVFP4Config"):
        save_modelopt_checkpoint(AutoModelForCausalLM.from_pretrained(bf16_path), tmp_path)
