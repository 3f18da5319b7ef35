"""Learned NVFP4 scales in training: their own optimizer group, checkpoints that keep them, an exact export."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config
from hf_qad.nvfp4.conversion import nvfp4_modules
from hf_qad.trainer import QADConfig, QADTrainer
from tests.tiny_models import TEXTS, tiny_tokenizer

COMMON = dict(use_cpu=True, report_to=[], seed=0, logging_steps=1, dataloader_drop_last=True,
              per_device_train_batch_size=4, learning_rate=1e-3, nvfp4_learn_scales=True, scale_learning_rate=0.05,
              weight_decay=0.1, disable_tqdm=True, bf16=False)  # no autocast around the trained model's forward
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 64, 12, 3, 88, 21]])


def _student(path, learn_scales=True):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(learn_scales=learn_scales),
                                                dtype=torch.float32)


def _clips(model):
    return {f"{name}.{key}": p.detach().clone() for name, layer in nvfp4_modules(model).items()
            for key, p in layer.clip_parameters.items()}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _trainer(model, tmp_path, name, **overrides):
    args = QADConfig(str(tmp_path / name), **{**COMMON, "max_steps": 3, "save_strategy": "no", **overrides})
    return QADTrainer(model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                      processing_class=tiny_tokenizer())


def test_loading_starts_every_clip_at_one_where_the_model_is_the_amax_one(tiny_path):
    learned, plain = _student(tiny_path), _student(tiny_path, learn_scales=False)
    clips = _clips(learned)
    assert clips and all(torch.equal(c, torch.ones_like(c)) for c in clips.values())
    assert any(name.endswith("input_clip") for name in clips)
    hf_qad.calibrate(learned, [IDS])
    hf_qad.calibrate(plain, [IDS])
    assert torch.equal(_logits(learned), _logits(plain))


def test_clips_train_in_their_own_group_and_the_export_holds_the_scales_the_forward_used(tiny_path, tmp_path):
    trainer = _trainer(_student(tiny_path), tmp_path, "run")
    trainer.train()
    groups = trainer.optimizer.param_groups
    clip_groups = [g for g in groups if g.get("hf_qad_clips")]
    assert len(clip_groups) == 1 and clip_groups[0]["weight_decay"] == 0.0
    clip_ids = {id(p) for p in clip_groups[0]["params"]}
    assert clip_ids == {id(p) for layer in nvfp4_modules(trainer.model).values() for p in layer.clip_parameters.values()}
    assert not any(id(p) in clip_ids for g in groups if not g.get("hf_qad_clips") for p in g["params"])
    assert clip_groups[0]["initial_lr"] == 0.05 and groups[0]["initial_lr"] == 1e-3
    moved = {name for name, c in _clips(trainer.model).items() if not torch.equal(c, torch.ones_like(c))}
    # Every weight clip moves; an input clip only learns from activation blocks that saturate.
    assert {name for name in _clips(trainer.model) if name.endswith("weight_clip")} <= moved
    assert any(name.endswith("input_clip") for name in moved)

    trainer.save_model(str(tmp_path / "final"))
    exported = hf_qad.load_packed_model(tmp_path / "final", dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for name, layer in nvfp4_modules(trainer.model).items():
        stored = exported.get_submodule(name)
        x = torch.randn(3, layer.in_features, generator=generator)
        assert torch.equal(stored(x), layer(x)), name
        assert torch.equal(stored.input_global_scale, layer.exported_input_global_scale()), name
    assert torch.equal(_logits(exported), _logits(trainer.model.eval()))


def test_master_weight_checkpoints_keep_the_clips_and_resume_exactly(tiny_path, tmp_path):
    straight = _trainer(_student(tiny_path), tmp_path, "straight", save_strategy="steps", save_steps=1)
    straight.train()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "checkpoint-3", dtype=torch.float32)
    expected = _clips(straight.model)
    assert _clips(reloaded).keys() == expected.keys()
    for name, clip in _clips(reloaded).items():
        assert torch.equal(clip, expected[name]), name
    assert torch.equal(_logits(reloaded), _logits(straight.model.eval()))

    resumed = _trainer(_student(tiny_path), tmp_path, "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-1"))
    for name, clip in _clips(resumed.model).items():
        assert torch.equal(clip, expected[name]), name


@pytest.mark.parametrize("options, match", [
    ({"nvfp4_learn_scales": True, "nvfp4_scale_method": "mse"}, "learn_scales starts from the amax scales"),
    ({"scale_learning_rate": 0.0}, "scale_learning_rate must be positive"),
])
def test_bad_learned_scale_options_are_refused(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        QADConfig(str(tmp_path), use_cpu=True, **options)
