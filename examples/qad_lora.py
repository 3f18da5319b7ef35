"""LoRA QAD: train LoRA adapters on a frozen NVFP4 base, distilling from the same model in BF16.

With ``peft_config`` and no teacher, ``QADTrainer`` keeps one copy of the base weights: the
student is the NVFP4 fake-quantized base plus adapters, and the teacher is that same model
with adapters and quantizers switched off (``hf_qad.teacher_mode``), i.e. the original BF16
model. Memory is about that of LoRA SFT, not of SFT plus a second model.

Run it offline on SmolLM2-135M-Instruct and TinyStories paragraphs from ``../shared/data``
(a few minutes on 2 CPU cores; measured with ``--max_steps 4``: 30 s per step, 4.9M trainable
parameters, with ``OMP_NUM_THREADS=1`` on 2 cores shared with other jobs)::

    python examples/qad_lora.py --max_steps 20

Every ``QADConfig`` flag works (``--nvfp4_scheme w4a16``, ``--divergence reverse_kl``,
``--learning_rate``, ...), as do ``ModelConfig``'s LoRA flags (``--lora_r``, ``--lora_alpha``,
``--lora_dropout``, ``--lora_target_modules``) and ``--model_name_or_path`` / ``--dataset_name``
(a ``.txt`` file, one example per paragraph, or an SFT ``.jsonl`` file). The adapters are
saved to ``--output_dir``; the adapters merged into the master weights are saved, packed as
NVFP4 (compressed-tensors format), to ``<output_dir>/merged``.
"""

from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from trl import ModelConfig, ScriptArguments, TrlParser

from hf_qad import QADConfig, QADTrainer
from hf_qad.smollm2 import smollm2_path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories_val_subset.txt"
"""The data without ``--dataset_name``: TinyStories in the ``shared/data`` folder beside the checkout."""

QUICK_DEFAULTS = dict(
    output_dir="SmolLM2-135M-Instruct-QAD-LoRA",
    max_steps=20,
    per_device_train_batch_size=4,
    max_length=256,
    learning_rate=1e-4,  # adapters start at zero and need a larger step than full fine-tuning
    lr_scheduler_type="constant",
    logging_steps=5,
    save_strategy="no",
    gradient_checkpointing=False,
    # QADConfig (an SFTConfig) turns bf16 on by default, which needs use_cpu without a GPU.
    use_cpu=not torch.cuda.is_available(),
)


def main(script_args: ScriptArguments, training_args: QADConfig, model_args: ModelConfig) -> None:
    model_path = model_args.model_name_or_path or str(smollm2_path())
    data_path = script_args.dataset_name
    if data_path is None:
        if not DEFAULT_DATA.is_file():
            raise SystemExit(f"no --dataset_name and no {DEFAULT_DATA}: pass a .txt or .jsonl file.")
        data_path = str(DEFAULT_DATA)
    if Path(data_path).suffix in (".json", ".jsonl"):
        dataset = load_dataset("json", data_files={"train": data_path})["train"]
    else:
        dataset = load_dataset("text", data_files={"train": data_path}, sample_by="paragraph")["train"]
    training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "dtype": model_args.dtype}

    lora = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    # No teacher=: with a peft_config the teacher is the base model itself in BF16.
    trainer = QADTrainer(model=model_path, args=training_args, train_dataset=dataset, peft_config=lora)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.accelerator.print(
        f"shared teacher: {trainer.shared_teacher}, separate teacher model: {trainer.teacher_model is not None}, "
        f"trainable parameters: {trainable:,}"
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    trainer.save_model(training_args.output_dir)
    merged_dir = Path(training_args.output_dir) / "merged"
    trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(merged_dir)
    trainer.processing_class.save_pretrained(merged_dir)
    trainer.accelerator.print(f"Adapters saved to {training_args.output_dir}, merged NVFP4 model to {merged_dir}.")


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, QADConfig, ModelConfig))
    parser.set_defaults(**QUICK_DEFAULTS)
    main(*parser.parse_args_and_config())
