"""Issue 11's GPU measurements in one prepared run, printed as RESULTS.md-ready markdown.

Four sections, each timed (elapsed printed after it), in this order:

1. ``kernels``: ``tests/nvfp4/test_triton_kernels.py`` compiled on the GPU
   (``HF_QAD_TEST_DEVICE=cuda TRITON_INTERPRET=0``): every kernel against the reference, bit
   for bit, signed zeros included; the pass/fail count and the failing tests.
2. ``bandwidth``: the Triton fake-quant of weights (global scale from their amax: the fused
   reduction, then the fake-quant kernel, as ``NVFP4Linear`` runs it) and of activations
   (``fake_quant_activation``, static scale) against the card's copy bandwidth; goal >= 85%.
   (``bench_nvfp4.py``'s functions.)
3. ``matmul``: the W4A16 matmul (autotuned tiles) against cuBLAS's bf16 ``F.linear`` at batch
   1 and 16 (and 256, prefill) for 4096x4096 and 8192x8192 weights; goal >= 1x at batch 1
   and 16. The configs autotuning chose are listed under the table.
4. ``steps``: training steps of a randomly initialized Llama-3.2-1B-shaped model (1.24B
   parameters, no download), bf16 weights and autocast, sequence 2048: SFT, and QAD with a
   live BF16 teacher and with a cached teacher (top 32), for W4A4 and W4A16; step time and
   peak memory against SFT's, and a profiled step's breakdown (fake-quant, teacher forward,
   loss). Goal: QAD <= 1.40x SFT. (``bench_qad_step.py``'s workers, one process each.)

On an H200 the whole run is planned for under 8 minutes (batch 16 x 2048 tokens, 2 warm-up
and 3 timed steps per configuration, 5 timed batches of 20 kernel calls). A configuration
that runs out of GPU memory is reported as such; SFT, which runs first, halves the batch
until it fits, and every configuration then uses that batch.

``--dry-run`` runs every section end to end on the CPU with tiny shapes: Triton's interpreter
for the kernels, a 2-layer model for the steps (in this process), a few kernel tests. Its
numbers mean nothing; it checks that a GPU session will spend its time measuring
(``tests/test_gpu_suite.py`` runs it).

Usage:
    python benchmarks/gpu_suite.py                          # on a GPU, everything
    python benchmarks/gpu_suite.py --sections bandwidth,matmul
    python benchmarks/gpu_suite.py --dry-run                # CPU, about a minute

On the lent H200 (no network there; its image has torch and Triton but not TRL or datasets):
fetch the wheels of ``benchmarks/gpu_wheels.txt`` here, into a folder git ignores, with
``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl -r
benchmarks/gpu_wheels.txt``, carry ``.whl`` and run ``python3 -m pip install -q --no-index
--no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3
benchmarks/gpu_suite.py``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

from common import ROOT, git_commit, machine, markdown_table  # the checkout on sys.path

SECTIONS = ("kernels", "bandwidth", "matmul", "steps")
BUDGET_S = 8 * 60
"""The planned wall time of a full run on an H200."""
QAD_STEP_GOAL = 1.40
FAKE_QUANT_GOAL = 0.85
STEP_ROWS = (("sft", "w4a4"), ("qad", "w4a4"), ("qad_cache", "w4a4"), ("qad", "w4a16"), ("qad_cache", "w4a16"))
"""(bench_qad_step configuration, NVFP4 scheme) of each step-table row; SFT has no scheme."""


class Plan(NamedTuple):
    """What one run measures: the GPU's shapes and counts, or the dry run's."""

    device: str
    kernel_test_args: tuple[str, ...]  # pytest arguments after the test file
    kernel_test_workers: int  # pytest-xdist processes compiling kernels side by side (0: one process)
    weights: tuple[tuple[int, int], ...]
    activations: tuple[tuple[int, int], ...]
    repeats: int
    copy_bytes: int
    matmul_sizes: tuple[int, ...]
    matmul_batches: tuple[int, ...]
    step_options: tuple[str, ...]  # bench_qad_step.py options
    batch_size: int


GPU_PLAN = Plan(
    device="cuda", kernel_test_args=(), kernel_test_workers=8, weights=((4096, 4096), (8192, 8192)), activations=((8192, 4096), (16384, 4096)),
    repeats=5, copy_bytes=1 << 28, matmul_sizes=(4096, 8192), matmul_batches=(1, 16, 256),
    step_options=("--random-init", "llama-1b", "--dtype", "bfloat16", "--seq-len", "2048", "--warmup", "2",
                  "--steps", "3", "--profile", "--device", "cuda"),
    batch_size=16,
)
DRY_RUN_PLAN = Plan(
    device="cpu",
    kernel_test_args=("-k", "signed_zeros or global_scale_reduces or fused_one"), kernel_test_workers=0,
    weights=((32, 64),), activations=((16, 64),), repeats=1, copy_bytes=1 << 20, matmul_sizes=(64,),
    matmul_batches=(1, 16),
    step_options=("--tiny", "--dtype", "float32", "--seq-len", "32", "--warmup", "1", "--steps", "1", "--profile",
                  "--device", "cpu"),
    batch_size=2,
)


# --------------------------------------------------------------------------- sections
def kernel_tests(plan: Plan) -> str:
    """The Triton kernel tests on the plan's device (compiled on CUDA), summarized."""
    env = {**os.environ, "HF_QAD_TEST_DEVICE": plan.device, "TRITON_INTERPRET": "0" if plan.device == "cuda" else "1"}
    args = list(plan.kernel_test_args)
    if plan.kernel_test_workers and importlib.util.find_spec("xdist") is not None:
        args += ["-n", str(plan.kernel_test_workers)]  # compiling the kernels is most of the time
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header",
               "tests/nvfp4/test_triton_kernels.py", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = result.stdout.splitlines()
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)),
                   f"pytest exited {result.returncode} without a summary:\n{result.stderr[-2000:]}")
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    shown = " ".join(f"{key}={value}" for key, value in env.items() if key in ("HF_QAD_TEST_DEVICE", "TRITON_INTERPRET"))
    text = f"`{shown} pytest tests/nvfp4/test_triton_kernels.py {' '.join(args)}`: **{summary}**"
    return text + "".join(f"\n- {line}" for line in failed)


