"""``hf-qad train``: a QAD run from flags or a YAML file (TRL's parser conventions).

Every ``QADConfig`` field (which includes SFTConfig's and the ``nvfp4_*`` options) and
TRL's ``ScriptArguments``/``ModelConfig`` fields are flags; ``--config run.yaml`` reads
them from a file. With ``--eval_strategy steps`` the run measures held-out KL (and its
ratio to the PTQ start, the KL guard): on ``--eval_dataset_name`` (a file of its own), or
else, as TRL's ``sft`` script does, on ``--dataset_test_split`` of ``--dataset_name``. ``--help`` lists the run's main flags and the QAD/NVFP4 options,
``--help-all`` every flag. Runs under ``accelerate launch`` like any TRL script.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_type_hints

import torch
from datasets import Dataset
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_peft_config

from hf_qad.cli.common import DTYPES, CommandError
from hf_qad.data import load_text_dataset
from hf_qad.devices import compute_dtype_choice, default_device
from hf_qad.trainer import QADConfig, QADTrainer
from hf_qad.trainer.qad_trainer import check_resumable



@dataclasses.dataclass
class EvalDataArguments:
    """hf-qad train's held-out data. Its own flag because TRL's ``ScriptArguments`` evaluates on a
    split of the training dataset only, and a single text file has no splits."""

    eval_dataset_name: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Held-out text for --eval_strategy (held-out KL and the KL guard): a .txt/.jsonl file, "
                          "a folder or a hub dataset id (its --dataset_test_split). Default: --dataset_test_split of "
                          "--dataset_name."},
    )


# The flags of a typical run, listed by the short --help before the QAD/NVFP4 options.
MAIN_FLAGS = {
    ModelConfig: ["model_name_or_path"],
    ScriptArguments: ["dataset_name"],
    EvalDataArguments: ["eval_dataset_name"],
    QADConfig: ["output_dir", "max_steps", "learning_rate", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_length", "save_steps", "resume_from_checkpoint",
                "eval_strategy", "eval_steps"],
}
# Columns SFTTrainer (and QADTrainer's prompt-only path) can train on, besides dataset_text_field.
DATA_COLUMNS = ("messages", "prompt", "input_ids")


def _options(name: str, group: str, sources: dict[type, list[str]]) -> type:
    """A dataclass of the given fields of TRL's/hf_qad's argument dataclasses, as one help group."""
    specs = []
    for source, names in sources.items():
        hints = get_type_hints(source)  # the dataclasses' annotations are strings (postponed evaluation)
        fields = {f.name: f for f in dataclasses.fields(source)}
        for field_name in names:
            field = fields[field_name]
            default = {"default": field.default} if field.default is not dataclasses.MISSING else {
                "default_factory": field.default_factory}
            specs.append((field_name, hints[field_name], dataclasses.field(metadata=field.metadata, **default)))
    return dataclasses.make_dataclass(name, specs, namespace={"_argument_group_name": group})


def _print_short_help() -> None:
    # TRL's parser prints every TrainingArguments field first (over 800 lines) and the QAD options last, in the
    # order of its dataclasses' fields. The short help is an HfArgumentParser (TrlParser's base, so the same
    # flag syntax and help texts) over the main flags and QADConfig's own fields; --help-all is TRL's full help.
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    qad_fields = [f.name for f in dataclasses.fields(QADConfig) if f.name not in sft_fields]
    parser = HfArgumentParser(
        (_options("MainOptions", "run", MAIN_FLAGS), _options("QADOptions", "QAD and NVFP4", {QADConfig: qad_fields})),
        prog="hf-qad train",
        usage="hf-qad train --model_name_or_path MODEL --dataset_name DATA [options] [--config run.yaml]",
        description="A QAD run: the NVFP4 student distilled from its BF16 teacher (QADTrainer).",
        epilog="hf-qad train --help-all lists every flag: SFTConfig/TrainingArguments, ModelConfig, ScriptArguments.",
    )
    parser.print_help()


def _check_model_path(path: str) -> None:
    """Fail at once, in one line, on a model path that is no model (rather than a traceback or hub retries)."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise CommandError(f"--model_name_or_path {path} is not a model folder (no config.json).")
        return
    if path.startswith((".", "/", "~")):
        raise CommandError(f"--model_name_or_path {path} does not exist: pass a model folder or a hub id.")
    if hub_constants.HF_HUB_OFFLINE:
        raise CommandError(f"--model_name_or_path {path} is not a local folder, and HF_HUB_OFFLINE is set.")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CommandError(f"--model_name_or_path {path}: {str(error).splitlines()[0]}") from error


