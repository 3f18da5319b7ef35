"""LoRA (peft) on NVFP4 models: training, adapter reload, merge and export, the shared teacher."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config, NVFP4Linear
from hf_qad.nvfp4 import functional
from hf_qad.nvfp4.conversion import nvfp4_experts, nvfp4_modules
from tests.tiny_models import save_tiny_llama, save_tiny_model, token_batches

LAYER = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def packed_path(bf16_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("packed")
    _load(bf16_path, scheme="w4a16").save_pretrained(path)
    return path


def _load(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**config), dtype=torch.bfloat16)


def _lora(model, registered=True, **kwargs):
    # init_lora_weights=False: random B as well as A, so adapters change outputs from step 0
    kwargs.setdefault("target_modules", "all-linear")
    config = LoraConfig(r=4, init_lora_weights=False, **kwargs)
    return get_peft_model(model, hf_qad.register_nvfp4_lora(config) if registered else config)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _train_step(model, ids):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _master(model):
    return {layer.module_name: layer.weight.detach().clone() for layer in nvfp4_modules(model).values()}


@pytest.mark.parametrize("scheme", ["w4a16", "w4a4"])
def test_adapters_train_on_a_frozen_base_quantized_once(bf16_path, monkeypatch, scheme):
    base = _load(bf16_path, scheme=scheme)
    ids = token_batches(1)[0]
    if scheme == "w4a4":
        hf_qad.calibrate(base, [ids])
    before = _master(base)
    model = _lora(base)
    layers = nvfp4_modules(model)
    assert len(layers) == 14 and all(not layer.weight.requires_grad for layer in layers.values())
    wrapper = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(wrapper, hf_qad.NVFP4LoraLinear) and isinstance(wrapper.base_layer, NVFP4Linear)
    lora_a = wrapper.lora_A["default"].weight.detach().clone()

    weight_quantizations = []
    original = functional.fake_quant

    def counting(x, *args, **kwargs):
        if isinstance(x, torch.nn.Parameter):  # weights, not activations
            weight_quantizations.append(x)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(functional, "fake_quant", counting)
    _train_step(model, ids)
    _train_step(model, ids)
    assert len(weight_quantizations) == len(layers)  # each frozen weight once, over both steps
    assert not torch.equal(wrapper.lora_A["default"].weight, lora_a)
    for name, weight in _master(model).items():
        assert torch.equal(weight, before[name]), name


def test_adapters_save_and_reload_on_a_base_loaded_with_hf_qad(bf16_path, tmp_path):
    model = _lora(_load(bf16_path, scheme="w4a16"))
    ids = token_batches(1)[0]
    _train_step(model, ids)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_load(bf16_path, scheme="w4a16"), tmp_path)
    assert isinstance(reloaded.base_model.model.model.layers[0].mlp.up_proj.base_layer, NVFP4Linear)
    assert torch.equal(_logits(reloaded, ids), expected)


def test_merge_and_unload_then_save_pretrained_exports_packed_nvfp4(bf16_path, tmp_path):
    base = _load(bf16_path)  # W4A4 (W4A16 is merged and exported on the packed base below)
    ids = token_batches(1)[0]
    hf_qad.calibrate(base, [ids])
    before = _master(base)
    quantized_base = _logits(base, ids)  # fills the frozen-weight caches that merging must drop
    model = _lora(base)
    wrapper = model.base_model.model.model.layers[0].mlp.up_proj
    delta = wrapper.get_delta_weight("default")  # float32, added to the bf16 weight in place
    merged = model.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    assert torch.equal(merged.get_submodule(LAYER).weight, (before[LAYER].float() + delta).to(torch.bfloat16))
    expected = _logits(merged, ids)
    assert not torch.equal(expected, quantized_base)  # the merged weights are the ones quantized
    merged.save_pretrained(tmp_path)
    exported = hf_qad.load_packed_model(tmp_path)
    assert exported.hf_quantizer.packed
    assert exported.get_submodule(LAYER).is_packed
    assert torch.equal(_logits(exported, ids), expected)


def test_merge_adapter_and_unmerge_adapter_requantize_the_base(bf16_path):
    model = _lora(_load(bf16_path, scheme="w4a16"))
    ids = token_batches(1)[0]
    _logits(model, ids)  # fill the caches

    def fresh():  # the logits with every cached quantized weight recomputed
        for layer in nvfp4_modules(model).values():
            layer.mark_weight_changed()
        return _logits(model, ids)

    model.merge_adapter()
    merged = _logits(model, ids)
    assert torch.equal(merged, fresh())
    model.unmerge_adapter()
    assert torch.equal(_logits(model, ids), fresh())
    assert not torch.equal(_logits(model, ids), merged)


@pytest.mark.parametrize("registered", [True, False])
def test_merge_without_the_registration_is_still_exact(bf16_path, registered):
    # peft's stock LoRA Linear writes merges through weight.data, which the frozen-weight cache cannot see:
    # the cache is only on under NVFP4LoraLinear, whose merges drop it.
    model = _lora(_load(bf16_path, scheme="w4a16"), registered=registered)
    wrapper = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(wrapper, hf_qad.NVFP4LoraLinear) == registered == wrapper.base_layer.cache_frozen_weight
    ids = token_batches(1)[0]
    _logits(model, ids)  # fills the caches where they are on
    merged = model.merge_and_unload()
    got = _logits(merged, ids)
    for layer in nvfp4_modules(merged).values():
        layer.cache_frozen_weight = False  # recompute every quantized weight from the merged masters
    assert torch.equal(got, _logits(merged, ids))


def test_lora_on_a_packed_base_trains_and_refuses_to_merge(packed_path, tmp_path):
    base = hf_qad.load_packed_model(packed_path)
    codes = base.get_submodule(LAYER).weight_packed.clone()
    model = _lora(base)
    wrapper = model.base_model.model.model.layers[0].mlp.up_proj
    assert wrapper.base_layer.is_packed and wrapper.lora_A["default"].weight.device == codes.device
    ids = token_batches(1)[0]
    lora_b = wrapper.lora_B["default"].weight.detach().clone()
    _train_step(model, ids)
    assert not torch.equal(wrapper.lora_B["default"].weight, lora_b)
    assert torch.equal(wrapper.base_layer.weight_packed, codes)

    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(hf_qad.load_packed_model(packed_path), tmp_path / "adapter")
    assert torch.equal(_logits(reloaded, ids), expected)

    with pytest.raises(ValueError, match=r"packed NVFP4 weights.*hf_qad\.unpack_model\(model\)"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="packed NVFP4 weights"):
        model.merge_adapter()
    assert torch.equal(_logits(model, ids), expected)  # nothing was merged

    # The way out the error names: unpack, then merge and export.
    hf_qad.unpack_model(model)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    exported = hf_qad.load_packed_model(tmp_path / "merged")
    assert torch.equal(_logits(exported, ids), _logits(merged, ids))


@pytest.mark.parametrize("scheme", ["w4a16", "w4a4"])
def test_teacher_mode_gives_the_bf16_models_logits(bf16_path, scheme):
    bf16 = AutoModelForCausalLM.from_pretrained(bf16_path, dtype=torch.bfloat16)
    base = _load(bf16_path, scheme=scheme)
    ids = token_batches(1)[0]
    if scheme == "w4a4":
        hf_qad.calibrate(base, [ids])
    # down_proj fully trained (a trainable copy in modules_to_save), the rest LoRA
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    model = _lora(base, target_modules=targets, modules_to_save=["down_proj"])
    _train_step(model, ids)
    student = _logits(model, ids)
    teacher = _logits(bf16, ids)
    assert not torch.equal(student, teacher)
    with hf_qad.teacher_mode(model) as same:
        assert same is model
        assert torch.equal(_logits(model, ids), teacher)
    assert torch.equal(_logits(model, ids), student)
    with pytest.raises(RuntimeError, match="boom"), hf_qad.teacher_mode(model):
        raise RuntimeError("boom")
    assert all(layer.quantization_enabled for layer in nvfp4_modules(model).values())
    assert torch.equal(_logits(model, ids), student)


def test_teacher_mode_refuses_what_is_not_the_teacher(bf16_path, packed_path):
    with pytest.raises(TypeError, match="PeftModel"):
        with hf_qad.teacher_mode(_load(bf16_path, scheme="w4a16")):
            pass
    with pytest.raises(ValueError, match="packed NVFP4"):
        with hf_qad.teacher_mode(_lora(hf_qad.load_packed_model(packed_path))):
            pass
    model = _lora(_load(bf16_path, scheme="w4a16"))
    model.base_model.model.get_submodule(LAYER).base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=f"{LAYER}.*trainable"):
        with hf_qad.teacher_mode(model):
            pass
    model = _lora(_load(bf16_path, scheme="w4a16"))
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        with hf_qad.teacher_mode(model):
            pass


def test_quantization_switch_of_nvfp4_linear():
    linear = torch.nn.Linear(32, 8)
    layer = NVFP4Linear.from_linear(linear, quantize_activations=True)
    x = torch.randn(4, 32)
    hf_qad.calibrate(layer, [x])
    layer.quantization_enabled = False
    assert torch.equal(layer(x), linear(x))  # neither weights nor activations quantized
    layer.quantization_enabled = True
    assert not torch.equal(layer(x), linear(x))
    layer.pack().quantization_enabled = False
    with pytest.raises(RuntimeError, match="packed"):
        layer(x)


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral"])
def test_teacher_mode_turns_off_the_quantization_of_moe_experts(architecture, tmp_path):
    path = save_tiny_model(tmp_path / "bf16", architecture)
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # NVFP4Experts computes as its grouped_mm
    base = _load(path, scheme="w4a4")
    ids = token_batches(1, batch=4)[0]
    hf_qad.calibrate(base, [ids])
    model = _lora(base, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # the experts: quantized base only
    _train_step(model, ids)
    experts = list(nvfp4_experts(model).values())
    assert len(experts) == 2 and not any(p.requires_grad for e in experts for p in e.parameters())
    student, teacher = _logits(model, ids), _logits(bf16, ids)
    with hf_qad.teacher_mode(model):
        assert not any(e.quantization_enabled for e in experts)
        assert torch.equal(_logits(model, ids), teacher)
    assert all(e.quantization_enabled for e in experts)
    assert torch.equal(_logits(model, ids), student)
    with model.disable_adapter():  # the experts' switch matters: only the Linear layers off is not the teacher
        for layer in nvfp4_modules(model).values():
            layer.quantization_enabled = False
        try:
            assert not torch.equal(_logits(model, ids), teacher)
        finally:
            for layer in nvfp4_modules(model).values():
                layer.quantization_enabled = True
