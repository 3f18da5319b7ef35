"""``hf-qad quantize``: post-training quantization (calibrate, export packed NVFP4).

This is the PTQ baseline that QAD is compared against.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_qad.cli.common import (
    DTYPES,
    CommandError,
    add_output_arguments,
    batches,
    check_output_dir,
    existing_path,
    int_at_least,
    model_folder,
    text_token_rows,
    writing_into,
)
from hf_qad.export.model_card import write_model_card
from hf_qad.export.modelopt import save_modelopt_checkpoint
from hf_qad.nvfp4.calibration import calibrate
from hf_qad.nvfp4.scale_search import SCALE_METHODS
from hf_qad.quantizer.config import NVFP4Config

EXPORT_FORMATS = ("compressed-tensors", "modelopt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=model_folder, help="BF16 checkpoint folder")
    add_output_arguments(parser, "where to write the packed NVFP4 checkpoint: a new or empty folder")
    parser.add_argument("--scheme", choices=("w4a4", "w4a16"), default="w4a4")
    parser.add_argument("--scale_method", choices=SCALE_METHODS, default="amax")
    parser.add_argument("--modules_to_not_convert", nargs="*", default=None, help="name patterns kept in BF16")
    parser.add_argument("--calibration_data", type=existing_path, help="text file or dataset (needed for W4A4)")
    parser.add_argument("--calibration_batches", type=int_at_least(1), default=8)
    parser.add_argument("--seq_len", type=int_at_least(2), default=512,
                        help="calibration row length (rows start with BOS when the tokenizer adds one)")
    parser.add_argument("--batch_size", type=int_at_least(1), default=4)
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="compressed-tensors")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")


def save_export(model, tokenizer, output_dir: str | Path, export_format: str) -> Path:
    """Write ``model`` as a packed NVFP4 checkpoint in ``export_format`` (compressed-tensors with its model card)."""
    if export_format == "modelopt":
        return save_modelopt_checkpoint(model, output_dir, tokenizer=tokenizer)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    write_model_card(model, output_dir)
    return Path(output_dir)


def run(args: argparse.Namespace) -> None:
    if args.scheme == "w4a4" and args.calibration_data is None:
        raise CommandError("W4A4 needs --calibration_data (a text file) to set activation scales, or use --scheme w4a16.")
    out = check_output_dir(args.output_dir, args.overwrite, [p for p in (args.model, args.calibration_data) if p])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = NVFP4Config(scheme=args.scheme, scale_method=args.scale_method,
                         modules_to_not_convert=args.modules_to_not_convert)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config, dtype=DTYPES[args.dtype])
    if args.scheme == "w4a4":
        rows = text_token_rows(args.calibration_data, tokenizer, args.seq_len,
                               args.calibration_batches * args.batch_size * args.seq_len)
        calibrate(model, batches(rows, args.batch_size, "calibrating"), num_batches=None)
    with torch.no_grad(), writing_into(out) as folder:
        save_export(model, tokenizer, folder, args.format)
    print(f"wrote packed NVFP4 ({args.scheme}, {args.format}) to {args.output_dir}")
