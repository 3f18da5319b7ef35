"""``hf-qad eval``: a student (fake-quant or packed) against its teacher.

Prints a table (KL, top-1 agreement, perplexity of each, optional ARC-style accuracy),
writes ``eval.json`` and ``eval.png`` (per-layer weight error; KL by position).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_qad.cli.common import DTYPES, batches, existing_path, load_model, print_table, text_token_rows, write_json
from hf_qad.devices import default_compute_dtype
from hf_qad.evaluation import compare_to_teacher, layer_quantization_errors, multiple_choice_accuracy
from hf_qad.plots import plot_evaluation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, type=existing_path, help="NVFP4 model (packed or training checkpoint)")
    parser.add_argument("--teacher", required=True, type=existing_path, help="the BF16 model")
    parser.add_argument("--data", required=True, type=existing_path, help="held-out text file or dataset")
    parser.add_argument("--tokens", type=int, default=8192, help="evaluate on the first N tokens")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--arc", type=existing_path, help="ARC-style multiple-choice .jsonl for accuracy")
    parser.add_argument("--arc_limit", type=int, default=None, help="score only the first N questions")
    parser.add_argument("--output_dir", default="hf_qad_eval", help="where eval.json and eval.png go")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=str(default_compute_dtype("cpu")).removeprefix("torch."),
                        help="compute dtype (default: bfloat16 where this CPU computes it natively, else float32: "
                             "%(default)s here)")


def read_jsonl(path: str, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit is not None else rows


def run(args: argparse.Namespace) -> None:
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=DTYPES[args.dtype])
    student = load_model(args.student, dtype=DTYPES[args.dtype])
    rows = text_token_rows(args.data, tokenizer, args.seq_len, args.tokens)
    result = compare_to_teacher(student, teacher, batches(rows, args.batch_size, "evaluating"))
    summary = {"model": "student", "kl": result.kl, "top1_agreement": result.top1_agreement,
               "perplexity": result.student_ppl}
    teacher_row = {"model": "teacher", "kl": 0.0, "top1_agreement": 1.0, "perplexity": result.teacher_ppl}
    if args.arc:
        questions = read_jsonl(args.arc, args.arc_limit)
        summary["arc_accuracy"] = multiple_choice_accuracy(student, tokenizer, questions)
        teacher_row["arc_accuracy"] = multiple_choice_accuracy(teacher, tokenizer, questions)
    columns = ["model", "perplexity", "kl", "top1_agreement"] + (["arc_accuracy"] if args.arc else [])
    print(f"{result.tokens} predicted tokens from {args.data}")
    print_table([teacher_row, summary], columns)
    output = Path(args.output_dir)
    errors = layer_quantization_errors(student)
    write_json(output / "eval.json", {"student": summary, "teacher": teacher_row, "tokens": result.tokens,
                                      "kl_by_position": result.kl_by_position, "layer_errors": errors})
    plot_evaluation(errors, {"student": result.kl_by_position}, output / "eval.png")
    print(f"wrote {output / 'eval.json'} and {output / 'eval.png'}")
