"""Every input a user can get wrong gives a correct result or a one-line error naming the problem and the fix.

The table of issue 13, one section per area; each row is a test. CLI errors are single lines with exit
status 2 (``hf_qad.cli.common.CommandError``).
"""

import argparse
import json

import pytest
import torch

from hf_qad.cli import demo as cli_demo
from hf_qad.cli import evaluate as cli_evaluate
from hf_qad.cli import train as cli_train
from hf_qad.cli.main import main
from tests.tiny_models import TEXTS, save_tiny_llama_with_tokenizer


# ============================================================================ loading, saving and exporting models
# (NVFP4Config options, tied embeddings, packed checkpoints with missing tensors, the advisory hf_qad entry,
#  hf-qad export's output folder, outlier weights)


# ============================================================================ training
# (non-finite gradients, resuming from a packed export, hf-qad train's flags, empty datasets, DDP without
#  gradient checkpointing)


# ============================================================================ command line and data
# (BOS, eval's teacher and tokenizer checks, long paragraphs in text files, CLI argument values)


# ============================================================================ compute dtype on CPUs
# (bf16 only where the CPU computes it natively; hf-qad train without an accelerator)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join(TEXTS * 6))
    return path


def test_train_without_an_accelerator_runs_with_the_default_flags(tiny_model, tiny_text, tmp_path, monkeypatch, capsys):
    """TRL's default bf16=True crashed here ("Your setup doesn't support bf16/gpu"): now use_cpu, float32."""
    monkeypatch.setattr(cli_train, "default_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(cli_train, "compute_dtype_choice", lambda device: (torch.float32, "this CPU has no AVX512-BF16"))
    main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(tiny_text), "--output_dir",
          str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "48",
          "--nvfp4_scheme", "w4a16", "--report_to", "none"])
    out = capsys.readouterr().out
    assert "hf-qad train: cpu, float32 (the default here: this CPU has no AVX512-BF16)" in out
    assert (tmp_path / "run" / "model.safetensors").exists()


def _train_precision_line(tiny_model, tmp_path, capsys, *flags) -> str:
    """The line ``hf-qad train`` prints after parsing its flags (the missing dataset then stops it)."""
    with pytest.raises(SystemExit):
        main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(tmp_path / "missing.txt"),
              "--output_dir", str(tmp_path / "run"), *flags])
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("hf-qad train:"))


def test_train_defaults_to_bf16_where_the_cpu_computes_it_natively(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_train, "default_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(cli_train, "compute_dtype_choice", lambda device: (torch.bfloat16, "native here"))
    assert _train_precision_line(tiny_model, tmp_path, capsys) == \
        "hf-qad train: cpu, bf16 mixed precision (the default here: native here)"
    # fp16 given alone still turns bf16 off, as in TRL: the default left bf16 unset there.
    assert _train_precision_line(tiny_model, tmp_path, capsys, "--fp16", "true").startswith(
        "hf-qad train: cpu, fp16 mixed precision (as set; the default here is cpu, bf16 mixed precision")


@pytest.mark.parametrize("where", ["flag", "config"])
def test_train_an_explicit_bf16_wins_over_the_cpu_default(tiny_model, tmp_path, monkeypatch, capsys, where):
    monkeypatch.setattr(cli_train, "default_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(cli_train, "compute_dtype_choice", lambda device: (torch.float32, "no AVX512-BF16"))
    config = tmp_path / "run.yaml"
    config.write_text("bf16: true\n")
    flags = ["--bf16", "true"] if where == "flag" else ["--config", str(config)]
    assert _train_precision_line(tiny_model, tmp_path, capsys, *flags) == \
        "hf-qad train: cpu, bf16 mixed precision (as set; the default here is cpu, float32: no AVX512-BF16)"


def test_train_an_explicit_use_cpu_wins_over_the_accelerator(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_train, "default_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(cli_train, "compute_dtype_choice", lambda device: (torch.float32, "no native bf16 (V100)"))
    assert _train_precision_line(tiny_model, tmp_path, capsys, "--use_cpu", "true") == \
        "hf-qad train: cpu, float32 (as set; the default here is cuda, float32: no native bf16 (V100))"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_default_dtype_is_what_the_cpu_computes_natively(monkeypatch, dtype):
    monkeypatch.setattr(cli_evaluate, "default_compute_dtype", lambda device: dtype)
    parser = argparse.ArgumentParser()
    cli_evaluate.add_arguments(parser)
    args = parser.parse_args(["--student", ".", "--teacher", ".", "--data", "."])
    assert cli_evaluate.DTYPES[args.dtype] == dtype
    assert parser.parse_args(["--student", ".", "--teacher", ".", "--data", ".", "--dtype", "bfloat16"]).dtype == \
        "bfloat16"  # an explicit flag wins


@pytest.mark.parametrize(("dtype", "label"), [(torch.float32, "float32 teacher"), (torch.bfloat16, "BF16 teacher")])
def test_demo_computes_in_the_dtype_the_cpu_runs_natively(tiny_model, tmp_path, monkeypatch, capsys, dtype, label):
    monkeypatch.setattr(cli_demo, "compute_dtype_choice", lambda device: (dtype, "because of the test"))
    loaded = []
    from_pretrained = cli_demo.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(cli_demo.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded.append(k["dtype"]) or from_pretrained(*a, **k))
    main(["demo", "--model", str(tiny_model), "--output_dir", str(tmp_path / "demo"), "--train_prompts", "2",
          "--eval_prompts", "1", "--new_tokens", "4", "--steps", "1", "--batch_size", "2"])
    name = str(dtype).removeprefix("torch.")
    assert f"computing in {'bf16' if dtype == torch.bfloat16 else 'float32'}: because of the test" in \
        capsys.readouterr().out
    assert loaded == [dtype, torch.float32]  # the teacher computes in it; the student keeps float32 masters
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert result["rows"][0]["model"] == label and result["compute_dtype"] == name
