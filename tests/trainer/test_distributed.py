"""Data-parallel QAD: 2 CPU processes (gloo) give the 1-process run with the same global batch.

The 2-process run is ``torchrun`` on ``distributed_qad_run.py`` in a subprocess; the
1-process runs (8 per step, and 4 x gradient accumulation 2) call the same code here.
FSDP2 and DeepSpeed need GPUs (accelerate falls back to DDP on CPU); see
``examples/accelerate/README.md``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from distributed_qad_run import GLOBAL_BATCH, STEPS, train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is needed to run 2 CPU processes",
)

SCRIPT = Path(__file__).with_name("distributed_qad_run.py")
METRICS = ("loss", "kl", "top1_agreement", "student_ce", "teacher_ce")


def _load(out: Path, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    record = json.loads((out / f"rank{rank}.json").read_text())
    return record, torch.load(out / f"master_rank{rank}.pt")


@pytest.fixture(scope="module")
def one_process(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    train(str(tiny_path), str(out), batch_size=GLOBAL_BATCH)
    return out


@pytest.fixture(scope="module")
def two_processes(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(tiny_path), str(out), "--batch-size", str(GLOBAL_BATCH // 2)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def _assert_same_run(ours: tuple[dict, dict], reference: tuple[dict, dict], metrics=METRICS) -> None:
    (record, weights), (expected, expected_weights) = ours, reference
    assert len(record["logs"]) == len(expected["logs"]) == STEPS
    for step, (got, want) in enumerate(zip(record["logs"], expected["logs"]), start=1):
        for name in metrics:
            assert got[name] == pytest.approx(want[name], rel=1e-5), (step, name)
    # Calibration saw the same samples in both runs, so the static scales are the same bits.
    assert record["input_global_scale"] == expected["input_global_scale"]
    for name, value in expected_weights.items():
        # Updates are up to 2e-3 here; the runs differ by float32 summation order only.
        torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_two_processes_match_one_process_with_the_same_global_batch(one_process, two_processes):
    reference = _load(one_process, 0)
    assert reference[0]["world_size"] == 1
    for rank in (0, 1):
        record, weights = _load(two_processes, rank)
        assert record["world_size"] == 2
        _assert_same_run((record, weights), reference)


def test_every_rank_ends_with_the_same_calibration_and_weights(two_processes):
    (first, first_weights), (second, second_weights) = _load(two_processes, 0), _load(two_processes, 1)
    assert first["input_global_scale"] and all(v > 0 for v in first["input_global_scale"].values())
    assert first["input_global_scale"] == second["input_global_scale"]
    assert first["logs"] == second["logs"]  # logged values are gathered across ranks
    for name, value in first_weights.items():
        assert torch.equal(second_weights[name], value), name


def test_save_model_writes_one_packed_checkpoint(two_processes):
    assert [_load(two_processes, rank)[0]["should_save"] for rank in (0, 1)] == [True, False]
    final = two_processes / "final"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    config = json.loads((final / "config.json").read_text())
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    packed = AutoModelForCausalLM.from_pretrained(final)
    record, _ = _load(two_processes, 0)
    for name, scale in record["input_global_scale"].items():
        assert packed.get_submodule(name).input_global_scale.item() == scale, name


def test_gradient_accumulation_matches_the_same_global_batch(one_process, tiny_path, tmp_path):
    """4 x accumulation 2 in one process: W4A4 calibration on micro-batches, then the 8-sample steps.

    Only the loss is compared among the logged values: the distillation metrics (like
    SFTTrainer's own) are averaged over micro-batches, not over the accumulated tokens.
    """
    train(str(tiny_path), str(tmp_path), batch_size=GLOBAL_BATCH // 2, accumulation=2)
    _assert_same_run(_load(tmp_path, 0), _load(one_process, 0), metrics=("loss",))