def bandwidth(plan: Plan, device_name: str) -> str:
    """Fake-quant throughput against the copy bandwidth (bench_nvfp4.py's rows)."""
    from bench_nvfp4 import FAKE_QUANT_HEADERS, Case, copy_bandwidth, triton_fake_quant_rows

    from hf_qad.nvfp4 import triton_kernels

    cases = [Case("weight", shape, False) for shape in plan.weights]
    cases += [Case("activation", shape, True) for shape in plan.activations]
    copy = copy_bandwidth(plan.repeats, plan.device, plan.copy_bytes)
    rows = triton_fake_quant_rows(triton_kernels, False, plan.repeats, copy, plan.device, cases)
    table = markdown_table(FAKE_QUANT_HEADERS, rows)
    return (f"### {device_name}: Triton fake-quant (copy bandwidth {copy / 1e9:.0f} GB/s, read + written; "
            f"goal >= {FAKE_QUANT_GOAL:.0%})\n\nGB/s counts the tensor read once and the result written once; a "
            "weight is read twice (its amax, then the fake-quant), so 2/3 of the copy's bandwidth is its ceiling "
            f"unless the second read hits the L2.\n\n{table}\n\n{tuned_configs(triton_kernels, matmul=False)}")


def matmul(plan: Plan, device_name: str) -> str:
    """W4A16 against the bf16 linear (bench_nvfp4.py's rows), and the tiles autotuning chose."""
    from bench_nvfp4 import MATMUL_HEADERS, w4a16_rows

    from hf_qad.nvfp4 import triton_kernels

    rows = w4a16_rows(triton_kernels, False, plan.repeats, plan.device, plan.matmul_sizes, plan.matmul_batches)
    return (f"### {device_name}: W4A16 matmul vs bf16 linear (goal >= 1x at batch 1 and 16)\n\n"
            f"{markdown_table(MATMUL_HEADERS, rows)}\n\n{tuned_configs(triton_kernels, matmul=True)}")


def tuned_configs(triton_kernels, matmul: bool) -> str:
    """What autotuning chose in this run, the matmul's tiles or the elementwise kernels' programs."""
    lines = [f"- {key[0]} {', '.join(map(str, key[1:-1]))}: {config}"
             for key, config in triton_kernels.tuned_configs().items() if (key[0] == "_w4a16_kernel") == matmul]
    return "Autotuned configs:\n" + ("\n".join(lines) if lines else "none (autotuning runs on CUDA only)")


def _is_oom(error: Exception) -> bool:
    return "out of memory" in str(error).lower() or "OutOfMemoryError" in str(error)


def _step_runner(plan: Plan, workdir: str) -> Callable[[str, str, int], dict]:
    """Runs one step configuration: a worker process per configuration on a GPU, in this process otherwise."""
    import bench_qad_step

    def run(config: str, scheme: str, batch_size: int) -> dict:
        opts = bench_qad_step.parse_args([*plan.step_options, "--scheme", scheme, "--batch-size", str(batch_size)])
        if plan.device == "cuda":
            return bench_qad_step.run_step(config, opts, workdir)
        opts.workdir = workdir
        return bench_qad_step.run_step_config(config, opts)

    return run


def _share(profile: dict | None, part: str, step_s: float) -> str:
    if not profile:
        return "n/a"
    return f"{profile[part] * 1e3:.0f} ms ({profile[part] / step_s:.1%})"


