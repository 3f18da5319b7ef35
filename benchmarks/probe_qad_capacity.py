"""How close QAD can bring an NVFP4 W4A4 student to its teacher on text it trains on.

A capacity probe for the accuracy bar of ``bench_accuracy.py`` (KL to BF16 at most a quarter
of PTQ's, top-1 agreement at least 0.90), not a benchmark row: it trains QAD on the evaluation
rows themselves, the first ``--eval-tokens`` of WikiText-2 validation, for ``--epochs`` epochs,
and measures KL, agreement and perplexity on those same rows before training and after every
epoch. What QAD cannot reach on text it has seen many times, more data of the same kind will
not reach on text it has not seen, so the curve bounds what longer runs could give.

Everything else is ``bench_accuracy.py``'s QAD: SmolLM2-135M-Instruct teacher in BF16, W4A4
student with float32 masters calibrated on the training rows, forward KL, AdamW, cosine
schedule with 10% warm-up, batch 4 x 512 tokens, learning rate ``--lr`` (1e-4, the one
chosen there on held-out training text); weight block scales from each block's amax, or searched
at every forward with ``--train-scale-method mse``.

Usage:
    python benchmarks/probe_qad_capacity.py --threads 2            # 8 epochs of 8,192 tokens
    python benchmarks/probe_qad_capacity.py --epochs 2 --eval-tokens 2048
    python benchmarks/probe_qad_capacity.py --train-scale-method mse --output probe_mse.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

from bench_accuracy import EVAL_TEXT, batches, load_student, load_teacher, token_stream, train_config
from common import machine

from hf_qad.evaluation import chunk_token_ids, compare_to_teacher, leading_bos_id
from hf_qad.smollm2 import smollm2_path
from hf_qad.trainer import QADTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="WikiText-2 validation tokens (rows of 512)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-scale-method", default="amax", choices=("amax", "four_over_six", "mse"),
                        help="NVFP4 weight block scales of the student, searched at every forward when not amax")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="JSON file for the curve (default: print only)")
    return parser.parse_args(argv)


class EpochProbe(TrainerCallback):
    """Measures the student against the teacher on the training rows after every epoch."""

    def __init__(self, measure) -> None:
        self.measure = measure
        self.curve: list[dict] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        self.curve.append({"epoch": round(state.epoch), **self.measure(model)})
        print(json.dumps(self.curve[-1]), flush=True)
        model.train(was_training)


def main(argv: list[str] | None = None) -> list[dict]:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = chunk_token_ids(token_stream(tokenizer, EVAL_TEXT, opts.eval_tokens + 1), opts.seq_len,
                           bos_token_id=leading_bos_id(tokenizer))
    teacher = load_teacher(path, opts.device)
    student = load_student(path, opts.train_scale_method, rows, opts.batch_size, opts.device)

    def measure(model) -> dict:
        result = compare_to_teacher(model, teacher, [b.to(opts.device) for b in batches(rows, opts.batch_size)])
        return {"kl": result.kl, "top1_agreement": result.top1_agreement, "perplexity": result.student_ppl,
                "teacher_perplexity": result.teacher_ppl}

    student.eval()
    curve = [{"epoch": 0, **measure(student)}]
    print(json.dumps(curve[0]), flush=True)
    ids = rows.tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    probe = EpochProbe(measure)
    started = time.perf_counter()
    with TemporaryDirectory() as work:
        args = argparse.Namespace(batch_size=opts.batch_size, train_tokens=len(ids) * opts.seq_len * opts.epochs,
                                  seq_len=opts.seq_len, seed=opts.seed, device=opts.device,
                                  train_scale_method=opts.train_scale_method)
        config = train_config(args, Path(work), opts.lr, num_train_epochs=opts.epochs, logging_steps=1)
        trainer = QADTrainer(student, teacher=teacher, args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[probe])
        trainer.train()
    curve += probe.curve
    train_s = time.perf_counter() - started
    ptq = curve[0]["kl"]
    print(f"# probe_qad_capacity: {datetime.date.today()}, {machine()}, threads {opts.threads}")
    print(f"\n`python benchmarks/probe_qad_capacity.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"QAD (lr {opts.lr}, {opts.train_scale_method} weight scales) trained and measured on the same {rows.numel():,} WikiText-2 validation tokens "
          f"({rows.shape[0]} rows of {opts.seq_len}); {train_s:.0f} s of training and probing.\n")
    print("| epoch | KL to BF16 | vs PTQ | top-1 agreement | perplexity (BF16 "
          f"{curve[0]['teacher_perplexity']:.2f}) |")
    print("|---:|---:|---:|---:|---:|")
    for point in curve:
        print(f"| {point['epoch']} | {point['kl']:.3f} | {point['kl'] / ptq:.2f}x | {point['top1_agreement']:.3f} | "
              f"{point['perplexity']:.2f} |")
    if opts.output:
        Path(opts.output).write_text(json.dumps({"curve": curve, "train_s": train_s, "options": vars(opts)}, indent=1))
    return curve


if __name__ == "__main__":
    main()
