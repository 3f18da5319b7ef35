"""The held-out KL guard: the PTQ start is measured, a diverging run warns with its step and learning rate."""

import logging

import pytest
from datasets import Dataset
from transformers import TrainerCallback

from hf_qad.nvfp4.conversion import nvfp4_modules
from hf_qad.trainer import QADConfig, QADTrainer
from tests.tiny_models import TEXTS, tiny_tokenizer

COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", seed=0, logging_steps=1, dataloader_drop_last=True,
              per_device_train_batch_size=4, per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=1)


class _CalibratedAtEachEvaluation(TrainerCallback):
    def __init__(self):
        self.calibrated = []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.calibrated.append(all(layer.input_calibrated for layer in nvfp4_modules(model).values()))


def _train(tiny_path, tmp_path, caplog, **overrides):
    args = QADConfig(str(tmp_path / "out"), **{**COMMON, "max_steps": 2, "learning_rate": 1e-4, **overrides})
    data = Dataset.from_dict({"text": TEXTS})
    probe = _CalibratedAtEachEvaluation()
    trainer = QADTrainer(str(tiny_path), args=args, train_dataset=data, eval_dataset=data,
                         processing_class=tiny_tokenizer(), callbacks=[probe])
    trainer.probe = probe
    with caplog.at_level(logging.WARNING, logger="hf_qad"):
        trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_kl" in entry]
    warnings = [r.getMessage() for r in caplog.records if "held-out KL" in r.getMessage()]
    return trainer, evals, warnings


@pytest.mark.parametrize("eval_on_start", [False, True])
def test_the_calibrated_ptq_student_is_measured_once_before_the_first_step(tiny_path, tmp_path, caplog,
                                                                          eval_on_start):
    trainer, evals, _ = _train(tiny_path, tmp_path, caplog, eval_on_start=eval_on_start)
    assert [entry["step"] for entry in evals] == [0, 1, 2]
    assert trainer.probe.calibrated == [True, True, True]  # the start is the calibrated PTQ student
    start = evals[0]["eval_kl"]
    assert trainer.kl_guard.start_kl == start > 0 and "eval_kl_ratio" not in evals[0]
    for entry in evals[1:]:
        assert entry["eval_kl_ratio"] == pytest.approx(entry["eval_kl"] / start)


def test_a_diverging_learning_rate_warns_with_the_step_and_the_learning_rate(tiny_path, tmp_path, caplog):
    _, evals, warnings = _train(tiny_path, tmp_path, caplog, learning_rate=0.3, lr_scheduler_type="constant")
    assert evals[1]["eval_kl_ratio"] > 1
    assert warnings and warnings[0].startswith("hf_qad: at step 1 (learning rate 0.3, learning_rate=0.3)")
    assert "Lower learning_rate (e.g. to 0.03)" in warnings[0]


def test_a_run_that_improves_does_not_warn(tiny_path, tmp_path, caplog):
    _, evals, warnings = _train(tiny_path, tmp_path, caplog)
    assert all(entry["eval_kl_ratio"] < 1 for entry in evals[1:])
    assert warnings == []


def test_off_without_an_eval_dataset_or_when_disabled(tiny_path, tmp_path):
    data = Dataset.from_dict({"text": TEXTS})
    plain = {**COMMON, "eval_strategy": "no"}
    without = QADTrainer(str(tiny_path), args=QADConfig(str(tmp_path / "a"), **plain), train_dataset=data,
                         processing_class=tiny_tokenizer())
    disabled = QADTrainer(str(tiny_path), args=QADConfig(str(tmp_path / "b"), **plain, kl_guard=False),
                          train_dataset=data, eval_dataset=data, processing_class=tiny_tokenizer())
    assert without.kl_guard is None and disabled.kl_guard is None


def test_a_resumed_run_compares_with_the_ptq_start_not_with_its_checkpoint(tiny_path, tmp_path, caplog):
    first, evals, _ = _train(tiny_path, tmp_path, caplog, save_strategy="steps", save_steps=1)
    args = QADConfig(str(tmp_path / "resumed"), **{**COMMON, "max_steps": 2, "learning_rate": 1e-4})
    data = Dataset.from_dict({"text": TEXTS})
    resumed = QADTrainer(str(tiny_path), args=args, train_dataset=data, eval_dataset=data,
                         processing_class=tiny_tokenizer())
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert resumed.kl_guard.start_kl == evals[0]["eval_kl"]
    assert [e["step"] for e in resumed.state.log_history if "eval_kl" in e] == [0, 1, 2]  # no new step-0 entry
