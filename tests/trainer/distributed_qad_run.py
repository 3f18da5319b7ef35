"""A tiny W4A4 QAD run that gives the same result in one process or several (CPU, gloo).

``tests/trainer/test_distributed.py`` runs it in-process with a global batch of 8, and
under ``torchrun --nproc_per_node 2`` with 4 per process, then compares the two::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/trainer/distributed_qad_run.py TINY_MODEL_DIR OUT_DIR --batch-size 4

Each rank writes ``rank<r>.json`` (logged losses and metrics, calibrated input global
scales) and ``master_rank<r>.pt`` (its final master weights) to ``OUT_DIR``;
``trainer.save_model`` writes the packed export to ``OUT_DIR/final``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tiny_models, when run as a script

from hf_qad import NVFP4Config  # noqa: E402
from hf_qad.quantizer.conversion import nvfp4_modules  # noqa: E402
from hf_qad.trainer import QADConfig, QADTrainer  # noqa: E402
from tiny_models import TEXTS, tiny_tokenizer  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 4


def texts() -> list[str]:
    """16 texts of different lengths: two global batches, so 4 steps are 2 epochs."""
    return TEXTS + [text[: len(text) // 2] + " " + other for text, other in zip(TEXTS, reversed(TEXTS))]


def train(model_path: str, output_dir: str, batch_size: int, accumulation: int = 1) -> dict:
    """Train, save the packed model to ``output_dir/final`` and return this rank's record."""
    student = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=NVFP4Config(scheme="w4a4"),
                                                   dtype=torch.float32)
    args = QADConfig(
        output_dir,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        logging_steps=1,
        max_steps=STEPS,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
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
    )
    trainer = QADTrainer(student, args=args, train_dataset=Dataset.from_dict({"text": texts()}),
                         processing_class=tiny_tokenizer())
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "final"))
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, Path(output_dir) / f"master_rank{rank}.pt")
    record = {
        "world_size": trainer.accelerator.num_processes,
        "should_save": trainer.args.should_save,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "input_global_scale": {
            name: layer.input_global_scale.item() for name, layer in nvfp4_modules(model).items()
        },
    }
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path")
    parser.add_argument("output_dir")
    parser.add_argument("--batch-size", type=int, required=True)
    options = parser.parse_args()
    torch.set_num_threads(1)  # one core per process
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if options.batch_size * world != GLOBAL_BATCH:
        raise SystemExit(f"--batch-size x processes must be {GLOBAL_BATCH}, got {options.batch_size} x {world}")
    train(options.model_path, options.output_dir, options.batch_size)


if __name__ == "__main__":
    main()
