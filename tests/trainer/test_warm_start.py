"""Block-wise warm start: each layer moves towards its teacher's output, only layer parameters change,
QADTrainer runs it before the first step when asked, and bad settings are refused in one line."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad.evaluation import compare_to_teacher
from hf_qad.nvfp4.conversion import nvfp4_experts
from hf_qad.trainer import QADConfig, QADTrainer
from hf_qad.trainer.warm_start import block_warm_start, decoder_layers
from tests.tiny_models import TEXTS, save_tiny_model, tiny_tokenizer, token_batches

TRAIN = [{"input_ids": ids} for ids in token_batches(n=4, batch=2, seq=32, seed=1)]
HELD_OUT = token_batches(n=2, batch=2, seq=32, seed=7)


def _models(path, **options):
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                   quantization_config=hf_qad.NVFP4Config(**options))
    hf_qad.calibrate(student, TRAIN)
    return student, teacher


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("warm_llama"), "llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("warm_moe"), "qwen3_moe")


def _assert_warm_start_helps(student, teacher, kl_batches=HELD_OUT):
    ptq_kl = compare_to_teacher(student, teacher, kl_batches).kl
    errors = block_warm_start(student, teacher, TRAIN, steps=24, lr=1e-4)
    assert [e.index for e in errors] == list(range(len(decoder_layers(student))))
    for e in errors:
        assert e.after < 0.8 * e.before, e
    warm_kl = compare_to_teacher(student, teacher, kl_batches).kl
    assert warm_kl < 0.9 * ptq_kl, (warm_kl, ptq_kl)


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory):
    # sliding-window layers next to global ones: each layer gets its own attention mask from the model's forward
    return save_tiny_model(tmp_path_factory.mktemp("warm_gemma3"), "gemma3")


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_each_layer_and_the_model_end_closer_to_the_teacher(request, architecture):
    _assert_warm_start_helps(*_models(request.getfixturevalue(f"{architecture}_path")))


def test_a_moe_student_warm_starts_its_nvfp4_experts(moe_path):
    student, teacher = _models(moe_path)
    experts = nvfp4_experts(student)
    assert experts
    before = {name: m.gate_up_proj.detach().clone() for name, m in experts.items()}
    # KL on the warm start's own rows: on random tokens a random tiny MoE has nothing to generalize from
    # (held-out KL moves either way), while the Llama above improves on held-out rows too.
    _assert_warm_start_helps(student, teacher, [batch["input_ids"] for batch in TRAIN])
    assert all(not torch.equal(m.gate_up_proj, before[name]) for name, m in experts.items())


def test_only_decoder_layer_parameters_change(llama_path):
    student, teacher = _models(llama_path, learn_scales=True)
    layer_ids = {id(p) for p in decoder_layers(student).parameters()}
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    teacher_before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    scales = {name: b.clone() for name, b in student.named_buffers() if name.endswith("input_global_scale")}
    block_warm_start(student, teacher, TRAIN, steps=4, lr=1e-3)
    for name, p in student.named_parameters():
        changed = not torch.equal(p, before[name])
        # Nothing outside the decoder layers moves; inside, every weight and weight clip does (an input clip
        # only gets gradients from blocks saturating at the calibrated scale, so it may stay).
        assert changed == (id(p) in layer_ids) or name.endswith("input_clip"), name
        assert p.grad is None, name
    assert all(torch.equal(p, teacher_before[name]) for name, p in teacher.named_parameters())
    assert all(torch.equal(b, scales[name]) for name, b in student.named_buffers() if name in scales)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(steps=0), "steps must be at least 1"),
        (dict(lr=0.0), "lr and scale_lr must be positive"),
        (dict(batches=[]), "no batches"),
        (dict(batches=[torch.zeros(2, 4, dtype=torch.long)]), "dicts of model inputs with input_ids"),
        (dict(teacher="student"), "separate high-precision model"),
        (dict(uncalibrated=True), "not calibrated; call hf_qad.calibrate"),
        (dict(shallow_teacher=True), "the student has 3 decoder layers, the teacher 2"),
    ],
)
def test_bad_settings_are_refused(llama_path, tmp_path, change, match):
    student, teacher = _models(llama_path)
    if change.pop("teacher", None):
        teacher = student
    if change.pop("uncalibrated", False):
        student = AutoModelForCausalLM.from_pretrained(llama_path, quantization_config=hf_qad.NVFP4Config())
    if change.pop("shallow_teacher", False):
        teacher = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "t", "llama"))
    kwargs = dict(batches=TRAIN, steps=2, lr=1e-3) | change
    with pytest.raises(ValueError, match=match):
        block_warm_start(student, teacher, kwargs.pop("batches"), **kwargs)


# ---------------------------------------------------------------------------------------------- QADTrainer
_ARGS = dict(use_cpu=True, report_to=[], save_strategy="no", seed=0, per_device_train_batch_size=4,
             per_device_eval_batch_size=4, dataloader_drop_last=True, max_steps=1, learning_rate=0.0,
             warm_start_learning_rate=1e-3, warm_start_batches=2)


def _trained(path, tmp_path, **options):
    data = Dataset.from_dict({"text": TEXTS})
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=hf_qad.NVFP4Config())
    start = {name: p.detach().clone() for name, p in student.named_parameters()}
    trainer = QADTrainer(student, teacher=teacher, args=QADConfig(str(tmp_path / "out"), **_ARGS, **options),
                         train_dataset=data, eval_dataset=data, processing_class=tiny_tokenizer())
    trainer.train()  # learning rate 0: only the warm start can move a weight
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, start[name])}
    start_kl = next(e["eval_kl"] for e in trainer.state.log_history if e.get("step") == 0 and "eval_kl" in e)
    return moved, start_kl, {id(p): n for n, p in trainer.model.named_parameters()}, trainer


def test_qad_trainer_warm_starts_before_the_first_step_and_the_guard_measures_the_warmed_start(llama_path, tmp_path):
    moved, ptq_kl, _, _ = _trained(llama_path, tmp_path, warm_start_steps=0)
    assert moved == set()  # 0: off
    moved, warm_kl, names, trainer = _trained(llama_path, tmp_path, warm_start_steps=8)
    assert moved == {names[id(p)] for p in decoder_layers(trainer.model).parameters()}
    assert warm_kl < ptq_kl  # the KL guard's step-0 evaluation saw the warmed student


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(warm_start_steps=-1), "warm_start_steps must be >= 0"),
        (dict(warm_start_learning_rate=0.0), "warm_start_learning_rate must be positive"),
        (dict(warm_start_batches=0), "warm_start_batches must be at least 1"),
        (dict(warm_start_steps=4, teacher_cache_path="cache"), "teacher_cache_path loads no teacher"),
    ],
)
def test_bad_warm_start_options_are_refused(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        QADConfig(str(tmp_path), use_cpu=True, bf16=False, **options)


def test_lora_with_its_shared_teacher_is_refused(llama_path, tmp_path):
    from peft import LoraConfig

    args = QADConfig(str(tmp_path), use_cpu=True, report_to=[], warm_start_steps=4)
    with pytest.raises(ValueError, match="warm_start_steps needs a separate teacher.*pass teacher="):
        QADTrainer(str(llama_path), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                   processing_class=tiny_tokenizer(), peft_config=LoraConfig(r=4, target_modules="all-linear"))


def test_a_model_without_transformers_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="found no list of .* decoder layers .* set warm_start_steps=0"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(16, 16)))
