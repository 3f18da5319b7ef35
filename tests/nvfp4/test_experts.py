"""Fused MoE experts: on-disk names of routers and kept experts, as ``ignore`` / ``exclude_modules`` list them."""

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_qad.nvfp4.experts import (
    checkpoint_module_names,
    checkpoint_slices,
    experts_listed_by_name,
    fused_expert_modules,
    high_precision_moe_names,
    router_modules,
)

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def tiny_qwen3_moe() -> Qwen3MoeForCausalLM:
    with torch.device("meta"):
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, head_dim=16))


def tiny_mixtral() -> MixtralForCausalLM:
    with torch.device("meta"):
        return MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=2))


def test_fused_experts_and_their_routers_are_found():
    model = tiny_qwen3_moe()
    assert fused_expert_modules(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert router_modules(model) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_checkpoint_names_follow_the_architectures_weight_conversion():
    qwen = tiny_qwen3_moe()
    assert checkpoint_module_names(qwen, "model.layers.1.mlp.experts") == [
        f"model.layers.1.mlp.experts.{e}.{p}" for e in range(4) for p in ("down_proj", "gate_proj", "up_proj")
    ]
    mixtral = tiny_mixtral()  # on disk: block_sparse_moe.experts.N.w1/w2/w3 and block_sparse_moe.gate
    assert checkpoint_module_names(mixtral, "model.layers.0.mlp.experts") == [
        f"model.layers.0.block_sparse_moe.experts.{e}.w{i}" for e in range(2) for i in (1, 2, 3)
    ]
    assert checkpoint_module_names(mixtral, "model.layers.0.mlp.gate") == ["model.layers.0.block_sparse_moe.gate"]


def test_high_precision_names_list_routers_always_and_kept_experts_as_vllm_probes_them():
    qwen = tiny_qwen3_moe()
    assert high_precision_moe_names(qwen, []) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    names = high_precision_moe_names(qwen, ["model.layers.0.mlp.experts"])
    assert "model.layers.0.mlp.experts.3.down_proj" in names
    assert not any(name.startswith("model.layers.1.mlp.experts") for name in names)
    mixtral = tiny_mixtral()
    names = high_precision_moe_names(mixtral, ["model.layers.0.mlp.experts"])
    # vLLM's compressed-tensors MoE lookup probes <prefix>.0.gate_proj/up_proj/down_proj whatever the architecture
    assert {"model.layers.0.block_sparse_moe.experts.0.gate_proj", "model.layers.0.block_sparse_moe.experts.1.w3",
            "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"} <= set(names)
    # and the list reads back as exactly those experts kept
    assert experts_listed_by_name(mixtral, names) == ["model.layers.0.mlp.experts"]


def test_checkpoint_slices_say_which_expert_and_rows_each_on_disk_tensor_holds():
    qwen = tiny_qwen3_moe()
    slices = checkpoint_slices(qwen, "model.layers.1.mlp.experts.gate_up_proj", 4, 64)
    assert slices["model.layers.1.mlp.experts.2.gate_proj.weight"] == (2, slice(0, 32))
    assert slices["model.layers.1.mlp.experts.3.up_proj.weight"] == (3, slice(32, 64))
    assert len(slices) == 8
    mixtral = tiny_mixtral()
    assert checkpoint_slices(mixtral, "model.layers.0.mlp.experts.down_proj", 2, 64) == {
        f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": (e, slice(0, 64)) for e in range(2)}
    assert checkpoint_slices(qwen, "model.layers.0.mlp.experts.gate_up_proj_packed", 4, 64) == {}
