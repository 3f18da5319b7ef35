"""from_pretrained -> trainable NVFP4 model -> packed export -> reload, with and without hf_qad."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config, NVFP4Linear
from tests.tiny_models import save_tiny_llama, token_batches


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


def _load(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**config), dtype=torch.bfloat16)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_from_pretrained_gives_trainable_fake_quant_model(bf16_path):
    model = _load(bf16_path)
    layers = hf_qad.quantizer.conversion.nvfp4_modules(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head kept
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, NVFP4Linear)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.weight.requires_grad and not q.is_packed
    assert model.hf_quantizer.is_qat_trainable and model.hf_quantizer.is_trainable
    # master weights are the checkpoint's tensors, untouched
    plain = AutoModelForCausalLM.from_pretrained(bf16_path, dtype=torch.bfloat16)
    assert torch.equal(q.weight, plain.model.layers[0].self_attn.q_proj.weight)
    # fused projections share one global scale
    k, v = model.model.layers[0].self_attn.k_proj, model.model.layers[0].self_attn.v_proj
    assert set(q.global_scale_peers) == {k, v}
    # the forward quantizes: logits differ from BF16's, gradients reach the masters
    ids = token_batches(1)[0]
    hf_qad.calibrate(model, [ids])
    assert not torch.equal(_logits(model, ids), _logits(plain, ids))
    model(ids, labels=ids).loss.backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


def test_w4a16_and_modules_to_not_convert(bf16_path):
    model = _load(bf16_path, scheme="w4a16", modules_to_not_convert=["lm_head", "model.layers.1"])
    layers = hf_qad.quantizer.conversion.nvfp4_modules(model)
    assert len(layers) == 7 and all(name.startswith("model.layers.0") for name in layers)
    assert not any(layer.quantize_activations for layer in layers.values())
    assert "model.layers.1.mlp.down_proj" in model.config.quantization_config.unconverted_linears


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_packed_export_round_trips_with_hf_qad(bf16_path, tmp_path, scheme):
    model = _load(bf16_path, scheme=scheme)
    ids = token_batches(1)[0]
    hf_qad.calibrate(model, [ids]) if scheme == "w4a4" else None
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    quant_config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant_config["quant_method"] == "compressed-tensors"
    assert quant_config["format"] == "nvfp4-pack-quantized"
    assert quant_config["ignore"] == ["lm_head"]
    assert "nvfp4-pack-quantized" in (tmp_path / "README.md").read_text()  # the model card comes with it
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.mlp.up_proj"
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.uint8
        assert f.get_tensor(f"{name}.weight_packed").shape == (128, 32)
        assert f.get_tensor(f"{name}.weight_scale").dtype == torch.float8_e4m3fn
        assert f.get_tensor(f"{name}.weight_global_scale").dtype == torch.float32
        assert (f"{name}.input_global_scale" in keys) == (scheme == "w4a4")
        assert f"{name}.weight" not in keys  # no full-size high-precision copy
        # vLLM fuses q/k/v with one global scale: they must be identical
        gs = [f.get_tensor(f"model.layers.0.self_attn.{p}_proj.weight_global_scale") for p in "qkv"]
        assert torch.equal(gs[0], gs[1]) and torch.equal(gs[0], gs[2])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = reloaded.model.layers[0].mlp.up_proj
    assert isinstance(layer, NVFP4Linear) and layer.is_packed
    assert not reloaded.hf_quantizer.is_qat_trainable
    assert torch.equal(_logits(reloaded, ids), expected)


def test_packed_export_loads_in_plain_transformers_without_hf_qad(bf16_path, tmp_path):
    model = _load(bf16_path)
    ids = token_batches(1)[0]
    hf_qad.calibrate(model, [ids])
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "packed")
    torch.save((ids, expected), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "packed")!r})
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


def test_master_weight_checkpoint_resumes_exactly(bf16_path, tmp_path):
    model = _load(bf16_path)
    ids = token_batches(1)[0]
    hf_qad.calibrate(model, [ids])
    with hf_qad.master_weight_checkpoint(model):
        model.save_pretrained(tmp_path)
    quant_config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant_config["quant_method"] == "hf_qad_nvfp4" and quant_config["weights_format"] == "master"
    assert not model.config.quantization_config.save_master_weights  # switched back
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = resumed.model.layers[0].mlp.up_proj
    assert not layer.is_packed and layer.input_calibrated
    assert torch.equal(layer.weight, model.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(_logits(resumed, ids), _logits(model, ids))


def test_unpacked_packed_model_continues_training_with_same_codes(bf16_path, tmp_path):
    model = _load(bf16_path, scheme="w4a16")
    model.save_pretrained(tmp_path)
    packed = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = token_batches(1)[0]
    expected = _logits(packed, ids)
    hf_qad.unpack_model(packed)
    assert packed.hf_quantizer.is_qat_trainable
    assert packed.model.layers[0].mlp.up_proj.weight.requires_grad
    assert torch.equal(_logits(packed, ids), expected)


def test_uncalibrated_w4a4_export_is_refused(bf16_path, tmp_path):
    model = _load(bf16_path)
    with pytest.raises(ValueError, match="never calibrated"):
        model.save_pretrained(tmp_path)


@pytest.mark.parametrize("cast", ["half", "float", "to_bf16"])
def test_dtype_casts_keep_packed_model_exact(bf16_path, tmp_path, cast):
    _load(bf16_path, scheme="w4a16").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = model.model.layers[0].mlp.up_proj
    before = [t.clone() for t in (layer.weight_packed, layer.weight_scale, layer.weight_global_scale)]
    cast_fn = {"half": lambda m: m.half(), "float": lambda m: m.float(), "to_bf16": lambda m: m.to(torch.bfloat16)}[cast]
    if cast == "to_bf16":
        cast_fn(model)
    else:  # transformers refuses .half()/.float() on quantized models; NVFP4Linear alone allows them
        with pytest.raises(ValueError, match="not supported for quantized model"):
            cast_fn(model)
        cast_fn(layer)
    after = (layer.weight_packed, layer.weight_scale, layer.weight_global_scale)
    for b, a in zip(before, after):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_layers_with_in_features_not_multiple_of_16_are_kept_and_ignored(tmp_path):
    path = save_tiny_llama(tmp_path / "odd", hidden_size=64, intermediate_size=72)  # down_proj in=72
    model = _load(path, scheme="w4a16")
    assert not isinstance(model.model.layers[0].mlp.down_proj, NVFP4Linear)
    model.save_pretrained(tmp_path / "packed")
    ignore = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.mlp.down_proj" in ignore and "lm_head" in ignore


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "w4a8"}, "unknown scheme"),
        ({"scale_method": "best"}, "unknown scale_method"),
        ({"modules_to_not_convert": "lm_head"}, "list of module-name patterns"),
        ({"weights_format": "zipped"}, "unknown weights_format"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NVFP4Config(**kwargs)


def test_unknown_option_in_a_config_dict():
    with pytest.raises(ValueError, match="unknown NVFP4Config options: bits"):
        NVFP4Config.from_dict({"quant_method": "hf_qad_nvfp4", "bits": 4})


def test_nan_weights_error_names_the_module(bf16_path):
    model = _load(bf16_path, scheme="w4a16")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.gate_proj"):
        model(token_batches(1)[0])
