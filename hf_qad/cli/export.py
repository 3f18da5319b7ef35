"""``hf-qad export``: a training checkpoint (master weights) to a packed NVFP4 checkpoint."""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from hf_qad.cli.common import CommandError, add_output_arguments, check_output_dir, existing_path, load_model, writing_into
from hf_qad.cli.quantize import EXPORT_FORMATS, save_export
from hf_qad.quantizer.quantizer import NVFP4HfQuantizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=existing_path,
                        help="a QAD training checkpoint (e.g. output/checkpoint-500) or any hf_qad model")
    add_output_arguments(parser, "where to write the packed checkpoint: a new or empty folder, not the checkpoint's")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="compressed-tensors")


def run(args: argparse.Namespace) -> None:
    out = check_output_dir(args.output_dir, args.overwrite, [args.checkpoint])
    model = load_model(args.checkpoint)
    if not isinstance(getattr(model, "hf_quantizer", None), NVFP4HfQuantizer):
        raise CommandError(f"{args.checkpoint} is not an hf_qad NVFP4 checkpoint; use 'hf-qad quantize' for BF16 models.")
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    with writing_into(out) as folder:
        save_export(model, tokenizer, folder, args.format)
    print(f"wrote packed NVFP4 ({args.format}) to {args.output_dir}")
