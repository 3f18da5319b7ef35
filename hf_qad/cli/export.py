"""``hf-qad export``: a training checkpoint (master weights) to a packed NVFP4 checkpoint."""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from hf_qad.cli.common import CommandError, existing_path, load_model
from hf_qad.cli.quantize import EXPORT_FORMATS, save_export
from hf_qad.quantizer.quantizer import NVFP4HfQuantizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=existing_path,
                        help="a QAD training checkpoint (e.g. output/checkpoint-500) or any hf_qad model")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="compressed-tensors")


def run(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint)
    if not isinstance(getattr(model, "hf_quantizer", None), NVFP4HfQuantizer):
        raise CommandError(f"{args.checkpoint} is not an hf_qad NVFP4 checkpoint; use 'hf-qad quantize' for BF16 models.")
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    path = save_export(model, tokenizer, args.output_dir, args.format)
    print(f"wrote packed NVFP4 ({args.format}) to {path}")
