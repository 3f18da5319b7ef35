"""QADTrainer on a mixture-of-experts student (tiny Qwen3-MoE, NVFP4 experts unless kept): routers,
load-balancing loss, router agreement, LoRA."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from peft.tuners.lora.layer import ParamWrapper
from transformers import AutoModelForCausalLM

from hf_qad import NVFP4Config, load_packed_model, teacher_mode
from hf_qad.nvfp4.conversion import nvfp4_experts
from hf_qad.nvfp4.experts import router_modules
from hf_qad.nvfp4.linear import NVFP4Linear
from hf_qad.nvfp4.moe import NVFP4Experts
from hf_qad.quantizer.peft import NVFP4LoraLinear
from hf_qad.trainer import QADConfig, QADTrainer
from tests.tiny_models import KEEP_EXPERTS, TEXTS, tiny_tokenizer

COMMON = dict(use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0, logging_steps=1,
              dataloader_drop_last=True, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3)
EXPERTS = {"nvfp4_experts": None, "kept_experts": KEEP_EXPERTS}  # modules_to_not_convert


@pytest.fixture
def moe_path(tiny_moe_path):
    return tiny_moe_path


def _student(path, experts="nvfp4_experts", **load):
    config = NVFP4Config(modules_to_not_convert=EXPERTS[experts])
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32, **load)


def _trainer(model, tmp_path, teacher=None, peft_config=None, **overrides):
    args = QADConfig(str(tmp_path / "out"), **{**COMMON, **overrides})
    return QADTrainer(model, teacher=teacher, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                      processing_class=tiny_tokenizer(), peft_config=peft_config)


def _batch(trainer):
    trainer.model.train()  # compute_loss logs under "train"
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_routers_stay_high_precision_and_train(moe_path, tmp_path):
    student = _student(moe_path)
    assert nvfp4_experts(student)
    routers = router_modules(student)
    assert routers and not any(isinstance(student.get_submodule(name), (NVFP4Linear, NVFP4Experts)) for name in routers)
    before = {name: student.get_submodule(name).weight.detach().clone() for name in routers}
    trainer = _trainer(student, tmp_path)
    trainer.train()
    for name in routers:
        weight = student.get_submodule(name).weight
        assert weight.requires_grad and weight.dtype == torch.float32
        assert not torch.equal(weight.detach(), before[name]), name


def test_router_agreement_is_one_for_the_teacher_itself_and_drops_when_routers_move(moe_path, tmp_path):
    same = AutoModelForCausalLM.from_pretrained(moe_path, dtype=torch.float32)  # the teacher's own weights
    trainer = _trainer(same, tmp_path)
    batch = _batch(trainer)
    with torch.no_grad():
        trainer.compute_loss(same, dict(batch))
    assert trainer._metrics["train"]["router_agreement"] == [1.0]
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(0.0, abs=1e-6)
    assert "aux_loss" not in trainer._metrics["train"]  # off by default
    torch.manual_seed(0)
    with torch.no_grad():
        for name in router_modules(same):
            weight = same.get_submodule(name).weight
            weight.add_(torch.randn_like(weight) * weight.std())
        trainer.compute_loss(same, dict(batch))
    assert 0.0 <= trainer._metrics["train"]["router_agreement"][-1] < 1.0


def test_router_agreement_counts_the_trained_tokens_only(moe_path, tmp_path):
    same = AutoModelForCausalLM.from_pretrained(moe_path, dtype=torch.float32)
    trainer = _trainer(same, tmp_path)
    batch = _batch(trainer)
    counted = []
    original = trainer._log_routing_metrics
    trainer._log_routing_metrics = lambda mode, agreement, aux: (counted.append(agreement[1]),
                                                                 original(mode, agreement, aux))
    with torch.no_grad():
        trainer.compute_loss(same, dict(batch))
    layers = same.config.num_hidden_layers
    assert counted == [layers * int((batch["labels"][:, 1:] != -100).sum())]


def test_the_load_balancing_loss_is_added_as_the_model_adds_it_when_asked(moe_path, tmp_path):
    # Off by default: SFTTrainer's None would turn it on for a MoE model; QAD's None follows output_router_logits.
    default = _trainer(_student(moe_path), tmp_path)
    assert not default.aux_loss_enabled and default.args.router_aux_loss_coef == 0.0
    asked = _student(moe_path, output_router_logits=True)
    coef = asked.config.router_aux_loss_coef
    on = _trainer(asked, tmp_path)
    assert on.aux_loss_enabled and on.router_aux_loss_coef == coef
    explicit = _trainer(_student(moe_path), tmp_path, router_aux_loss_coef=0.5)
    assert explicit.aux_loss_enabled and explicit.router_aux_loss_coef == 0.5

    batch = _batch(on)
    explicit.model.train()
    with torch.no_grad():
        with_aux = explicit.compute_loss(explicit.model, dict(batch))
        without = default.compute_loss(explicit.model, dict(batch))
        own = explicit.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_router_logits=True).aux_loss
    assert own > 0
    torch.testing.assert_close(with_aux - without, 0.5 * own)
    assert explicit._metrics["train"]["aux_loss"] == [pytest.approx(own.item())]

    # Under gradient accumulation (num_items_in_batch given), the aux term is averaged over the micro-batches.
    on.current_gradient_accumulation_steps = 2
    tokens = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        accumulated = on.compute_loss(on.model, dict(batch), num_items_in_batch=tokens)
        plain = default.compute_loss(on.model, dict(batch), num_items_in_batch=tokens)
    torch.testing.assert_close(accumulated - plain, coef * own / 2)


def test_a_student_given_as_a_path_reads_output_router_logits_from_model_init_kwargs(moe_path, tmp_path):
    trainer = _trainer(str(moe_path), tmp_path, model_init_kwargs={"output_router_logits": True, "dtype": torch.float32})
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == trainer.model.config.router_aux_loss_coef


@pytest.mark.parametrize("experts", list(EXPERTS))
def test_qad_steps_reduce_the_kl_of_a_moe_student(moe_path, tmp_path, experts):
    """W4A4 moves the routers' inputs: some tokens go to other experts than the teacher's, and QAD steps on one
    batch bring the student closer."""
    trainer = _trainer(_student(moe_path, experts), tmp_path, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-4,
                       lr_scheduler_type="constant")
    trainer.train()  # calibrates, then 6 steps on the same 8 texts
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 6
    assert all(0.0 < entry["router_agreement"] < 1.0 for entry in logs)
    assert logs[-1]["kl"] < 0.8 * logs[0]["kl"], [entry["kl"] for entry in logs]



def _check_teacher_and_merged_export(model, bf16_path, tmp_path):
    """The LoRA model's base (adapters and quantization off) is the BF16 model bit for bit; the merged,
    trained model differs from it and reloads from its packed export with identical logits."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    bf16 = AutoModelForCausalLM.from_pretrained(bf16_path, dtype=torch.float32)
    with torch.no_grad(), teacher_mode(model):
        assert torch.equal(model(input_ids=ids).logits, bf16(input_ids=ids).logits)
    merged = model.merge_and_unload()
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        assert not torch.equal(expected, bf16(input_ids=ids).logits)
    merged.save_pretrained(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(load_packed_model(tmp_path / "export")(input_ids=ids).logits, expected)


@pytest.mark.parametrize("experts", list(EXPERTS))
def test_lora_qad_adapts_attention_experts_and_routers_and_merges_into_the_export(moe_path, tmp_path, experts):
    """peft's ``all-linear`` on a transformers-5 MoE adds the fused experts and the router through
    ``target_parameters`` (its v4-compatible mapping); the base is the teacher, and the merge exports exactly."""
    student = _student(moe_path, experts)
    trainer = _trainer(student, tmp_path, peft_config=LoraConfig(r=4, target_modules="all-linear"), learning_rate=1e-2)
    model = trainer.model
    assert trainer.shared_teacher
    adapted = {(name.replace("base_model.model.", "").replace(".base_layer", ""), getattr(m, "parameter_name", None))
               for name, m in model.named_modules() if isinstance(m, ParamWrapper)}
    assert adapted == {(f"model.layers.{i}.mlp.{module}", param) for i in range(2)
                       for module, param in (("experts", "gate_up_proj"), ("experts", "down_proj"), ("gate", "weight"))}
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, NVFP4LoraLinear)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and all(".lora_" in name for name in changed)
    assert any(".experts." in name for name in changed) and any(".gate." in name for name in changed)
    assert all("router_agreement" in entry for entry in trainer.state.log_history if "kl" in entry)
    _check_teacher_and_merged_export(model, moe_path, tmp_path)


