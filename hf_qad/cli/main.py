"""Entry point of the ``hf-qad`` command."""

from __future__ import annotations

import argparse
import io
import sys

from hf_qad.cli import evaluate, export, quantize
from hf_qad.cli.common import CommandError

DESCRIPTION = """\
Quantization-aware distillation (QAD) to NVFP4.

  hf-qad demo       the whole story on SmolLM2-135M-Instruct, offline: BF16 vs PTQ vs QAD
  hf-qad train      a QAD run (every QADConfig/NVFP4 field is a flag; --config run.yaml)
  hf-qad quantize   PTQ: calibrate and export packed NVFP4 (the baseline)
  hf-qad eval       a student against its teacher: KL, agreement, perplexity, ARC accuracy
  hf-qad export     a training checkpoint to packed NVFP4 (compressed-tensors or ModelOpt)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-qad", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("train", help="QAD training run (see: hf-qad train --help)", add_help=False)
    from hf_qad.cli import demo

    for name, module, text in (
        ("demo", demo, "offline demo on SmolLM2-135M-Instruct"),
        ("quantize", quantize, "post-training quantization to packed NVFP4"),
        ("eval", evaluate, "compare a student with its teacher"),
        ("export", export, "training checkpoint to packed NVFP4"),
    ):
        sub = commands.add_parser(name, help=text, description=(module.__doc__ or "").strip(),
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Progress lines go to stdout and progress bars to stderr; piped into one log, a
    # block-buffered stdout would print the lines minutes after the bars they belong to.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        if argv and argv[0] == "train":
            from hf_qad.cli import train  # TRL's parser handles its own flags, --help and --config

            train.run(argv[1:])
            return
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            raise SystemExit(2)
        args.run(args)
    except CommandError as error:
        print(error, file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
