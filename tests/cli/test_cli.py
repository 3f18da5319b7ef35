"""The hf-qad command on tiny models: quantize, export, eval, train, demo, and bad input."""

import io
import json

import pytest
import torch

import hf_qad
from hf_qad.cli.main import main
from tests.tiny_models import TEXTS, save_tiny_llama_with_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join(TEXTS * 6))
    return path


def test_quantize_writes_a_calibrated_packed_checkpoint(tiny, text_file, tmp_path, capsys):
    main(["quantize", "--model", str(tiny), "--output_dir", str(tmp_path / "ptq"), "--calibration_data",
          str(text_file), "--seq_len", "32", "--batch_size", "2", "--calibration_batches", "2"])
    assert "wrote packed NVFP4 (w4a4" in capsys.readouterr().out
    config = json.loads((tmp_path / "ptq" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    model = hf_qad.load_packed_model(tmp_path / "ptq")
    assert model.model.layers[0].mlp.up_proj.is_packed and model.model.layers[0].mlp.up_proj.input_calibrated
    assert (tmp_path / "ptq" / "tokenizer.json").exists()
    assert "nvfp4-pack-quantized" in (tmp_path / "ptq" / "README.md").read_text()  # the model card


def test_quantize_w4a4_without_calibration_data_is_a_clear_error(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit, match="W4A4 needs --calibration_data") as raised:
        main(["quantize", "--model", str(tiny), "--output_dir", str(tmp_path / "x")])
    assert raised.value.code == 2  # a CommandError: one line on stderr, exit status 2
    assert capsys.readouterr().err == f"{raised.value}\n"


def test_a_command_error_exits_with_status_2_from_the_shell(tiny, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "hf_qad.cli.main", "quantize", "--model", str(tiny),
                             "--output_dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("hf-qad: error: W4A4 needs")


def test_bad_path_is_reported_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--student", str(tmp_path / "nope"), "--teacher", str(tmp_path), "--data", str(tmp_path)])
    assert "does not exist" in capsys.readouterr().err


def test_eval_prints_a_table_and_writes_json_and_png(tiny, text_file, tmp_path, capsys):
    main(["quantize", "--model", str(tiny), "--output_dir", str(tmp_path / "ptq"), "--scheme", "w4a16"])
    main(["eval", "--student", str(tmp_path / "ptq"), "--teacher", str(tiny), "--data", str(text_file),
          "--tokens", "256", "--seq_len", "32", "--output_dir", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "| model | perplexity | kl | top1_agreement |" in out
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["tokens"] == 8 * 31 and result["student"]["kl"] > 0
    assert len(result["layer_errors"]) == 14 and all(0.05 < e < 0.2 for e in result["layer_errors"].values())
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 1000


def test_train_from_flags_and_yaml_then_export(tiny, text_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny}\ndataset_name: {text_file}\nnvfp4_scheme: w4a16\n"
                      "max_steps: 2\nper_device_train_batch_size: 2\nuse_cpu: true\nreport_to: []\n"
                      "save_steps: 1\nlogging_steps: 1\n")
    main(["train", "--config", str(config), "--output_dir", str(tmp_path / "run"), "--max_length", "48"])
    final = json.loads((tmp_path / "run" / "config.json").read_text())["quantization_config"]
    assert final["format"] == "nvfp4-pack-quantized" and final["hf_qad"]["scheme"] == "w4a16"
    assert "## Training" in (tmp_path / "run" / "README.md").read_text()  # the trainer writes the card
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["weights_format"] == "master"
    main(["export", "--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "exported")])
    exported = hf_qad.load_packed_model(tmp_path / "exported")
    assert exported.model.layers[0].mlp.up_proj.is_packed


def test_export_refuses_a_plain_model(tiny, tmp_path):
    with pytest.raises(SystemExit, match="not an hf_qad NVFP4 checkpoint"):
        main(["export", "--checkpoint", str(tiny), "--output_dir", str(tmp_path / "x")])


def test_demo_on_a_tiny_model(tiny, tmp_path, capsys):
    main(["demo", "--model", str(tiny), "--output_dir", str(tmp_path / "demo"), "--train_prompts", "4",
          "--eval_prompts", "2", "--new_tokens", "8", "--steps", "2", "--batch_size", "2"])
    out = capsys.readouterr().out
    assert "NVFP4 w4a4 PTQ" in out and "NVFP4 w4a4 QAD" in out
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    rows = result["rows"]
    teacher = {"bfloat16": "BF16 teacher", "float32": "float32 teacher"}[result["compute_dtype"]]  # this CPU's
    assert [r["model"] for r in rows] == [teacher, "NVFP4 w4a4 PTQ", "NVFP4 w4a4 QAD"]
    assert (tmp_path / "demo" / "nvfp4" / "model.safetensors").exists()
    assert all(r["kl"] > 0 and torch.isfinite(torch.tensor(r["kl"])) for r in rows[1:])
    up_proj = hf_qad.load_packed_model(tmp_path / "demo" / "nvfp4").model.layers[0].mlp.up_proj
    assert isinstance(up_proj, hf_qad.NVFP4Linear) and up_proj.is_packed


def test_no_command_prints_help(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "hf-qad demo" in capsys.readouterr().out


def test_demo_chat_rows_start_with_bos_once():
    from hf_qad.cli.demo import chat_ids
    from tests.tiny_models import CHAT_TEMPLATE, tiny_tokenizer

    conversation = [{"role": "user", "content": "hi"}]
    with_bos, without = tiny_tokenizer(add_bos=True), tiny_tokenizer()
    assert chat_ids(with_bos, conversation)[:2] == [1, with_bos.convert_tokens_to_ids("u")]  # the template's <s>
    for tokenizer in (with_bos, without):
        tokenizer.chat_template = CHAT_TEMPLATE.replace("<s>", "")
    assert chat_ids(with_bos, conversation)[:2] == [1, with_bos.convert_tokens_to_ids("u")]  # added
    assert chat_ids(without, conversation, add_generation_prompt=True)[0] == without.convert_tokens_to_ids("u")


def test_stdout_is_line_buffered_so_progress_lines_keep_their_place_among_progress_bars(monkeypatch):
    piped = io.TextIOWrapper(io.BytesIO())  # what a pipe or a log file gives: block-buffered
    monkeypatch.setattr("sys.stdout", piped)
    with pytest.raises(SystemExit):
        main([])  # prints the usage and exits
    assert piped.line_buffering


def test_train_evaluates_held_out_text_from_the_start(tiny, text_file, tmp_path):
    """--eval_dataset_name with --eval_strategy: held-out KL at the PTQ start (step 0) and its ratio after."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(reversed(TEXTS)))
    main(["train", "--model_name_or_path", str(tiny), "--dataset_name", str(text_file), "--eval_dataset_name",
          str(held_out), "--eval_strategy", "steps", "--eval_steps", "1", "--output_dir", str(tmp_path / "run"),
          "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "48",
          "--use_cpu", "true", "--report_to", "none", "--nvfp4_scheme", "w4a16"])
    history = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    evals = [entry for entry in history if "eval_kl" in entry]
    assert [entry["step"] for entry in evals] == [0, 1, 2]
    assert "eval_kl_ratio" not in evals[0] and all(entry["eval_kl_ratio"] > 0 for entry in evals[1:])
