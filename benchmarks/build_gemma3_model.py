"""A small Gemma 3-architecture language model, pretrained here: issue 12's second model family, offline.

Issue 12 asks for QAD's defaults to be chosen on at least two model families. The only real checkpoint
that installs offline is SmolLM2-135M (a Llama), so this script builds a second one of another
architecture: ``Gemma3ForCausalLM`` (GeGLU MLPs, q/k norms, norms before and after each sublayer, the
embedding scaled by sqrt(hidden), sliding-window and global attention layers), with SmolLM2's
tokenizer, pretrained from random weights with next-token cross-entropy on WikiText-2 *test*.

The text is chosen so that ``bench_accuracy.py --model`` can run its own protocol on it unchanged:
QAD trains on TinyStories + TinyShakespeare (off-domain for this model, as for SmolLM2) and is measured
on WikiText-2 *validation*, the model's own domain, which it never saw (validation and test are
different articles).

It is a small model trained on about a million tokens, not a product: what it can show is whether the
defaults chosen on SmolLM2 (learning rate, the ``mse`` scale search) point the same way on an
architecture whose activations differ, not what a large Gemma does. The numbers are in RESULTS.md.

Usage:
    python benchmarks/build_gemma3_model.py                 # ~25 CPU-minutes; prints the loss curve
    python benchmarks/bench_accuracy.py --model ~/.cache/hf_qad/gemma3-wikitext --methods qad --lr 1e-5
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from bench_accuracy import token_stream
from hf_qad.evaluation import chunk_token_ids, leading_bos_id
from hf_qad.smollm2 import smollm2_path

TEXT = "wikitext2_test.txt"
DEFAULT_OUTPUT = Path.home() / ".cache" / "hf_qad" / "gemma3-wikitext"


def gemma3_config(tokenizer, hidden: int, layers: int) -> Gemma3TextConfig:
    """Gemma 3's layout at a small width: one global-attention layer after every few sliding-window ones."""
    return Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4,
        sliding_window=128, layer_types=["full_attention" if (i + 1) % 3 == 0 else "sliding_attention"
                                         for i in range(layers)],
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder for the BF16 checkpoint")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the text")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    rows = chunk_token_ids(token_stream(tokenizer, TEXT), args.seq_len, bos_token_id=leading_bos_id(tokenizer))
    model = Gemma3ForCausalLM(gemma3_config(tokenizer, args.hidden, args.layers))
    steps = math.ceil(args.epochs * rows.shape[0] / args.batch_size)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {TEXT}: {rows.shape[0]} rows of "
          f"{args.seq_len} tokens; {steps} steps of {args.batch_size} rows", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    started = time.perf_counter()
    model.train()
    step = 0
    while step < steps:
        for batch in rows[torch.randperm(rows.shape[0])].split(args.batch_size):
            if step == steps:
                break
            # bf16 matmuls under autocast: float32 masters, as a pretraining run would use.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % max(1, steps // 20) == 0 or step == steps:
                print(f"step {step}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f}s", flush=True)
    model.to(torch.bfloat16).save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"saved {args.output}", flush=True)
    return args.output


if __name__ == "__main__":
    main()
