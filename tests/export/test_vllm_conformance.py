"""vLLM reads hf_qad's exports as hf_qad means them (optional: skipped unless ``vllm`` imports).

vLLM needs a GPU kernel to build an NVFP4 layer, so on a CPU machine the model itself is not built;
each layer of the export is resolved the way vLLM resolves it while building the model:

* ``config.json``'s ``quantization_config`` is parsed by vLLM's ``CompressedTensorsConfig``
  (``hf_quant_config.json`` by ``ModelOptNvFp4Config`` for the ModelOpt layout), with the model
  class's weight-name mapper and fused-module mapping applied (what ``SupportsQuant`` does when
  vLLM instantiates the model).
* Every Linear (under vLLM's fused name: ``qkv_proj``, ``gate_up_proj``) and the router get their
  scheme from ``get_scheme`` with an instance of the layer class vLLM uses there (the
  ``Linear`` target matches by class name); quantized layers must get the NVFP4 scheme with the
  export's activation mode, and the parameters that scheme creates must be exactly what the
  export holds on disk (names, shapes, dtypes; fused shards stacked).
* Each fused-experts layer is resolved as ``CompressedTensorsMoEMethod.get_moe_method`` does
  (its ``<prefix>.0.gate_proj`` / ``up_proj`` / ``down_proj`` probes), and every on-disk expert
  tensor is mapped by the architecture's expert-params mapping
  (``RoutedExperts.build_expert_params_mapping``, what ``RoutedExperts.load_weights`` uses) to a
  parameter the selected MoE method creates, with the per-expert shape.
* Routers, kept experts and the head must resolve to unquantized, in both layouts.

Run it where vLLM is installed, a separate virtual environment (setup in CHANGELOG, issue 10; vLLM 0.33 pins
transformers < 5.21, and hf_qad's MoE loading needs 5.24, installed over the pin)::

    PYTHONPATH=. /path/to/vllm-venv/bin/python -m pytest tests/export/test_vllm_conformance.py
"""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: E402
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear  # noqa: E402
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization.compressed_tensors import compressed_tensors as ct  # noqa: E402
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (  # noqa: E402
    compressed_tensors_moe_w4a4_nvfp4 as ct_moe_nvfp4,
)
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (  # noqa: E402
    compressed_tensors_w4a4_nvfp4 as ct_nvfp4,
)
from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config  # noqa: E402

import hf_qad  # noqa: E402
from hf_qad import NVFP4Config  # noqa: E402
from hf_qad.export.modelopt import save_modelopt_checkpoint  # noqa: E402
from hf_qad.nvfp4.experts import checkpoint_module_names, fused_expert_modules, router_modules  # noqa: E402
from tests.tiny_models import KEEP_EXPERTS, save_tiny_llama_with_tokenizer, save_tiny_model, token_batches  # noqa: E402

# The vLLM model class of each architecture tested here.
VLLM_MODELS = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama",
    "Qwen3MoeForCausalLM": "vllm.model_executor.models.qwen3_moe",
    "MixtralForCausalLM": "vllm.model_executor.models.mixtral",
}

# The checkpoint names of each expert's gate, down and up projections that the architecture's vLLM model gives
# its RoutedExperts (ckpt_gate_proj_name, ckpt_down_proj_name, ckpt_up_proj_name).
EXPERT_CHECKPOINT_NAMES = {
    "Qwen3MoeForCausalLM": ("gate_proj", "down_proj", "up_proj"),
    "MixtralForCausalLM": ("w1", "w2", "w3"),
}

# The vLLM layer class at each Linear of these architectures (the compressed-tensors "Linear" target
# matches by class name): fused q/k/v and gate/up, row-parallel o_proj and down_proj.
VLLM_LINEAR_CLASSES = {
    "qkv_proj": QKVParallelLinear,
    "gate_up_proj": MergedColumnParallelLinear,
    "o_proj": RowParallelLinear,
    "down_proj": RowParallelLinear,
}