def steps(plan: Plan) -> str:
    """The step table: SFT and QAD (live and cached teacher) for W4A4 and W4A16, with a breakdown."""
    import bench_qad_step

    results: dict[tuple[str, str], dict | str] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as workdir:
        run = _step_runner(plan, workdir)
        batch = plan.batch_size
        while True:  # SFT first: the batch that fits it is the batch of every row
            try:
                results[STEP_ROWS[0]] = run(*STEP_ROWS[0], batch)
                break
            except RuntimeError as error:
                if not _is_oom(error) or batch == 1:
                    raise
                batch //= 2
                print(f"SFT ran out of memory: batch {batch}", file=sys.stderr, flush=True)
        for config, scheme in STEP_ROWS[1:]:
            try:
                results[config, scheme] = run(config, scheme, batch)
            except RuntimeError as error:
                if not _is_oom(error):
                    raise
                results[config, scheme] = "out of memory"
            print(f"{config} {scheme}: {results[config, scheme]}", file=sys.stderr, flush=True)
    opts = bench_qad_step.parse_args([*plan.step_options, "--batch-size", str(batch)])
    sft = results[STEP_ROWS[0]]
    labels = {**bench_qad_step.STEP_CONFIGS, **bench_qad_step.EXTRA_STEP_CONFIGS, "qad": "QAD live teacher"}
    table, goals = [], []
    for (config, scheme), result in results.items():
        label, nvfp4 = labels[config], "none" if config == "sft" else scheme.upper()
        if isinstance(result, str):
            table.append([label, nvfp4, result, "", "", "", "", "", ""])
            continue
        step_s, peak = result["step_s"], result["peak_total_mib"]
        table.append([
            label, nvfp4, f"{step_s:.3f}", f"{step_s / sft['step_s']:.2f}x", f"{peak / 1024:.1f}",
            f"{peak / sft['peak_total_mib']:.2f}x",
            *(_share(result["profile_s"], part, step_s) for part in bench_qad_step.PROFILED),
        ])  # fmt: skip
        if config != "sft":
            ratio = step_s / sft["step_s"]
            goals.append(f"- {label} {nvfp4}: {ratio:.2f}x SFT ({'met' if ratio <= QAD_STEP_GOAL else 'missed'})")
    headers = ["configuration", "NVFP4", "step (s)", "vs SFT", "peak memory (GiB)", "vs SFT",
               *bench_qad_step.PROFILED]  # fmt: skip
    return (f"### Training step: {bench_qad_step.model_label(opts)}, batch {batch} x {opts.seq_len} tokens, "
            f"{opts.dtype} weights, bf16 autocast, AdamW; median of {opts.steps} steps after {opts.warmup} warm-up; "
            "the breakdown from one more, profiled step (kernel time on a GPU)\n\n"
            f"{markdown_table(headers, table)}\n\nGoal: QAD step <= {QAD_STEP_GOAL:.2f}x SFT\n" + "\n".join(goals))


# --------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shapes: checks every line runs (numbers mean nothing)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--batch-size", type=int, default=0, help="step-table batch (default: the plan's)")
    opts = parser.parse_args(argv)
    opts.sections = [s.strip() for s in opts.sections.split(",") if s.strip()]
    unknown = sorted(set(opts.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}: choose among {', '.join(SECTIONS)}.")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before hf_qad's Triton import
    import torch

    if not opts.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_suite.py needs a CUDA GPU; --dry-run checks it on the CPU.")
    plan = DRY_RUN_PLAN if opts.dry_run else GPU_PLAN
    if opts.batch_size:
        plan = plan._replace(batch_size=opts.batch_size)
    device_name = "CPU (dry run, Triton interpreter)" if opts.dry_run else torch.cuda.get_device_name()
    memory = "" if opts.dry_run else f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
    print(f"# gpu_suite: {datetime.date.today()}, commit {git_commit()}, {machine()}{memory}")
    print(f"\n`python benchmarks/gpu_suite.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    sections = {
        "kernels": lambda: "### Compiled kernels against the reference\n\n" + kernel_tests(plan),
        "bandwidth": lambda: bandwidth(plan, device_name),
        "matmul": lambda: matmul(plan, device_name),
        "steps": lambda: steps(plan),
    }
    started = time.time()
    for name in SECTIONS:
        if name not in opts.sections:
            continue
        section_start = time.time()
        print("\n" + sections[name](), flush=True)
        elapsed = time.time() - started
        print(f"\n({name}: {time.time() - section_start:.0f} s; {elapsed:.0f} s of the {BUDGET_S} s planned in all)",
              flush=True)
    if time.time() - started > BUDGET_S and not opts.dry_run:
        print(f"\nOver the planned {BUDGET_S} s: lower the step table's --batch-size or the sections next time.")


if __name__ == "__main__":
    main()