def test_qad_trains_a_gpt_oss_student_experts_biases_and_router(tmp_path):
    """gpt-oss: transposed NVFP4 experts with high-precision biases, a router with a bias; all train under QAD."""
    from tests.tiny_models import save_tiny_model

    student = _student(save_tiny_model(tmp_path / "gpt_oss", "gpt_oss"))
    mlp = student.model.layers[0].mlp
    assert isinstance(mlp.experts, NVFP4Experts) and mlp.experts.is_transposed
    trained = {"router.weight": mlp.router.weight, "router.bias": mlp.router.bias,
               "experts.gate_up_proj": mlp.experts.gate_up_proj, "experts.down_proj_bias": mlp.experts.down_proj_bias}
    before = {name: param.detach().clone() for name, param in trained.items()}
    trainer = _trainer(student, tmp_path)
    trainer.train()  # calibrates the experts' input scales, then QAD steps
    assert mlp.experts.input_calibrated
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 2 and all(0.0 < entry["router_agreement"] <= 1.0 for entry in logs)
    for name, param in trained.items():
        assert param.dtype == torch.float32 and not torch.equal(param.detach(), before[name]), name


def test_lora_qad_adapts_gpt_oss_experts_named_by_target_parameters(tmp_path):
    """peft maps ``all-linear`` on gpt-oss to its attention only; its transposed experts take adapters when
    named, train through the STE (``quant(W + B A)``), and the merged weights export exactly."""
    from tests.tiny_models import save_tiny_model

    path = save_tiny_model(tmp_path / "gpt_oss", "gpt_oss")
    lora = LoraConfig(r=4, target_modules="all-linear",
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    trainer = _trainer(_student(path), tmp_path, peft_config=lora, learning_rate=1e-2)
    model = trainer.model
    wrapped = {getattr(m, "parameter_name", None) for m in model.modules() if isinstance(m, ParamWrapper)}
    assert wrapped == {"gate_up_proj", "down_proj"}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and all(".lora_" in name for name in changed)
    assert any(".experts." in name for name in changed)
    _check_teacher_and_merged_export(model, path, tmp_path)