EXPORTS = {
    # name: (source model, NVFP4Config options)
    "llama_w4a4": ("llama", {}),
    "llama_w4a16": ("llama", {"scheme": "w4a16"}),
    "qwen3_moe_w4a4": ("qwen3_moe", {}),
    "qwen3_moe_w4a16": ("qwen3_moe", {"scheme": "w4a16"}),
    "qwen3_moe_experts_kept_w4a4": ("qwen3_moe", {"modules_to_not_convert": KEEP_EXPERTS}),
    "mixtral_w4a4": ("mixtral", {}),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Each export of :data:`EXPORTS` in the compressed-tensors layout (``name``) and ModelOpt's (``name/modelopt``)."""
    root = tmp_path_factory.mktemp("vllm_exports")
    sources = {"llama": save_tiny_llama_with_tokenizer(root / "llama"),
               **{moe: save_tiny_model(root / moe, moe) for moe in ("qwen3_moe", "mixtral")}}
    paths = {}
    for name, (source, options) in EXPORTS.items():
        config = NVFP4Config(**options)
        model = AutoModelForCausalLM.from_pretrained(sources[source], quantization_config=config)
        if config.scheme == "w4a4":
            hf_qad.calibrate(model, [{"input_ids": ids} for ids in token_batches()])
        model.save_pretrained(root / name)
        save_modelopt_checkpoint(model, root / name / "modelopt")
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def vllm_parallel_state(tmp_path_factory):
    """One process as vLLM's tensor-parallel group: vLLM's weight parameters record their rank at creation."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig("cpu"))):
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"file://{tmp_path_factory.mktemp('vllm_dist') / 'init'}",
        )
        parallel_state.initialize_model_parallel(1, 1)
        yield
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()


@pytest.fixture
def no_kernel_selection(monkeypatch):
    """vLLM's NVFP4 scheme picks its GEMM kernel when built; a CPU has none, and the layout is what is checked."""
    monkeypatch.setattr(ct_nvfp4, "init_nvfp4_linear_kernel",
                        lambda use_a16=False: types.SimpleNamespace(input_quant_key=lambda: None))


def _vllm_model_class(path: Path) -> type:
    (architecture,) = json.loads((path / "config.json").read_text())["architectures"]
    return getattr(importlib.import_module(VLLM_MODELS[architecture]), architecture)


def _with_model_mappings(config, model_class: type):
    """The quantization config as vLLM's model sees it: the model's name mapper and fused-module mapping applied."""
    if model_class.hf_to_vllm_mapper is not None:
        config.apply_vllm_mapper(model_class.hf_to_vllm_mapper.get_rename_mapper())
    config.packed_modules_mapping.update(model_class.packed_modules_mapping)
    return config


def _hf_model(path: Path) -> torch.nn.Module:
    """The export's architecture, on the meta device, for its module names."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def _vllm_linears(hf_model: torch.nn.Module, packed: dict[str, list[str]]) -> dict[str, list[str]]:
    """vLLM's Linear layer names (fused where vLLM fuses), each with the on-disk module names it loads."""
    fused_name = {shard: fused for fused, shards in packed.items() for shard in shards}
    layers: dict[str, list[str]] = {}
    for name, module in hf_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            parent, _, leaf = name.rpartition(".")
            layers.setdefault(f"{parent}.{fused_name.get(leaf, leaf)}", []).append(name)
    return layers


def _instance(layer_class: type) -> torch.nn.Module:
    # get_scheme reads the layer's class name only; building the layer itself needs vLLM's distributed state.
    return layer_class.__new__(layer_class)


def _created_parameters(scheme, shard_shapes: list[tuple[int, int]]) -> dict[str, torch.nn.Parameter]:
    """The parameters a compressed-tensors scheme creates for a layer of these ``[out, in]`` shards."""
    layer = torch.nn.Module()
    scheme.create_weights(layer, output_partition_sizes=[out for out, _ in shard_shapes],
                          input_size_per_partition=shard_shapes[0][1], params_dtype=torch.bfloat16,
                          weight_loader=None)
    return dict(layer.named_parameters())


def _shards_on_disk(tensors: dict[str, torch.Tensor], modules: list[str], param: str) -> list[torch.Tensor]:
    return [tensors[f"{module}.{param}"] for module in modules]


def _moe_method_parameters(method_class: type, num_experts: int, hidden: int, intermediate: int) -> dict:
    """The parameters ``method_class.create_weights`` registers on an experts layer (names, shapes, dtypes).

    Called on a stand-in for the method: building the method picks a GPU kernel, which a CPU has not.
    ``create_weights`` reads only the MoE config's gating and sizes (and the NVFP4 block size).
    """
    moe = types.SimpleNamespace(is_act_and_mul=True, has_bias=False, hidden_dim_unpadded=hidden,
                                intermediate_size_per_partition_unpadded=intermediate)
    stand_in = types.SimpleNamespace(moe=moe, group_size=16)
    layer = torch.nn.Module()
    method_class.create_weights(stand_in, layer, num_experts=num_experts, hidden_size=hidden,
                                intermediate_size_per_partition=intermediate, params_dtype=torch.bfloat16)
    return dict(layer.named_parameters())


@pytest.mark.parametrize("name", list(EXPORTS))
def test_compressed_tensors_config_resolves_every_layer_as_exported(exports, name, vllm_parallel_state,
                                                                   no_kernel_selection):
    path = exports[name]
    model_class = _vllm_model_class(path)
    config = _with_model_mappings(
        ct.CompressedTensorsConfig.from_config(json.loads((path / "config.json").read_text())["quantization_config"]),
        model_class,
    )
    tensors = load_file(path / "model.safetensors")
    hf_model = _hf_model(path)
    w4a16 = EXPORTS[name][1].get("scheme") == "w4a16"

    linears = _vllm_linears(hf_model, config.packed_modules_mapping)
    assert linears
    for prefix, modules in linears.items():
        scheme = config.get_scheme(_instance(VLLM_LINEAR_CLASSES[prefix.rpartition(".")[2]]), prefix)
        quantized = all(f"{module}.weight_packed" in tensors for module in modules)
        if not quantized:
            assert scheme is None, prefix
            continue
        assert isinstance(scheme, ct_nvfp4.CompressedTensorsW4A4Fp4) and scheme.use_a16 == w4a16, prefix
        shapes = [tuple(hf_model.get_submodule(module).weight.shape) for module in modules]
        created = _created_parameters(scheme, shapes)
        on_disk = {key.rpartition(".")[2] for key in tensors if key.rpartition(".")[0] in modules}
        assert on_disk == set(created), prefix  # every tensor loads, and every parameter is loaded
        for param, value in created.items():
            shards = _shards_on_disk(tensors, modules, param)
            assert all(shard.dtype == value.dtype for shard in shards), (prefix, param)
            if value.dim() == 2:  # packed weights and block scales stack along the output rows
                assert torch.cat(shards).shape == value.shape, (prefix, param)
            else:  # per-shard global scales
                assert sum(shard.numel() for shard in shards) == value.numel(), (prefix, param)

    # The head and the routers stay in high precision under vLLM too.
    assert config.get_scheme(_instance(GateLinear), "lm_head") is None
    for router in router_modules(hf_model):
        (on_disk,) = checkpoint_module_names(hf_model, router)
        assert config.get_scheme(_instance(GateLinear), on_disk) is None, on_disk
        assert tensors[f"{on_disk}.weight"].dtype == torch.bfloat16

    for experts in fused_expert_modules(hf_model):
        per_expert = checkpoint_module_names(hf_model, experts)
        prefix = per_expert[0].rsplit(".", 2)[0]  # vLLM's RoutedExperts prefix: model.layers.L.mlp.experts
        # CompressedTensorsMoEMethod.get_moe_method's lookup: one scheme for the three probes, None = unquantized.
        config._add_fused_moe_to_target_scheme_map()
        names = EXPERT_CHECKPOINT_NAMES[model_class.__name__]
        schemes = [config.get_scheme_dict(_instance(RoutedExperts), f"{prefix}.0.{probe}") for probe in names]
        assert all(scheme == schemes[0] for scheme in schemes), prefix
        if all(f"{module}.weight_packed" in tensors for module in per_expert):
            assert schemes[0] is not None and config._is_nvfp4_format(schemes[0]["weights"]), prefix
            method = ct_moe_nvfp4.CompressedTensorsW4A4Nvfp4MoEMethod
        else:
            assert schemes[0] is None, prefix  # kept experts: vLLM's UnquantizedFusedMoEMethod
            method = UnquantizedFusedMoEMethod
        text = hf_model.config.get_text_config()
        intermediate = getattr(text, "moe_intermediate_size", text.intermediate_size)  # Mixtral: intermediate_size
        created = _moe_method_parameters(method, text.num_experts, text.hidden_size, intermediate)
        if w4a16:  # vLLM's NVFP4 MoE method always creates input scales; weight-only checkpoints leave them unloaded
            created = {k: v for k, v in created.items() if "input_global_scale" not in k}
        _assert_experts_load(tensors, prefix, created, text.num_experts, names)


def _assert_experts_load(tensors: dict[str, torch.Tensor], prefix: str, created: dict, num_experts: int,
                         names: tuple[str, str, str]) -> None:
    """Every on-disk tensor of the experts at ``prefix`` maps to a created parameter with its per-expert shape."""
    # RoutedExperts.get_expert_mapping's call, with the architecture's checkpoint names (gate, down, up)
    mapping = RoutedExperts.build_expert_params_mapping(*names, num_experts, routed_experts_prefix="")
    loaded = set()
    expert_tensors = [key for key in tensors if key.startswith(f"{prefix}.")]
    assert expert_tensors, prefix
    for key in expert_tensors:
        matches = [(param, weight, shard) for param, weight, _, shard in mapping if weight in key]
        assert len(matches) == 1, (key, matches)
        param_prefix, weight_name, shard = matches[0]
        # as RoutedExperts.load_weights renames a checkpoint tensor to its parameter
        param = key.replace(weight_name, param_prefix).removeprefix(f"{prefix}.")
        assert param in created, (key, param)
        value = created[param]
        per_expert = value.shape[1:]
        if shard in ("w1", "w3"):  # gate and up: the two halves of w13's rows, or one of its two per-shard scales
            per_expert = torch.Size([per_expert[0] // 2, *per_expert[1:]]) if value.dim() == 3 else torch.Size([])
        # vLLM's weight loader takes a one-element tensor for a per-expert scalar (the global scales)
        assert tensors[key].shape == per_expert or tensors[key].numel() == per_expert.numel() == 1, (
            key, tensors[key].shape, per_expert)
        assert tensors[key].dtype == value.dtype, (key, tensors[key].dtype, value.dtype)
        loaded.add(param)
    assert loaded == set(created), prefix


@pytest.mark.parametrize("name", list(EXPORTS))
def test_modelopt_config_quantizes_what_is_exported_and_excludes_the_head_routers_and_kept_experts(exports, name):
    path = exports[name] / "modelopt"
    model_class = _vllm_model_class(path)
    config = _with_model_mappings(
        ModelOptNvFp4Config.from_config(json.loads((path / "hf_quant_config.json").read_text())), model_class
    )
    assert config.is_checkpoint_nvfp4_serialized
    tensors = load_file(path / "model.safetensors")
    hf_model = _hf_model(path)
    for prefix, modules in _vllm_linears(hf_model, config.packed_modules_mapping).items():
        quantized = all(f"{module}.weight_scale" in tensors for module in modules)
        assert config.is_layer_excluded(prefix) is not quantized, prefix
    assert config.is_layer_excluded("lm_head")
    for router in router_modules(hf_model):
        (on_disk,) = checkpoint_module_names(hf_model, router)
        assert config.is_layer_excluded(on_disk), on_disk
    for experts in fused_expert_modules(hf_model):
        per_expert = checkpoint_module_names(hf_model, experts)
        prefix = per_expert[0].rsplit(".", 2)[0]  # vLLM's RoutedExperts prefix
        quantized = all(f"{module}.weight_scale" in tensors for module in per_expert)
        assert config.is_layer_excluded(prefix) is not quantized, prefix
