"""Throughput of hf_qad's NVFP4 paths, as markdown tables with ratios from one run.

CPU: fake-quantization (quantize and dequantize) of bf16 weights, global scale from
their amax, and of bf16 activations with a static global scale, by

* hf_qad's CPU path (:mod:`hf_qad.nvfp4.cpu`),
* compressed-tensors' own pipeline on the same tensor (``generate_gparam``,
  ``calculate_qparams``, ``fake_quantize``, as in ``tests/ct_oracle.py``),
* a plain tensor copy (``clone``), the memory-bound limit of any such function,

with the ratios ours/CT and ours/copy and whether our result equals CT's bit for bit; and the
weight block-scale search of ``scale_method="four_over_six"`` / ``"mse"`` (which QAD runs on every
weight at every training forward), hf_qad's fast path against the readable reference, as a
multiple of one amax fake-quant of the same weight, with whether the two choose the same scales.

CUDA, when available: the Triton fake-quant as a share of the card's measured
device-to-device copy bandwidth (bytes read + written), against hf_qad's PyTorch path
run on the same GPU tensors (what ``HF_QAD_DISABLE_TRITON=1`` uses) and checked equal to
it bit for bit, and the W4A16 matmul against a bf16 ``torch.nn.functional.linear`` at
batch 1, 16 and 256. Weights are fake-quantized as ``NVFP4Linear`` does (global scale
from their amax, the Triton reduction, then the fake-quant kernel), activations as W4A4
inputs are (``fake_quant_activation``: the serving kernel's rounding, static scale). The
same functions run on CPU tensors under Triton's interpreter (``benchmarks/gpu_suite.py
--dry-run``), where the numbers mean nothing but every line runs.

Every number is a median over ``--repeats`` runs after one warm-up run; compare the
ratios, not the absolute numbers, across machines.

Usage:
    python benchmarks/bench_nvfp4.py            # the shapes of a 7-8B model
    python benchmarks/bench_nvfp4.py --quick    # small shapes, a few seconds
    python benchmarks/bench_nvfp4.py --skip-cpu # the GPU tables only (no compressed-tensors needed)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common import markdown_table  # the checkout on sys.path: tests.ct_oracle for CT's pipeline

from hf_qad.nvfp4 import cpu, reference
from hf_qad.nvfp4.format import global_scale_from_amax
from hf_qad.nvfp4.scale_search import SCALE_TARGETS

ACTIVATION_AMAX = 8.0
"""Calibrated amax of the activations' static global scale (some of randn * 3 saturates)."""


class Case(NamedTuple):
    """A tensor to fake-quantize and how its global scale is chosen."""

    label: str
    shape: tuple[int, int]
    static_scale: bool


