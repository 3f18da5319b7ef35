"""QAD on a GRPO-style prompt-only dataset: the completions are generated during training.

RL pipelines keep datasets of prompts alone (``{"prompt": [{"role": "user", ...}]}``). Given
one, ``QADTrainer`` samples each batch's completions from the BF16 teacher or, with
probability ``--lmbda``, on-policy from the NVFP4 student (as in GKD), then distills on the
generated tokens only. Here the prompts are ARC-Easy science questions from
``../shared/data`` (or ``--prompts_file``, ARC's ``.jsonl`` format); their answer keys are
dropped, since distillation needs no labels.

Run it offline on SmolLM2-135M-Instruct (a few minutes on 2 CPU cores; generation dominates: measured with ``--max_steps 2``, 50 s
per step with ``OMP_NUM_THREADS=1`` on 2 cores shared with other jobs)::

    python examples/qad_prompt_only.py --max_steps 10

Useful flags: ``--prompts_file``, ``--lmbda 0.5`` (share of student-generated batches), ``--max_new_tokens``,
``--generation_temperature`` (``0`` is greedy), ``--nvfp4_scheme w4a16``, any ``QADConfig``
flag, and ``--model_name_or_path`` for another checkpoint. The packed NVFP4 model is saved
to ``--output_dir``.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from trl import ModelConfig, TrlParser

from hf_qad import QADConfig, QADTrainer
from hf_qad.smollm2 import smollm2_path

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc_easy_train.jsonl"


@dataclass
class PromptArguments:
    prompts_file: str = field(
        default=str(DEFAULT_PROMPTS),
        metadata={"help": "ARC-format .jsonl questions (question, choices.label, choices.text), one per line."},
    )


QUICK_DEFAULTS = dict(
    output_dir="SmolLM2-135M-Instruct-QAD-prompts",
    max_steps=10,
    per_device_train_batch_size=4,
    max_length=256,
    max_new_tokens=48,
    lmbda=0.5,
    learning_rate=1e-5,
    lr_scheduler_type="constant",
    logging_steps=2,
    save_strategy="no",
    gradient_checkpointing=False,
    # QADConfig (an SFTConfig) turns bf16 on by default, which needs use_cpu without a GPU.
    use_cpu=not torch.cuda.is_available(),
)


def arc_prompts(path: str) -> Dataset:
    """ARC-Easy questions as conversational prompts, without their answers."""
    prompts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        choices = "\n".join(f"{label}. {text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"]))
        content = f"{row['question']}\n{choices}\nPick the right answer and explain why in one sentence."
        prompts.append([{"role": "user", "content": content}])
    return Dataset.from_dict({"prompt": prompts})


def main(prompt_args: PromptArguments, training_args: QADConfig, model_args: ModelConfig) -> None:
    model_path = model_args.model_name_or_path or str(smollm2_path())
    training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "dtype": model_args.dtype}
    prompts = arc_prompts(prompt_args.prompts_file)
    trainer = QADTrainer(model=model_path, teacher=model_path, args=training_args, train_dataset=prompts)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")


if __name__ == "__main__":
    parser = TrlParser((PromptArguments, QADConfig, ModelConfig))
    parser.set_defaults(**QUICK_DEFAULTS)
    main(*parser.parse_args_and_config())
