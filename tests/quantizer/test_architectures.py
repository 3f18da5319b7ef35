"""Llama-, Qwen- and Mistral-style models, MoE with separate expert Linears, fused experts refused."""

import pytest
import torch
import torch.nn as nn
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import hf_qad
from hf_qad import NVFP4Config, NVFP4Linear
from hf_qad.nvfp4.conversion import DEFAULT_MODULES_TO_NOT_CONVERT, plan_conversion, replace_linears

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    "model_cls, config_cls",
    [(Qwen2ForCausalLM, Qwen2Config), (MistralForCausalLM, MistralConfig)],
    ids=["qwen2", "mistral"],
)
def test_round_trip_on_other_architectures(tmp_path, model_cls, config_cls):
    torch.manual_seed(0)
    model_cls(config_cls(**SMALL)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=NVFP4Config(), dtype=torch.bfloat16)
    assert isinstance(model.model.layers[0].self_attn.q_proj, NVFP4Linear)
    ids = torch.randint(0, 96, (2, 12))
    hf_qad.calibrate(model, [ids])
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "packed")
    reloaded = hf_qad.load_packed_model(tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_fused_expert_tensors_raise_a_clear_error(tmp_path):
    config = MixtralConfig(**SMALL, num_local_experts=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"fused expert tensors.*model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=NVFP4Config())


def test_fused_experts_can_be_kept_knowingly(tmp_path):
    config = MixtralConfig(**SMALL, num_local_experts=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=NVFP4Config(modules_to_not_convert=["lm_head", "mlp.experts", "mlp.gate"])
    )
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, NVFP4Linear)
    assert not isinstance(layer.mlp.gate, NVFP4Linear)


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(32, 64, bias=False), nn.Linear(32, 64, bias=False)
        self.down_proj = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.gate_proj(x)) * self.up_proj(x))


class SeparateExpertsMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(32, 4, bias=False)  # the router
        self.experts = nn.ModuleList(Expert() for _ in range(4))

    def forward(self, x):
        weights = self.gate(x).softmax(-1)
        return sum(weights[..., i : i + 1] * expert(x) for i, expert in enumerate(self.experts))


def test_moe_with_separate_expert_linears_converts_every_expert_and_keeps_the_router():
    torch.manual_seed(0)
    moe = nn.Sequential()
    moe.add_module("mlp", SeparateExpertsMoE())
    plan = plan_conversion(moe, DEFAULT_MODULES_TO_NOT_CONVERT)
    assert plan.skipped == {"mlp.gate": "modules_to_not_convert"}
    assert len(plan.convert) == 12
    state = moe.state_dict()
    replace_linears(moe, plan, quantize_activations=False, device="cpu")
    moe.load_state_dict(state, strict=False)
    experts = moe.mlp.experts
    assert all(isinstance(e.gate_proj, NVFP4Linear) for e in experts)
    # gate/up of one expert share a global scale; different experts do not
    assert experts[0].gate_proj.global_scale_peers == (experts[0].up_proj,)
    assert moe(torch.randn(3, 32)).shape == (3, 32)
