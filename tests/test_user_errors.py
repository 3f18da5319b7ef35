"""Every input a user can get wrong gives a correct result or a one-line error naming the problem and the fix.

The table of issue 13, one section per area; each row is a test. CLI errors are single lines with exit
status 2 (``hf_qad.cli.common.CommandError``).
"""


# ============================================================================ loading, saving and exporting models
# (NVFP4Config options, tied embeddings, packed checkpoints with missing tensors, the advisory hf_qad entry,
#  hf-qad export's output folder, outlier weights)


# ============================================================================ training
# (non-finite gradients, resuming from a packed export, hf-qad train's flags, empty datasets, DDP without
#  gradient checkpointing)

import glob as _training_glob  # noqa: E402  (each section keeps its imports, so that insertions do not collide)
import math as _training_math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_qad.cli.common import CommandError  # noqa: E402
from hf_qad.cli.main import main as hf_qad_main  # noqa: E402
from hf_qad.trainer import QADConfig, QADTrainer  # noqa: E402
from tests.tiny_models import TEXTS, save_tiny_llama_with_tokenizer, tiny_tokenizer  # noqa: E402

# CPU float32 training flags, for hf-qad train and QADConfig alike.
_TRAIN_FLAGS = dict(use_cpu=True, bf16=False, report_to=[], seed=0, logging_steps=1, per_device_train_batch_size=4,
                    lr_scheduler_type="constant")


@pytest.fixture(scope="module")
def training_tiny(tmp_path_factory):
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("training_tiny"))


def _train_cli_error(*argv: str) -> str:
    """hf-qad train's error: one line, raised as CommandError (no traceback)."""
    flags = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    with pytest.raises(CommandError) as error:
        hf_qad_main(["train", *flags, *argv])
    message = str(error.value)
    assert message.startswith("hf-qad: error: ") and "\n" not in message, message
    return message


def test_train_unknown_flag(training_tiny, tmp_path):
    message = _train_cli_error("--model_name_or_path", str(training_tiny), "--dataset_name", "x.txt",
                               "--output_dir", str(tmp_path), "--nvfp4_skeme", "w4a16")
    assert "unknown flags ['--nvfp4_skeme', 'w4a16']" in message and "--help-all" in message


@pytest.mark.parametrize("kind", ["missing", "not_a_model", "hub_offline"])
def test_train_bad_model_path(kind, tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_text("some text\n")
    model, expected = {"missing": (str(tmp_path / "nope"), "does not exist"),
                       "not_a_model": (str(tmp_path), "is not a model folder (no config.json)"),
                       "hub_offline": ("someone/no-such-model", "HF_HUB_OFFLINE is set")}[kind]
    if kind == "hub_offline":  # no hub retries: offline, a name that is no local folder fails at once
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    message = _train_cli_error("--model_name_or_path", model, "--dataset_name", str(tmp_path / "data.txt"),
                               "--output_dir", str(tmp_path / "out"))
    assert expected in message


@pytest.mark.parametrize("content, expected", [
    ("", "contains no rows"),
    ('{"body": "a story"}\n', "has no 'text', 'messages' or 'prompt' column (columns: body)"),
    ('{"text": ""}\n{"text": "  "}\n', "every 'text' is empty"),
])
def test_train_unusable_dataset(training_tiny, tmp_path, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    message = _train_cli_error("--model_name_or_path", str(training_tiny), "--dataset_name", str(data),
                               "--output_dir", str(tmp_path / "out"))
    assert expected in message


def test_train_help_lists_the_qad_flags_and_help_all_every_flag(capsys):
    hf_qad_main(["train", "--help"])
    short = capsys.readouterr().out
    assert short.index("--model_name_or_path") < short.index("--nvfp4_scheme") < short.index("--help-all")
    for flag in ("--dataset_name", "--divergence", "--kl_weight", "--teacher_model_name_or_path", "--max_steps"):
        assert flag in short
    assert "--adam_beta1" not in short and len(short.splitlines()) < 150
    hf_qad_main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and "--nvfp4_scheme" in full and "--lora_r" in full


def test_diverging_learning_rate_stops_before_the_update_and_keeps_the_last_good_checkpoint(training_tiny, tmp_path):
    """SGD at lr 1e6: step 1 is finite, step 2's gradient norm overflows; nothing non-finite is applied or saved."""
    args = QADConfig(str(tmp_path), **_TRAIN_FLAGS, max_steps=4, optim="sgd", learning_rate=1e6,
                     save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer = QADTrainer(str(training_tiny), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer())
    with pytest.raises(FloatingPointError, match=r"the gradient norm is (inf|nan) at step 2: .*not applied"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert all(_training_math.isfinite(p.detach().abs().max().item()) for p in trainer.model.parameters())
    checkpoints = sorted(_training_glob.glob(str(tmp_path / "checkpoint-*")))
    assert [c.rsplit("-", 1)[1] for c in checkpoints] == ["1"]
    for name, tensor in load_file(f"{checkpoints[0]}/model.safetensors").items():
        assert torch.isfinite(tensor.float()).all(), name


def test_resume_from_a_packed_export_is_refused(training_tiny, tmp_path):
    args = QADConfig(str(tmp_path / "run"), **_TRAIN_FLAGS, max_steps=1, nvfp4_scheme="w4a16", save_strategy="no")
    trainer = QADTrainer(str(training_tiny), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer())
    trainer.train()
    trainer.save_model(str(tmp_path / "packed"))  # the packed NVFP4 export
    with pytest.raises(ValueError, match="holds a packed NVFP4 export, not a training checkpoint.*checkpoint-N"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "packed"))
    message = _train_cli_error("--model_name_or_path", str(training_tiny), "--dataset_name", str(_text_file(tmp_path)),
                               "--output_dir", str(tmp_path / "cli"), "--resume_from_checkpoint",
                               str(tmp_path / "packed"))
    assert "--resume_from_checkpoint" in message and "packed NVFP4 export" in message


def _text_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n\n".join(TEXTS))
    return path



# ============================================================================ command line and data
# (BOS, eval's teacher and tokenizer checks, long paragraphs in text files, CLI argument values)


# ============================================================================ compute dtype on CPUs
# (bf16 only where the CPU computes it natively; hf-qad train without an accelerator)
