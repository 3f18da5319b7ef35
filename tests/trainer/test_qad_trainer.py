"""QADTrainer: the two-line swap, token selection and normalization, teacher handling, errors."""

import json
import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_qad import NVFP4Config
from hf_qad.nvfp4.conversion import nvfp4_modules
from hf_qad.trainer import QADConfig, QADTrainer
from tests.tiny_models import TEXTS, save_tiny_llama_with_tokenizer, tiny_tokenizer

COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", seed=0, logging_steps=1, dataloader_drop_last=True)


def _config(tmp_path, **overrides):
    return QADConfig(str(tmp_path / "out"), **{**COMMON, "max_steps": 2, "per_device_train_batch_size": 4,
                                               "learning_rate": 1e-3, **overrides})


def _student(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**config), dtype=torch.float32)


def test_two_line_swap_trains_logs_and_exports_packed(tiny_path, tmp_path):
    trainer = QADTrainer(str(tiny_path), args=_config(tmp_path, max_steps=3), train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer())
    assert nvfp4_modules(trainer.model)
    teacher = trainer.teacher_model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not nvfp4_modules(teacher)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert {"kl", "top1_agreement", "student_ce", "teacher_ce"} <= set(entry)
        assert 0.0 <= entry["top1_agreement"] <= 1.0 and entry["kl"] >= 0.0
    # W4A4 student was calibrated before training
    assert all(layer.input_calibrated for layer in nvfp4_modules(trainer.model).values())
    trainer.save_model(str(tmp_path / "final"))
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    assert not any("teacher" in p.name for p in (tmp_path / "final").iterdir())


def _first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_ce_only_equals_sft_loss_on_prompt_completion_data(tiny_path, tmp_path):
    """kl_weight=0, ce_weight=1 is QAT: the same tokens and normalization as SFT's own loss."""
    data = Dataset.from_dict({"prompt": [t[:10] for t in TEXTS], "completion": [t[10:] for t in TEXTS]})
    model = _student(tiny_path, scheme="w4a16")
    qat = QADTrainer(model, args=_config(tmp_path, kl_weight=0.0, ce_weight=1.0), train_dataset=data,
                     processing_class=tiny_tokenizer())
    sft = SFTTrainer(model, args=SFTConfig(str(tmp_path / "sft"), **COMMON, per_device_train_batch_size=4),
                     train_dataset=data, processing_class=tiny_tokenizer())
    batch = _first_batch(sft)
    assert (batch["labels"] == -100).any()  # prompts are masked out
    n_items = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        ours = qat.compute_loss(model, dict(batch), num_items_in_batch=n_items)
        theirs = sft.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    assert torch.allclose(ours, theirs, rtol=1e-4), (ours, theirs)


@pytest.mark.parametrize("data", ["text", "packed", "messages"])
def test_identical_unquantized_student_has_zero_kl_in_every_data_format(tiny_path, tmp_path, data, caplog):
    """The teacher sees exactly the student's inputs (positions, packing boundaries)."""
    extra = {}
    if data == "messages":
        dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": t[:12]},
                                                   {"role": "assistant", "content": t[12:]}] for t in TEXTS]})
        extra["assistant_only_loss"] = True
    else:
        dataset = Dataset.from_dict({"text": TEXTS})
    if data == "packed":
        extra.update(packing=True, padding_free=True, max_length=64)
    student = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="hf_qad"):
        trainer = QADTrainer(student, teacher=str(tiny_path), args=_config(tmp_path, **extra), train_dataset=dataset,
                             processing_class=tiny_tokenizer())
    assert "plain distillation" in caplog.text
    trainer.teacher_model.to(torch.float32)
    batch = _first_batch(trainer)
    if data == "packed":
        assert "position_ids" in batch and "attention_mask" not in batch
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_accumulation_matches_a_larger_batch(tiny_path, tmp_path):
    data = Dataset.from_dict({"text": TEXTS})
    weights = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = _student(tiny_path, scheme="w4a16")
        args = _config(tmp_path, max_steps=1, per_device_train_batch_size=batch_size,
                       gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant")
        trainer = QADTrainer(model, args=args, train_dataset=data, processing_class=tiny_tokenizer())
        trainer.train()
        weights.append(model.model.layers[0].mlp.up_proj.weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], rtol=1e-4, atol=1e-6)


def test_batch_without_loss_tokens_gives_zero_not_nan(tiny_path, tmp_path):
    model = _student(tiny_path, scheme="w4a16")
    trainer = QADTrainer(model, args=_config(tmp_path), train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer())
    batch = _first_batch(trainer)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.item() == 0.0
    loss.backward()


def test_ce_weight_0_logs_the_student_ce_without_its_gradient(tiny_path, tmp_path):
    model = _student(tiny_path, scheme="w4a16")
    trainer = QADTrainer(model, args=_config(tmp_path), train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer())
    batch = _first_batch(trainer)
    model.train()
    seen = []
    original = QADTrainer._log_distillation_metrics
    trainer._log_distillation_metrics = lambda mode, sums: (seen.append(sums), original(trainer, mode, sums))
    trainer.compute_loss(model, dict(batch)).backward()
    assert seen[0].loss.requires_grad and not seen[0].student_nll.requires_grad
    assert trainer._metrics["train"]["student_ce"][0] > 0.0


