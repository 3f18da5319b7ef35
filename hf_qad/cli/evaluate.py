"""``hf-qad eval``: a student (fake-quant or packed) against its teacher.

Prints a table (KL, top-1 agreement, perplexity of each, optional ARC-style accuracy),
writes ``eval.json`` and ``eval.png`` (per-layer weight error: a packed student's
dequantized weights against the teacher's; KL by position).
The teacher must be the high-precision model the student was quantized from, with the
same tokenizer: both are checked before anything is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_qad.cli.common import (
    DTYPES,
    CommandError,
    batches,
    existing_path,
    int_at_least,
    load_model,
    model_folder,
    print_table,
    text_token_rows,
    write_json,
)
from hf_qad.devices import default_compute_dtype
from hf_qad.evaluation import compare_to_teacher, layer_quantization_errors, multiple_choice_accuracy
from hf_qad.plots import plot_evaluation
from hf_qad.quantizer.checkpoints import is_packed_export

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Any of these in a folder means it has a tokenizer (fast, slow, sentencepiece or BPE files)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, type=model_folder, help="NVFP4 model (packed or training checkpoint)")
    parser.add_argument("--teacher", required=True, type=model_folder, help="the BF16 model")
    parser.add_argument("--data", required=True, type=existing_path, help="held-out text file or dataset")
    parser.add_argument("--tokens", type=int_at_least(2), default=8192, help="evaluate on the first N tokens")
    parser.add_argument("--seq_len", type=int_at_least(2), default=512)
    parser.add_argument("--batch_size", type=int_at_least(1), default=4)
    parser.add_argument("--arc", type=existing_path, help="ARC-style multiple-choice .jsonl for accuracy")
    parser.add_argument("--arc_limit", type=int_at_least(1), default=None, help="score only the first N questions")
    parser.add_argument("--output_dir", default="hf_qad_eval", help="where eval.json and eval.png go")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=str(default_compute_dtype("cpu")).removeprefix("torch."),
                        help="compute dtype (default: bfloat16 where this CPU computes it natively, else float32: "
                             "%(default)s here)")


def read_arc_jsonl(path: str, limit: int | None) -> list[dict]:
    """The multiple-choice rows of an ARC-style ``.jsonl``, each checked (errors name the line)."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CommandError(f"{path}, line {number}: not JSON ({error.msg}).") from None
        problem = _arc_row_problem(row)
        if problem:
            raise CommandError(f"{path}, line {number}: {problem}; each line needs question, "
                               "choices {text: [...], label: [...]} and answerKey (one of the labels).")
        rows.append(row)
        if limit is not None and len(rows) == limit:
            break
    if not rows:
        raise CommandError(f"{path} has no questions.")
    return rows


def _arc_row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [key for key in ("question", "choices", "answerKey") if key not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    choices = row["choices"]
    if not isinstance(choices, dict) or not all(isinstance(choices.get(k), list) for k in ("text", "label")):
        return "choices must hold the lists text and label"
    if len(choices["text"]) != len(choices["label"]) or not choices["text"]:
        return "choices.text and choices.label must be non-empty and of the same length"
    if row["answerKey"] not in choices["label"]:
        return f"answerKey {row['answerKey']!r} is not one of the labels {choices['label']}"
    return None


def check_teacher_is_high_precision(teacher: str) -> None:
    """A quantized teacher (an NVFP4 export, any compressed-tensors or other quantized model) is refused.

    Its logits are not the reference: against a packed export of itself, KL reads 0 and agreement 1.
    """
    quantization = json.loads((Path(teacher) / "config.json").read_text()).get("quantization_config")
    if quantization:
        kind = quantization.get("format") or quantization.get("quant_method") or "quantized"
        raise CommandError(f"--teacher {teacher} is a quantized model ({kind}): the teacher must be the "
                           "high-precision (BF16) model the student was quantized from.")


def has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def check_same_vocabulary(student: str, teacher: str, teacher_tokenizer):
    """Refuse a student whose vocabulary differs from the teacher's; return the student's tokenizer.

    The models' vocabulary sizes must match, and the tokenizers' token-to-id maps when the
    student folder has a tokenizer (``None`` is returned, with a warning, when it has none).
    """
    sizes = {role: AutoConfig.from_pretrained(path).get_text_config().vocab_size
             for role, path in (("student", student), ("teacher", teacher))}
    if sizes["student"] != sizes["teacher"]:
        raise CommandError(f"the student's vocabulary has {sizes['student']} tokens and the teacher's "
                           f"{sizes['teacher']}: the teacher must be the model the student was quantized from.")
    if not has_tokenizer(student):
        print(f"hf-qad: warning: {student} has no tokenizer, so only the vocabulary sizes were compared; "
              "the teacher's tokenizer encodes the data for both.", file=sys.stderr)
        return None
    student_tokenizer = AutoTokenizer.from_pretrained(student)
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        token, _ = min(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: (item[1], item[0]))
        raise CommandError(f"the student's tokenizer ({student}) and the teacher's ({teacher}) have different "
                           f"vocabularies (first at token {token!r}): use the teacher the student was made from.")
    return student_tokenizer


def run(args: argparse.Namespace) -> None:
    check_teacher_is_high_precision(args.teacher)
    if not has_tokenizer(args.teacher):
        raise CommandError(f"--teacher {args.teacher} has no tokenizer: the teacher's folder needs the tokenizer "
                           "files (tokenizer.save_pretrained).")
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    student_tokenizer = check_same_vocabulary(args.student, args.teacher, tokenizer)
    questions = read_arc_jsonl(args.arc, args.arc_limit) if args.arc else None
    rows = text_token_rows(args.data, tokenizer, args.seq_len, args.tokens)
    if student_tokenizer is not None and not torch.equal(
            rows, text_token_rows(args.data, student_tokenizer, args.seq_len, args.tokens)):
        raise CommandError(f"the student's tokenizer ({args.student}) and the teacher's ({args.teacher}) have one "
                           f"vocabulary but encode {args.data} differently (other merges, normalization or BOS): "
                           "use the teacher the student was made from.")
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=DTYPES[args.dtype])
    student = load_model(args.student, dtype=DTYPES[args.dtype])
    try:
        errors = layer_quantization_errors(student, reference=teacher)
    except ValueError as error:
        raise CommandError(f"--teacher {args.teacher}: {error}") from error
    result = compare_to_teacher(student, teacher, batches(rows, args.batch_size, "evaluating"))
    summary = {"model": "student", "kl": result.kl, "top1_agreement": result.top1_agreement,
               "perplexity": result.student_ppl}
    teacher_row = {"model": "teacher", "kl": 0.0, "top1_agreement": 1.0, "perplexity": result.teacher_ppl}
    if questions is not None:
        summary["arc_accuracy"] = multiple_choice_accuracy(student, tokenizer, questions)
        teacher_row["arc_accuracy"] = multiple_choice_accuracy(teacher, tokenizer, questions)
    columns = ["model", "perplexity", "kl", "top1_agreement"] + (["arc_accuracy"] if args.arc else [])
    print(f"{result.tokens} predicted tokens from {args.data}")
    print_table([teacher_row, summary], columns)
    output = Path(args.output_dir)
    write_json(output / "eval.json", {"student": summary, "teacher": teacher_row, "tokens": result.tokens,
                                      "kl_by_position": result.kl_by_position, "layer_errors": errors})
    reference = "the teacher's weight" if is_packed_export(args.student) else "the master weight"
    plot_evaluation(errors, {"student": result.kl_by_position}, output / "eval.png", weight_reference=reference)
    print(f"wrote {output / 'eval.json'} and {output / 'eval.png'}")
