"""``hf-qad train``: a QAD run from flags or a YAML file (TRL's parser conventions).

Every ``QADConfig`` field (which includes SFTConfig's and the ``nvfp4_*`` options) and
TRL's ``ScriptArguments``/``ModelConfig`` fields are flags; ``--config run.yaml`` reads
them from a file. Runs under ``accelerate launch`` like any TRL script.
"""

from __future__ import annotations

from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from hf_qad.cli.common import DTYPES, CommandError
from hf_qad.data import load_text_dataset
from hf_qad.trainer import QADConfig, QADTrainer


def run(argv: list[str]) -> None:
    parser = TrlParser((ScriptArguments, QADConfig, ModelConfig), prog="hf-qad train")
    script_args, qad_args, model_args = parser.parse_args_and_config(argv)
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
