"""A tiny W4A4 QAD run that gives the same result in one process or several (CPU, gloo).

``tests/trainer/test_distributed.py`` runs it in-process with a global batch of 8, and
under ``torchrun --nproc_per_node 2`` with 4 per process (DDP, FSDP2 with ``--fsdp2``, or
DeepSpeed ZeRO-3 with ``--zero3``)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m tests.trainer.distributed_qad_run TINY_MODEL_DIR OUT_DIR --batch-size 4 [--fsdp2 | --zero3] \
        [--no-gradient-checkpointing]

Each rank writes ``rank<r>.json`` (logged losses and metrics, calibrated input global
scales); ``master_rank<r>.pt`` holds the final master weights as
``accelerator.get_state_dict`` gives them (every rank under DDP, rank 0 under FSDP2 and ZeRO-3);
``trainer.save_model`` writes the packed export to ``OUT_DIR/final``. Run it from the
repository root, where ``-m`` finds the ``tests`` package.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_qad import NVFP4Config
from hf_qad.nvfp4.conversion import nvfp4_modules
from hf_qad.trainer import QADConfig, QADTrainer
from tests.tiny_models import TEXTS, tiny_tokenizer

GLOBAL_BATCH = 8
STEPS = 4


class FSDP2OnCPUTrainer(QADTrainer):
    """QADTrainer under FSDP2 on CPU processes.

    accelerate only enables FSDP on accelerators (on CPU it silently runs DDP), while torch's
    ``fully_shard`` also shards over a gloo CPU mesh. This switches accelerate's state to FSDP2
    once it is set up, with the layout of ``examples/accelerate/fsdp2.yaml``, so the real FSDP2
    code paths run: accelerate's student preparation, the teacher's, and the gathered save.
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # accelerate keeps the type in both shared states: a later AcceleratorState() copies PartialState's.
        self.accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False,
        )
        self.is_fsdp_enabled = True


# DeepSpeed ZeRO-3 with the Trainer's own optimizer (SGD) and no offload: parameters, gradients and
# optimizer state partitioned; save_model gathers the full weights on rank 0 (the example config's
# zero3_save_16bit_model). The batch sizes and accumulation come from QADConfig.
ZERO3_CONFIG = {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
}


def _count_every_process() -> None:
    """Make accelerate count the DeepSpeed processes on CPU.

    DeepSpeed runs on CPU (its CPU accelerator, over gloo), but accelerate sees no accelerator and
    records one process while setting the DeepSpeed type, so batch sizes, gathers and the loss
    normalization would assume one process. This writes the real world size, rank and local rank
    into accelerate's shared states (the harness counterpart of ``FSDP2OnCPUTrainer``).
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    counts = {"num_processes": dist.get_world_size(), "process_index": dist.get_rank(),
              "local_process_index": int(os.environ.get("LOCAL_RANK", "0"))}
    PartialState._shared_state.update(counts)
    if AcceleratorState._shared_state:
        AcceleratorState._shared_state.update(counts)


def texts() -> list[str]:
    """16 texts of different lengths: two global batches, so 4 steps are 2 epochs."""
    return TEXTS + [text[: len(text) // 2] + " " + other for text, other in zip(TEXTS, reversed(TEXTS))]


def train(model_path: str, output_dir: str, batch_size: int, accumulation: int = 1, fsdp2: bool = False,
          zero3: bool = False, gradient_checkpointing: bool = True, learn_scales: bool = False) -> None:
    """Train, save the packed model to ``output_dir/final``, write this rank's record and master weights."""
    if zero3:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets for deepspeed=
        PartialState()  # initializes DeepSpeed's process group (gloo on CPU)
        _count_every_process()
    student = AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=NVFP4Config(scheme="w4a4", learn_scales=learn_scales), dtype=torch.float32
    )
    args = QADConfig(
        output_dir,
        use_cpu=not zero3,  # accelerate turns DeepSpeed off under use_cpu; it runs on CPU anyway
        deepspeed=ZERO3_CONFIG if zero3 else None,
        # float32 compute: under bf16 autocast the roundings depend on how samples are batched.
        bf16=False,
        report_to=[],
        save_strategy="no",
        seed=0,
        logging_steps=1,
        max_steps=STEPS,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
        scale_learning_rate=0.5,  # learned clips (learn_scales) move as much as the weights
        lr_scheduler_type="constant",
        dataloader_drop_last=True,
        # Step k trains on samples 8k..8k+7 whatever the process count: accelerate hands
        # process r the batches r, r + n, ... of per-device size, in dataset order.
        train_sampling_strategy="sequential",
        # Same padded length for every batch, so calibration (which sees padding
        # positions too) observes the same activations however samples are grouped.
        pad_to_multiple_of=64,
        # Per-process micro-batches: 8 cover the 16 samples with any batch size used here.
        calibration_batches=8,
        # QADConfig's default (SFTConfig's). Without it the Trainer sets DDP's find_unused_parameters=True.
        gradient_checkpointing=gradient_checkpointing,
    )
    trainer_class = FSDP2OnCPUTrainer if fsdp2 else QADTrainer
    trainer = trainer_class(student, args=args, train_dataset=Dataset.from_dict({"text": texts()}),
                            processing_class=tiny_tokenizer())
    if zero3:
        _count_every_process()  # the Trainer's accelerator set its state up again
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "final"))
    rank = trainer.accelerator.process_index
    master = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective under FSDP2 and ZeRO-3
    if master:
        torch.save({k: v.detach().clone() for k, v in master.items()}, Path(output_dir) / f"master_rank{rank}.pt")
    record = {
        "world_size": trainer.accelerator.num_processes,
        "activation_checkpointing": trainer.accelerator.unwrap_model(trainer.model).is_activation_checkpointing,
        # DDP's setting (None under FSDP2 and ZeRO-3): the Trainer turns it on without activation checkpointing.
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "fsdp2": trainer.accelerator.is_fsdp2,
        "zero3": trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3,
        # ZeRO-3 partitions the parameters of the student and of the teacher (DeepSpeed tags them).
        "partitioned": [hasattr(next(m.parameters()), "ds_id") for m in (trainer.model, trainer.teacher_model)],
        "should_save": trainer.args.should_save,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "input_global_scale": {
            name: layer.input_global_scale.item()
            for name, layer in nvfp4_modules(trainer.accelerator.unwrap_model(trainer.model)).items()
        },
    }
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    # An orderly end: every rank done, then the process groups (DeepSpeed's included) torn down before the
    # interpreter exits. Left to exit-time destructors, a rank once aborted ("terminate called without an
    # active exception") after its work was done, under load.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path")
    parser.add_argument("output_dir")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--zero3", action="store_true", help="partition with DeepSpeed ZeRO-3 instead of DDP")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--learn-scales", action="store_true", help="NVFP4Config(learn_scales=True)")
    options = parser.parse_args()
    torch.set_num_threads(1)  # one core per process
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if options.batch_size * world != GLOBAL_BATCH:
        raise SystemExit(f"--batch-size x processes must be {GLOBAL_BATCH}, got {options.batch_size} x {world}")
    train(options.model_path, options.output_dir, options.batch_size, fsdp2=options.fsdp2, zero3=options.zero3,
          gradient_checkpointing=options.gradient_checkpointing, learn_scales=options.learn_scales)


if __name__ == "__main__":
    main()
