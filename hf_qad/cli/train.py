"""``hf-qad train``: a QAD run from flags or a YAML file (TRL's parser conventions).

Every ``QADConfig`` field (which includes SFTConfig's and the ``nvfp4_*`` options) and
TRL's ``ScriptArguments``/``ModelConfig`` fields are flags; ``--config run.yaml`` reads
them from a file. Runs under ``accelerate launch`` like any TRL script.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from hf_qad.cli.common import DTYPES, CommandError
from hf_qad.data import load_text_dataset
from hf_qad.devices import compute_dtype_choice, default_device
from hf_qad.trainer import QADConfig, QADTrainer


def run(argv: list[str]) -> None:
    parser = TrlParser((ScriptArguments, QADConfig, ModelConfig), prog="hf-qad train")
    # Defaults only (a flag or the --config file wins): the CPU without an accelerator, and bf16 mixed
    # precision only where the device computes it natively (TRL's default, bf16, crashes without a GPU
    # and is several times slower than float32 on CPUs without AVX512-BF16).
    device = default_device()
    dtype, why = compute_dtype_choice(device)
    parser.set_defaults(use_cpu=device.type == "cpu", **({} if dtype == torch.bfloat16 else {"bf16": False}))
    script_args, qad_args, model_args = parser.parse_args_and_config(argv)
    print(precision_line(qad_args, device, dtype, why))
    if not model_args.model_name_or_path:
        raise CommandError("--model_name_or_path is required (the BF16 model to quantize).")
    if not script_args.dataset_name:
        raise CommandError("--dataset_name is required: a local .txt/.jsonl file, a folder, or a hub dataset id.")
    try:
        dataset = load_text_dataset(script_args.dataset_name, split=script_args.dataset_train_split,
                                    name=script_args.dataset_config)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    if model_args.dtype and model_args.dtype != "auto":
        qad_args.model_init_kwargs = {**(qad_args.model_init_kwargs or {}), "dtype": DTYPES[model_args.dtype]}
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    trainer = QADTrainer(
        model_args.model_name_or_path,
        args=qad_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(qad_args.output_dir)
    print(f"wrote packed NVFP4 checkpoint to {qad_args.output_dir}")


def precision_line(args: QADConfig, device: torch.device, dtype: torch.dtype, why: str) -> str:
    """Where the run computes and in which precision, and whether that is this machine's default."""
    where = "cpu" if args.use_cpu else device.type
    precision = "bf16 mixed precision" if args.bf16 else "fp16 mixed precision" if args.fp16 else "float32"
    chosen = "bf16 mixed precision" if dtype == torch.bfloat16 else "float32"
    if where == device.type and precision == chosen:
        source = f"the default here: {why}"
    else:
        source = f"as set; the default here is {device.type}, {chosen}: {why}"
    return f"hf-qad train: {where}, {precision} ({source})"