def _load_dataset(source: str, split: str, name: str | None, text_field: str, flag: str) -> Dataset:
    """``source`` loaded, with one-line errors for data SFTTrainer would fail on with a traceback, or silently
    train (or evaluate) nothing on."""
    try:
        dataset = load_text_dataset(source, split=split, name=name)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error) if flag == "--dataset_name" else f"{flag}: {error}") from error
    if len(dataset) == 0:
        raise CommandError(f"{flag} {source} has no rows.")
    columns = dataset.column_names
    if text_field not in columns and not any(c in columns for c in DATA_COLUMNS):
        raise CommandError(
            f"{flag} {source} has no {text_field!r}, 'messages' or 'prompt' column (columns: "
            f"{', '.join(columns)}); rename the text column or pass --dataset_text_field."
        )
    if text_field in columns and not any(isinstance(t, str) and t.strip() for t in dataset[text_field]):
        raise CommandError(f"{flag} {source}: every {text_field!r} is empty, so there is nothing to use.")
    return dataset


def _eval_dataset(script_args: ScriptArguments, eval_args: EvalDataArguments, args: QADConfig) -> Dataset | None:
    """The held-out data of an evaluating run (``--eval_strategy`` not ``no``), else ``None``."""
    evaluating = args.eval_strategy != "no"
    if eval_args.eval_dataset_name and not evaluating:
        raise CommandError("--eval_dataset_name needs --eval_strategy steps (and --eval_steps N): when to measure "
                           "the held-out KL.")
    if not evaluating:
        return None
    source, flag = eval_args.eval_dataset_name, "--eval_dataset_name"
    if source is None:
        source, flag = script_args.dataset_name, "--dataset_name"
        if Path(source).expanduser().is_file():
            raise CommandError(f"--eval_strategy {args.eval_strategy.value} needs held-out text, and --dataset_name "
                               f"{source} is one file without a test split: pass --eval_dataset_name FILE.")
    return _load_dataset(source, script_args.dataset_test_split,
                         script_args.dataset_config if flag == "--dataset_name" else None,
                         args.dataset_text_field, flag)


def run(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        _print_short_help()
        return
    parser = TrlParser((ScriptArguments, QADConfig, ModelConfig, EvalDataArguments), prog="hf-qad train")
    if "--help-all" in argv:
        parser.print_help()
        return
    # Defaults only (a flag or the --config file wins): the CPU without an accelerator, and bf16 mixed
    # precision only where the device computes it natively (TRL's default, bf16, crashes without a GPU
    # and is several times slower than float32 on CPUs without AVX512-BF16).
    device = default_device()
    dtype, why = compute_dtype_choice(device)
    parser.set_defaults(use_cpu=device.type == "cpu", **({} if dtype == torch.bfloat16 else {"bf16": False}))
    try:
        script_args, qad_args, model_args, eval_args = parser.parse_args_and_config(argv)
    except ValueError as error:  # unknown flags, a bad --config file, values TrainingArguments refuses
        message = str(error).splitlines()[0]
        if message.startswith("Some specified arguments are not used"):
            message = f"unknown flags {message.split(': ', 1)[1]}: hf-qad train --help-all lists every flag."
        raise CommandError(message) from error
    print(precision_line(qad_args, device, dtype, why))
    if not model_args.model_name_or_path:
        raise CommandError("--model_name_or_path is required (the BF16 model to quantize).")
    if not script_args.dataset_name:
        raise CommandError("--dataset_name is required: a local .txt/.jsonl file, a folder, or a hub dataset id.")
    _check_model_path(model_args.model_name_or_path)
    dataset = _load_dataset(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config,
                            qad_args.dataset_text_field, "--dataset_name")
    eval_dataset = _eval_dataset(script_args, eval_args, qad_args)
    if qad_args.resume_from_checkpoint:
        try:
            check_resumable(qad_args.resume_from_checkpoint)
        except ValueError as error:
            raise CommandError(f"--resume_from_checkpoint: {error}") from error
    if model_args.dtype and model_args.dtype != "auto":
        qad_args.model_init_kwargs = {**(qad_args.model_init_kwargs or {}), "dtype": DTYPES[model_args.dtype]}
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    trainer = QADTrainer(
        model_args.model_name_or_path,
        args=qad_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=qad_args.resume_from_checkpoint)
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