def test_metrics_add_up_every_process_even_on_the_last_batch(tiny_path, tmp_path, monkeypatch):
    # gather_for_metrics would cut the per-process rows to the dataset's remainder on a last batch.
    model = _student(tiny_path, scheme="w4a16")
    trainer = QADTrainer(model, args=_config(tmp_path), train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer())
    model.train()
    state = trainer.accelerator.gradient_state
    monkeypatch.setattr(type(state), "end_of_dataloader", property(lambda self: True))
    monkeypatch.setattr(type(state), "remainder", property(lambda self: 1))
    monkeypatch.setattr(trainer.accelerator, "gather", lambda tensor: torch.cat([tensor, tensor]))  # two processes
    with torch.no_grad():
        trainer.compute_loss(model, dict(_first_batch(trainer)))
    one = trainer._metrics["train"]["teacher_ce"][-1]
    monkeypatch.setattr(trainer.accelerator, "gather", lambda tensor: torch.cat([tensor, 3 * tensor]))
    with torch.no_grad():
        trainer.compute_loss(model, dict(_first_batch(trainer)))
    assert trainer._metrics["train"]["teacher_ce"][-1] == pytest.approx(one)  # (1 + 3) / (1 + 3) tokens
    monkeypatch.setattr(trainer.accelerator, "gather", lambda tensor: torch.cat([tensor, tensor * torch.tensor(
        [0.0, 0.0, 0.0, 3.0, 1.0], device=tensor.device)]))  # the second process: same tokens, teacher CE 3x
    with torch.no_grad():
        trainer.compute_loss(model, dict(_first_batch(trainer)))
    assert trainer._metrics["train"]["teacher_ce"][-1] == pytest.approx(2 * one)  # (1 + 3) / 2


def test_nan_loss_stops_with_the_step(tiny_path, tmp_path):
    model = _student(tiny_path, scheme="w4a16")
    trainer = QADTrainer(model, args=_config(tmp_path), train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer())
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 0"):
        trainer.compute_loss(model, dict(_first_batch(trainer)))


def test_infinite_gradient_stops_before_the_update_naming_the_step_and_parameter(tiny_path, tmp_path):
    """The Trainer's grad norm (computed by its clipping) is checked: the update is not applied."""
    trainer = QADTrainer(str(tiny_path), args=_config(tmp_path, max_steps=3, bf16=False),
                         train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tiny_tokenizer())
    weight = trainer.model.model.layers[1].mlp.down_proj.weight
    before_step_2 = {}

    def blow_up_at_step_2(grad):
        if trainer.state.global_step != 1:
            return grad
        before_step_2.update({name: p.detach().clone() for name, p in trainer.model.named_parameters()})
        return grad * float("inf")

    weight.register_hook(blow_up_at_step_2)
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    assert "the gradient norm is inf at step 2: 1 of" in message
    assert "the first: model.layers.1.mlp.down_proj.weight" in message and "The update was not applied" in message
    assert trainer.state.global_step == 1 and before_step_2
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, before_step_2[name]), name


def test_non_finite_weights_are_never_saved(tiny_path, tmp_path):
    """Weights can overflow with finite gradients: checkpoint-2 is refused, checkpoint-1 stays."""
    class PoisonAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    kwargs["model"].model.norm.weight[0] = float("nan")

    args = _config(tmp_path, max_steps=3, bf16=False, save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer = QADTrainer(str(tiny_path), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer(), callbacks=[PoisonAtStep2()])
    with pytest.raises(FloatingPointError, match="not saving checkpoint-2: 1 of .* the first: model.norm.weight"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]


def test_vocabulary_mismatch_is_refused(tiny_path, tmp_path):
    other = save_tiny_llama_with_tokenizer(tmp_path / "other", vocab_size=160)
    with pytest.raises(ValueError, match="vocabularies differ"):
        QADTrainer(_student(tiny_path), teacher=str(other), args=_config(tmp_path),
                   train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tiny_tokenizer())


def test_quantized_teacher_is_refused(tiny_path, tmp_path):
    with pytest.raises(ValueError, match="teacher is NVFP4-quantized"):
        QADTrainer(_student(tiny_path), teacher=_student(tiny_path), args=_config(tmp_path),
                   train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tiny_tokenizer())


@pytest.mark.parametrize("field, value, match", [
    ("divergence", "kl", "unknown divergence"), ("temperature", 0.0, "temperature"),
    ("kl_weight", 0.0, "not both 0"), ("lmbda", 1.5, "probability"), ("nvfp4_scheme", "w8a8", "unknown scheme"),
])
def test_bad_config(tmp_path, field, value, match):
    kwargs = {field: value}
    if field == "kl_weight":
        kwargs["ce_weight"] = 0.0
    with pytest.raises(ValueError, match=match):
        QADConfig(str(tmp_path), use_cpu=True, **kwargs)


def test_learning_rate_default_is_qads_not_sfts(tmp_path):
    # SFT's default (2e-5) is not what the README's learning-rate advice and the KL guard's message assume.
    assert QADConfig(str(tmp_path), use_cpu=True).learning_rate == 1e-5
    assert SFTConfig(str(tmp_path), use_cpu=True).learning_rate != 1e-5
    assert QADConfig(str(tmp_path), use_cpu=True, learning_rate=1e-4).learning_rate == 1e-4


@pytest.mark.parametrize("options, method", [
    ({}, "mse"), ({"nvfp4_learn_scales": True}, "amax"), ({"nvfp4_scale_method": "amax"}, "amax"),
    ({"nvfp4_scale_method": "four_over_six"}, "four_over_six"),
])
def test_scale_method_default_is_the_measured_best(tmp_path, options, method):
    # mse recovered more per token than the paper's amax; learned clips start from amax scales.
    assert QADConfig(str(tmp_path), use_cpu=True, **options).nvfp4_config().scale_method == method
