"""Data-parallel and sharded QAD on 2 CPU processes (gloo) give the 1-process run with the same global batch.

The 2-process runs are ``torchrun`` on ``tests.trainer.distributed_qad_run`` in a subprocess: DDP (what
accelerate does on CPU), FSDP2 forced onto CPU (accelerate enables FSDP on accelerators
only; see ``FSDP2OnCPUTrainer``), and DeepSpeed ZeRO-3 on DeepSpeed's CPU accelerator (gloo;
see ``_count_every_process``). The 1-process runs (8 per step, and 4 x gradient
accumulation 2) call the same code here.
Also here: the student's and teacher's redirected forwards keep accelerate's mixed precision,
and the example accelerate configs load.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config
from hf_qad.trainer import QADConfig, QADTrainer
from tests.tiny_models import tiny_tokenizer
from tests.trainer.distributed_qad_run import GLOBAL_BATCH, STEPS, texts, train

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is needed to run 2 CPU processes",
)

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install deepspeed)"
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "accelerate"
METRICS = ("loss", "kl", "top1_agreement", "student_ce", "teacher_ce")


def _record(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def _master(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"master_rank{rank}.pt")


def _launch(command: list[str], env: dict[str, str] | None = None) -> str:
    """Run a launcher (torchrun, accelerate launch) from the repository root; its output, or the failure's.

    cwd: `-m` finds the tests package from the repository root. The timeout (a rank waiting alone hangs)
    kills the launcher's whole process group: killing the launcher alone leaves its workers running.
    """
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
    assert process.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return stdout + stderr


def _two_processes(tiny_path, out: Path, *options: str) -> Path:
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "tests.trainer.distributed_qad_run", str(tiny_path), str(out), "--batch-size", str(GLOBAL_BATCH // 2),
             *options])
    return out


@pytest.fixture(scope="module")
def one_process(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    train(str(tiny_path), str(out), batch_size=GLOBAL_BATCH)
    return out


# Each 2-process run with and without gradient checkpointing. Without it the Trainer sets DDP's
# find_unused_parameters=True, under which the loss's head once failed ("mark a variable ready only once").
CHECKPOINTING = dict(params=[True, False], ids=["checkpointing", "no_checkpointing"])


def _checkpointing(on: bool) -> tuple[str, ...]:
    return () if on else ("--no-gradient-checkpointing",)


@pytest.fixture(scope="module", **CHECKPOINTING)
def ddp(request, tiny_path, tmp_path_factory):
    return _two_processes(tiny_path, tmp_path_factory.mktemp("ddp"), *_checkpointing(request.param))


# A MoE student (tiny Qwen3-MoE, NVFP4 experts), without gradient checkpointing: DDP then looks for unused
# parameters, which is where a MoE model differs (experts a batch does not route to).
@pytest.fixture(scope="module")
def one_process_moe(tiny_moe_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process_moe")
    train(str(tiny_moe_path), str(out), batch_size=GLOBAL_BATCH, gradient_checkpointing=False)
    return out


@pytest.fixture(scope="module")
def ddp_moe(tiny_moe_path, tmp_path_factory):
    return _two_processes(tiny_moe_path, tmp_path_factory.mktemp("ddp_moe"), "--no-gradient-checkpointing")


@pytest.fixture(scope="module", **CHECKPOINTING)
def fsdp2(request, tiny_path, tmp_path_factory):
    return _two_processes(tiny_path, tmp_path_factory.mktemp("fsdp2"), "--fsdp2", *_checkpointing(request.param))


@pytest.fixture(scope="module", **CHECKPOINTING)
def zero3(request, tiny_path, tmp_path_factory):
    return _two_processes(tiny_path, tmp_path_factory.mktemp("zero3"), "--zero3", *_checkpointing(request.param))


def _assert_same_run(out: Path, reference: Path, rank: int = 0, metrics=METRICS) -> None:
    record, expected = _record(out, rank), _record(reference)
    assert len(record["logs"]) == len(expected["logs"]) == STEPS
    for step, (got, want) in enumerate(zip(record["logs"], expected["logs"]), start=1):
        for name in metrics:
            # The KL (~2e-4) is a difference of cross-entropies (~4.9): float32 noise is ~1e-8 absolute.
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=5e-8), (step, name)
    # Calibration saw the same samples in both runs, so the static scales are the same bits.
    assert record["input_global_scale"] == expected["input_global_scale"]
    weights, expected_weights = _master(out, rank), _master(reference)
    assert weights.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        # Updates are up to 2e-3 here; the runs differ by float32 summation order only.
        torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7, msg=name)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor  # float8 has no equality


def _assert_one_packed_export_of_the_master_weights(out: Path, tiny_path, tmp_path: Path) -> None:
    """``save_model`` wrote, from rank 0 only, what packing the final master weights in one process writes."""
    assert [_record(out, rank)["should_save"] for rank in (0, 1)] == [True, False]
    final = out / "final"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    config = json.loads((final / "config.json").read_text())
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    model = AutoModelForCausalLM.from_pretrained(tiny_path, quantization_config=NVFP4Config(scheme="w4a4"),
                                                 dtype=torch.float32)
    model.load_state_dict(_master(out))
    model.save_pretrained(tmp_path)
    exported, expected = load_file(final / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(_bits(exported[name]), _bits(value)), name
    packed = hf_qad.load_packed_model(final)
    for name, scale in _record(out)["input_global_scale"].items():
        assert packed.get_submodule(name).input_global_scale.item() == scale, name


@needs_gloo
def test_ddp_matches_one_process_with_the_same_global_batch(one_process, ddp):
    assert _record(one_process)["world_size"] == 1
    for rank in (0, 1):
        record = _record(ddp, rank)
        assert record["world_size"] == 2
        assert record["find_unused_parameters"] is not record["activation_checkpointing"]  # the Trainer's choice
        _assert_same_run(ddp, one_process, rank)


@needs_gloo
def test_ddp_ranks_end_with_the_same_calibration_and_weights(ddp):
    first, second = _record(ddp, 0), _record(ddp, 1)
    assert first["input_global_scale"] and all(v > 0 for v in first["input_global_scale"].values())
    assert first["input_global_scale"] == second["input_global_scale"]
    assert first["logs"] == second["logs"]  # logged values are gathered across ranks
    first_weights, second_weights = _master(ddp, 0), _master(ddp, 1)
    for name, value in first_weights.items():
        assert torch.equal(second_weights[name], value), name


@needs_gloo
def test_ddp_save_model_writes_one_packed_export(ddp, tiny_path, tmp_path):
    _assert_one_packed_export_of_the_master_weights(ddp, tiny_path, tmp_path)


@needs_gloo
def test_ddp_of_a_moe_student_matches_one_process(one_process_moe, ddp_moe):
    for rank in (0, 1):
        assert _record(ddp_moe, rank)["find_unused_parameters"] is True
        _assert_same_run(ddp_moe, one_process_moe, rank, metrics=(*METRICS, "router_agreement"))
    assert _record(ddp_moe, 0)["logs"] == _record(ddp_moe, 1)["logs"]


@needs_gloo
def test_fsdp2_matches_one_process_and_exports_from_gathered_weights(one_process, fsdp2, tiny_path, tmp_path):
    """Sharded student and teacher: same losses and master weights; rank 0 packs the gathered weights."""
    assert _record(fsdp2)["fsdp2"] and _record(fsdp2, 1)["fsdp2"]
    assert not (fsdp2 / "master_rank1.pt").exists()  # the full state dict is gathered on rank 0 only
    _assert_same_run(fsdp2, one_process)
    assert _record(fsdp2, 1)["input_global_scale"] == _record(fsdp2)["input_global_scale"]
    _assert_one_packed_export_of_the_master_weights(fsdp2, tiny_path, tmp_path)


@needs_gloo
@needs_deepspeed
def test_zero3_matches_one_process_and_exports_from_gathered_weights(one_process, zero3, tiny_path, tmp_path):
    """Student and teacher partitioned by ZeRO-3: same losses and master weights; rank 0 packs the gathered weights.

    The loss takes its checkpoint path here (the head's parameters are DeepSpeed's), and the fused
    q/k/v and gate/up peers are gathered with each layer for their shared global scale.
    """
    for rank in (0, 1):
        record = _record(zero3, rank)
        assert record["zero3"] and record["world_size"] == 2
        assert record["partitioned"] == [True, True]  # the student and the teacher
    assert not (zero3 / "master_rank1.pt").exists()  # the full state dict is gathered on rank 0 only
    _assert_same_run(zero3, one_process)
    assert _record(zero3, 1)["input_global_scale"] == _record(zero3)["input_global_scale"]
    assert _record(zero3, 1)["logs"] == _record(zero3)["logs"]
    _assert_one_packed_export_of_the_master_weights(zero3, tiny_path, tmp_path)


def test_gradient_accumulation_matches_the_same_global_batch(one_process, tiny_path, tmp_path):
    """4 x accumulation 2 in one process: W4A4 calibration on micro-batches, then the 8-sample steps.

    Only the loss is compared among the logged values: the distillation metrics (like
    SFTTrainer's own) are averaged over micro-batches, not over the accumulated tokens.
    """
    train(str(tiny_path), str(tmp_path), batch_size=GLOBAL_BATCH // 2, accumulation=2)
    _assert_same_run(tmp_path, one_process, metrics=("loss",))


def test_student_and_teacher_forwards_keep_the_mixed_precision(tiny_path, tmp_path):
    """The forward redirection bypasses the autocast wrapper accelerate puts on ``forward``; it is restored."""
    student = AutoModelForCausalLM.from_pretrained(tiny_path, quantization_config=NVFP4Config(scheme="w4a16"),
                                                   dtype=torch.float32)
    args = QADConfig(str(tmp_path), use_cpu=True, bf16=True, report_to=[], save_strategy="no", max_steps=1,
                     per_device_train_batch_size=GLOBAL_BATCH)
    trainer = QADTrainer(student, args=args, train_dataset=Dataset.from_dict({"text": texts()}),
                         processing_class=tiny_tokenizer())
    autocast = {}
    for name, model in (("student", student), ("teacher", trainer.teacher_model)):
        layer = model.model.layers[0].self_attn.o_proj
        layer.register_forward_hook(lambda *_, name=name: autocast.setdefault(name, torch.is_autocast_enabled("cpu")))
    trainer.train()
    assert autocast == {"student": True, "teacher": True}


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "deepspeed_zero3"])
def test_example_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(EXAMPLES / f"{name}.yaml"))
    assert config.mixed_precision == "bf16"
    if name == "ddp":
        assert config.distributed_type == DistributedType.MULTI_GPU
    elif name == "fsdp2":
        assert config.distributed_type == DistributedType.FSDP
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model gathers for the export
    else:
        assert config.distributed_type == DistributedType.DEEPSPEED
        assert config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_save_16bit_model"] is True


def _documented_launch_commands() -> list[str]:
    """The launch commands of examples/accelerate/README.md: its bash block, and the CPU ones in its text."""
    text = (EXAMPLES / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [line for line in block.splitlines() if line.strip()]
    commands += re.findall(r"`((?:accelerate launch|torchrun) [^`]*)`", text)
    return [" ".join(command.split()) for command in commands]


def test_the_readme_documents_these_launch_commands():
    configs = {"ddp", "fsdp2", "deepspeed_zero3"}
    commands = _documented_launch_commands()
    documented = {c.split("--config_file examples/accelerate/")[1].split(".yaml")[0] for c in commands if "--config_file" in c}
    assert documented == configs
    assert sum(c.startswith("torchrun") for c in commands) == 1 and sum("--multi_gpu" in c for c in commands) == 1


# On CPU, accelerate launch cannot start DeepSpeed's processes: it counts one process where DeepSpeed
# runs two, and the run hangs or fails its batch-size check. ZeRO-3 runs in the tests through
# distributed_qad_run.py, which sets the counts right (_count_every_process).
CPU_LAUNCHES = [c for c in _documented_launch_commands() if "deepspeed_zero3.yaml" not in c]


@needs_gloo
@pytest.mark.parametrize("command", CPU_LAUNCHES,
                         ids=lambda c: c.split("examples/qad_sft.py")[0].split("/")[-1].strip())
def test_documented_launch_command_runs_on_two_cpu_processes(command, tiny_path, tmp_path):
    """Each launch command of the accelerate README, as written, on the tiny model for one step.

    Under ddp.yaml and fsdp2.yaml these are DDP runs on gloo (accelerate enables FSDP on accelerators only),
    without gradient checkpointing: the example's default.
    """
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts()))
    run = ["--model_name_or_path", str(tiny_path), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]
    words = command.replace("path/to/bf16", str(tiny_path)).replace("data.jsonl", str(data)).split()
    if "..." in words:  # the CPU commands in the text: "examples/qad_sft.py ... --use_cpu"
        index = words.index("...")
        words[index : index + 1] = run
    else:
        words[words.index("out")] = str(tmp_path / "out")
    if words[:2] == ["accelerate", "launch"] and "--num_processes" not in words:
        words[2:2] = ["--num_processes", "2"]  # the configs say 8 GPUs; the README: pass --num_processes N
    launcher = {"accelerate": [str(Path(sys.executable).parent / "accelerate")],
                "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[words[0]]
    argv = [*launcher, *words[1:], "--max_steps", "1", "--max_length", "32", "--report_to", "none",
            "--logging_steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    output = _launch(argv, env)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    assert "'loss'" in output  # one logged step
