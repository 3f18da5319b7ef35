"""QADConfig(nvfp4_weight_rounding="gptq"): the student starts from the GPTQ rounding of its calibration batches."""

from itertools import islice

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

import hf_qad
from hf_qad import NVFP4Config
from hf_qad.nvfp4.conversion import nvfp4_modules
from hf_qad.trainer import QADConfig, QADTrainer
from tests.tiny_models import TEXTS, tiny_tokenizer

COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", seed=0, logging_steps=1, dataloader_drop_last=True,
              per_device_train_batch_size=4, learning_rate=1e-3, max_steps=1, calibration_batches=2,
              nvfp4_weight_rounding="gptq", bf16=False)  # no autocast: the hand-made rounding runs in float32


class _StartRecorder(TrainerCallback):
    """The student's fake-quantized weights at the first step, after the trainer's own preparation."""

    def __init__(self):
        self.weights = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.weights = {name: layer.fake_quantized_weight().detach().clone()
                            for name, layer in nvfp4_modules(model).items()}


def _student(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**config), dtype=torch.float32)


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_training_starts_from_the_gptq_rounding_of_the_calibration_batches(tiny_path, tmp_path, scheme):
    recorder = _StartRecorder()
    trainer = QADTrainer(_student(tiny_path, scheme=scheme), args=QADConfig(str(tmp_path / "run"), **COMMON),
                         train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tiny_tokenizer(),
                         callbacks=[recorder])
    trainer.train()
    # The same batches, rounded by hand: calibrate, then gptq, on a fresh copy of the student.
    batches = [{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
               for batch in islice(trainer.get_train_dataloader(), 2)]
    expected = _student(tiny_path, scheme=scheme)
    if scheme == "w4a4":
        hf_qad.calibrate(expected, batches, num_batches=None)
    nearest = {name: layer.fake_quantized_weight().detach() for name, layer in nvfp4_modules(expected).items()}
    hf_qad.gptq(expected, batches, num_batches=None)
    for name, layer in nvfp4_modules(expected).items():
        assert torch.equal(recorder.weights[name], layer.fake_quantized_weight()), name
    assert any(not torch.equal(recorder.weights[name], nearest[name]) for name in nearest)


def test_gptq_rounding_needs_calibration_batches(tmp_path):
    with pytest.raises(ValueError, match="calibration_batches > 0"):
        QADConfig(str(tmp_path), use_cpu=True, nvfp4_weight_rounding="gptq", calibration_batches=0)
    with pytest.raises(ValueError, match="unknown nvfp4_weight_rounding"):
        QADConfig(str(tmp_path), use_cpu=True, nvfp4_weight_rounding="awq")