def cases(quick: bool) -> list[Case]:
    """Weights (global scale from their amax) and activations (static global scale)."""
    if quick:
        return [
            Case("weight", (1024, 1024), False),
            Case("weight", (2048, 2048), False),
            Case("activation", (2048, 1024), True),
        ]
    return [
        Case("weight", (4096, 4096), False),
        Case("weight", (8192, 8192), False),
        Case("activation", (8192, 4096), True),
    ]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` on the CPU, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_median_seconds(fn: Callable[[], object], repeats: int, device: str, inner: int = 20) -> float:
    """Median time of one ``fn`` call on ``device``: CUDA events over ``inner`` calls, or the CPU clock."""
    if device != "cuda":
        return median_seconds(fn, repeats)
    return cuda_median_seconds(fn, repeats, inner)


def cuda_median_seconds(fn: Callable[[], object], repeats: int, inner: int = 20) -> float:
    """Median time of one ``fn`` call on the GPU, timed with CUDA events over ``inner`` calls."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / inner)
    return statistics.median(times)


def tensor_for(case: Case, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """A bf16 tensor shaped like ``case`` and its static global scale (``None`` for weights)."""
    g = torch.Generator(device=device).manual_seed(0)
    if case.static_scale:
        x = torch.randn(case.shape, generator=g, device=device) * 3
        return x.bfloat16(), global_scale_from_amax(torch.tensor(ACTIVATION_AMAX)).to(device)
    return (torch.randn(case.shape, generator=g, device=device) * 0.02).bfloat16(), None


def cpu_row(case: Case, repeats: int, ct_fake_quant: Callable | None) -> list[str]:
    """One CPU table row: throughputs in M elements/s, the ratios, and equality with CT."""
    x, global_scale = tensor_for(case)
    per_second = x.numel() / 1e6
    ours = per_second / median_seconds(lambda: cpu.fake_quant(x, global_scale), repeats)
    copy = per_second / median_seconds(x.clone, repeats)
    row = [case.label, "x".join(map(str, case.shape)), f"{ours:.0f}"]
    if ct_fake_quant is None:
        row += ["n/a", f"{copy:.0f}", "n/a", f"{ours / copy:.2f}", "n/a"]
        return row
    ct = per_second / median_seconds(lambda: ct_fake_quant(x, global_scale), repeats)
    same = torch.equal(cpu.fake_quant(x, global_scale), ct_fake_quant(x, global_scale))
    row += [f"{ct:.0f}", f"{copy:.0f}", f"{ours / ct:.1f}x", f"{ours / copy:.2f}", "yes" if same else "NO"]
    return row


def load_ct_fake_quant() -> Callable | None:
    """compressed-tensors' quantize-dequantize, or ``None`` when it is not installed."""
    try:
        from tests.ct_oracle import ct_fake_quant
    except ImportError:
        return None
    return ct_fake_quant


def cpu_report(quick: bool, repeats: int) -> str:
    ct_fake_quant = load_ct_fake_quant()
    headers = [
        "tensor (bf16)", "shape", "hf_qad CPU", "compressed-tensors", "copy",
        "ours/CT", "ours/copy", "= CT bits",
    ]  # fmt: skip
    rows = [cpu_row(case, repeats, ct_fake_quant) for case in cases(quick)]
    title = (
        f"### CPU fake-quant, M elements/s ({platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__})"
    )
    return title + "\n\n" + markdown_table(headers, rows)


def scale_search_rows(quick: bool, repeats: int) -> list[list[str]]:
    """One row per weight shape and searched method: milliseconds, ratios, and equality of the choices."""
    rows = []
    for case in cases(quick):
        if case.static_scale:
            continue
        x, _ = tensor_for(case)
        global_scale = cpu.global_scale(x)
        amax = median_seconds(lambda: cpu.fake_quant(x, global_scale), repeats)
        for method in ("four_over_six", "mse"):
            targets = SCALE_TARGETS[method]
            ours = median_seconds(lambda: cpu.search_block_scales(x, global_scale, targets), repeats)
            ref = median_seconds(lambda: reference.search_block_scales(x, global_scale, targets), repeats)
            same = torch.equal(cpu.search_block_scales(x, global_scale, targets).view(torch.uint8),
                               reference.search_block_scales(x, global_scale, targets).view(torch.uint8))
            rows.append([method, "x".join(map(str, case.shape)), f"{ours * 1e3:.1f}", f"{ref * 1e3:.1f}",
                         f"{ref / ours:.1f}x", f"{ours / amax:.1f}x", "yes" if same else "NO"])
    return rows


def scale_search_report(quick: bool, repeats: int) -> str:
    headers = ["method", "weight (bf16)", "hf_qad (ms)", "reference (ms)", "speed-up", "vs amax fake-quant",
               "= reference"]
    title = f"### CPU weight scale search, ms ({platform.machine()}, {torch.get_num_threads()} threads)"
    return title + "\n\n" + markdown_table(headers, scale_search_rows(quick, repeats))


def copy_bandwidth(repeats: int, device: str = "cuda", nbytes: int = 1 << 28) -> float:
    """The device's copy bandwidth in bytes/s (read + written), 256 MiB by default: beyond any L2."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / device_median_seconds(lambda: dst.copy_(src), repeats, device)


def fake_quant_ops(backend, case: Case) -> Callable:
    """What a layer runs on ``case``: weights ``fake_quant`` (global scale from their amax),
    activations ``fake_quant_activation`` (the run-time rounding, static scale)."""
    return backend.fake_quant_activation if case.static_scale else backend.fake_quant


def triton_fake_quant_rows(triton_kernels, quick: bool, repeats: int, bandwidth: float, device: str = "cuda",
                           case_list: list[Case] | None = None) -> list[list[str]]:
    """Triton fake-quant per case: time, bandwidth, its share of the copy's, and the PyTorch path's time."""
    rows = []
    for case in case_list or cases(quick):
        x, global_scale = tensor_for(case, device)
        ours, theirs = fake_quant_ops(triton_kernels, case), fake_quant_ops(cpu, case)
        seconds = device_median_seconds(lambda: ours(x, global_scale), repeats, device)
        torch_seconds = device_median_seconds(lambda: theirs(x, global_scale), repeats, device, inner=2)
        same = torch.equal(ours(x, global_scale), theirs(x, global_scale))
        moved = 2 * x.numel() * x.element_size()  # x read once, the result written once
        rows.append([
            case.label, "x".join(map(str, case.shape)), f"{seconds * 1e6:.0f}",
            f"{moved / seconds / 1e9:.0f}", f"{100 * moved / seconds / bandwidth:.0f}%",
            f"{torch_seconds * 1e6:.0f}", f"{torch_seconds / seconds:.1f}x", "yes" if same else "NO",
        ])  # fmt: skip
    return rows


def w4a16_rows(triton_kernels, quick: bool, repeats: int, device: str = "cuda", sizes: tuple[int, ...] = (),
               batches: tuple[int, ...] = (1, 16, 256)) -> list[list[str]]:
    """W4A16 matmul against a bf16 linear, per square weight size and batch size.

    The first call of each shape autotunes the tiles (on CUDA), outside the timed calls.
    """
    rows = []
    for n in sizes or ((1024, 2048) if quick else (4096, 8192)):
        weight = (torch.randn(n, n, device=device) * 0.02).bfloat16()
        packed, block_scale, global_scale = triton_kernels.quantize(weight)
        for batch in batches:
            x = torch.randn(batch, n, device=device).bfloat16()
            bf16 = device_median_seconds(lambda: F.linear(x, weight), repeats, device)
            w4 = device_median_seconds(
                lambda: triton_kernels.w4a16_linear(x, packed, block_scale, global_scale), repeats, device
            )
            rows.append([f"{n}x{n}", str(batch), f"{bf16 * 1e6:.1f}", f"{w4 * 1e6:.1f}", f"{bf16 / w4:.2f}x"])
    return rows


FAKE_QUANT_HEADERS = ["tensor (bf16)", "shape", "Triton fake-quant (us)", "GB/s", "of copy bandwidth",
                      "PyTorch path (us)", "Triton speed-up", "same bits"]
MATMUL_HEADERS = ["weight", "batch", "bf16 linear (us)", "W4A16 (us)", "W4A16 speed-up"]


def cuda_report(quick: bool, repeats: int) -> str:
    from hf_qad.nvfp4 import triton_kernels  # needs a GPU driver: imported only here

    bandwidth = copy_bandwidth(repeats)
    name = torch.cuda.get_device_name()
    fake_quant = markdown_table(FAKE_QUANT_HEADERS, triton_fake_quant_rows(triton_kernels, quick, repeats, bandwidth))
    matmul = markdown_table(MATMUL_HEADERS, w4a16_rows(triton_kernels, quick, repeats))
    return (
        f"### {name}: Triton fake-quant (copy bandwidth {bandwidth / 1e9:.0f} GB/s, read + written)"
        f"\n\n{fake_quant}\n\n### {name}: W4A16 matmul vs bf16 linear\n\n{matmul}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per number (median)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA tables")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_cpu:
        print(cpu_report(args.quick, args.repeats))
        print()
        print(scale_search_report(args.quick, args.repeats))
    if torch.cuda.is_available():
        print()
        print(cuda_report(args.quick, args.repeats))
    else:
        print("\n(no CUDA device: the Triton fake-quant and W4A16 matmul were not measured)")


if __name__ == "__main__":
    main()
