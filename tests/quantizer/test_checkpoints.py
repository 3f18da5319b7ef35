"""transformers.Trainer with MasterWeightCheckpointCallback: resumable checkpoints, packed final save."""

import json

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_qad
from hf_qad import NVFP4Config
from tests.tiny_models import save_tiny_llama, token_batches

MAX_STEPS = 3
RESUME_STEP = 1
LAYER = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def dataset():
    ids = torch.cat(token_batches(MAX_STEPS, batch=2, seq=16)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _load(path, scheme="w4a4"):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(scheme=scheme), dtype=torch.bfloat16)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _trainer(model, dataset, output_dir):
    args = TrainingArguments(
        output_dir,
        max_steps=MAX_STEPS,
        save_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,  # large enough that every step moves the master weights
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=[hf_qad.MasterWeightCheckpointCallback()])


def _losses(trainer):
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def _quant_method(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]


def _tensor_names(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("scheme", ["w4a16", "w4a4"])
def test_checkpoints_hold_master_weights_and_resume_exactly(bf16_path, dataset, tmp_path, scheme):
    model = _load(bf16_path, scheme)
    if scheme == "w4a4":
        hf_qad.calibrate(model, [torch.tensor(dataset["input_ids"][:2])])
    straight = _trainer(model, dataset, tmp_path / "straight")
    straight.train()

    # Periodic checkpoints: master weights (and calibrated input scales), resumable.
    for step in range(1, MAX_STEPS + 1):
        checkpoint = tmp_path / "straight" / f"checkpoint-{step}"
        assert _quant_method(checkpoint) == "hf_qad_nvfp4"
        names = _tensor_names(checkpoint)
        assert f"{LAYER}.weight" in names and f"{LAYER}.weight_packed" not in names
        assert (f"{LAYER}.input_global_scale" in names) == (scheme == "w4a4")
    # The save after training: the packed export.
    straight.save_model(tmp_path / "final")
    assert _quant_method(tmp_path / "final") == "compressed-tensors"
    names = _tensor_names(tmp_path / "final")
    assert f"{LAYER}.weight_packed" in names and f"{LAYER}.weight" not in names

    # An interrupted run: a freshly loaded (and, for W4A4, uncalibrated) model resumes
    # from the first checkpoint and must retrace the straight run bit for bit.
    fresh = _load(bf16_path, scheme)
    resumed = _trainer(fresh, dataset, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{RESUME_STEP}"))
    expected, got = _losses(straight), _losses(resumed)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))
    for step in range(RESUME_STEP + 1, MAX_STEPS + 1):
        assert got[step] == expected[step], step
    final, resumed_final = model.state_dict(), fresh.state_dict()
    assert final.keys() == resumed_final.keys()
    for name, tensor in final.items():
        assert torch.equal(resumed_final[name], tensor), name
    assert not torch.equal(final[f"{LAYER}.weight"], _load(bf16_path, scheme).state_dict()[f"{LAYER}.weight"])


def test_master_weight_checkpoint_resumes_exactly(bf16_path, tmp_path):
    model = _load(bf16_path)
    ids = token_batches(1)[0]
    hf_qad.calibrate(model, [ids])
    with hf_qad.master_weight_checkpoint(model):
        model.save_pretrained(tmp_path)
    quant_config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant_config["quant_method"] == "hf_qad_nvfp4" and quant_config["weights_format"] == "master"
    assert not model.hf_quantizer.saving_master_weights  # switched back
    assert json.loads(model.config.to_json_string())["quantization_config"]["quant_method"] == "compressed-tensors"
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = resumed.model.layers[0].mlp.up_proj
    assert not layer.is_packed and layer.input_calibrated
    assert torch.equal(layer.weight, model.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(_logits(resumed, ids), _logits(model, ids))


def test_unpacked_packed_model_continues_training_with_same_codes(bf16_path, tmp_path):
    model = _load(bf16_path, scheme="w4a16")
    model.save_pretrained(tmp_path)
    packed = hf_qad.load_packed_model(tmp_path)
    ids = token_batches(1)[0]
    expected = _logits(packed, ids)
    hf_qad.unpack_model(packed)
    assert packed.hf_quantizer.is_qat_trainable
    assert packed.model.layers[0].mlp.up_proj.weight.requires_grad
    assert torch.equal(_logits(packed, ids), expected)
