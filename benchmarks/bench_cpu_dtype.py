"""bf16 against float32 matmuls on this CPU, natively and with the ISA capped at AVX2.

Whether bf16 is worth computing in on a CPU depends on the instructions it has: with
AVX512-BF16 or AMX, oneDNN runs bf16 matmuls natively; without them bf16 is emulated and
several times slower than float32 (7-9x measured on an AVX2 EPYC). ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` caps what ATen's kernels and oneDNN use, which should reproduce a CPU
without AVX-512 on an AVX-512 machine; this script checks that it does, by timing the same
``torch.nn.functional.linear`` calls in a child process per setting (the variables are read
once, when torch starts), and prints one markdown table with the bf16/float32 ratio per shape.
It also prints what :func:`hf_qad.devices.compute_dtype_choice` picks under each setting.

The shapes are SmolLM2-135M's (hidden 576, MLP 1536, vocabulary 49152): a training batch of
768 tokens through an MLP projection and a vocabulary slice of the head, and a generation step
of 8 rows.

Usage:
    python benchmarks/bench_cpu_dtype.py              # both settings, a table
    python benchmarks/bench_cpu_dtype.py --repeats 9  # more timed runs per cell
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import machine, markdown_table

SHAPES = [  # (tokens, in_features, out_features, what)
    (768, 576, 1536, "training batch, MLP up"),
    (768, 1536, 576, "training batch, MLP down"),
    (768, 576, 8192, "training batch, head slice"),
    (8, 576, 1536, "generation step, MLP up"),
]
SETTINGS = {
    "native": {},
    "AVX2 cap": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def time_linear(tokens: int, inp: int, out: int, dtype, repeats: int) -> float:
    """Median seconds of one ``F.linear`` of ``[tokens, inp] x [out, inp]^T`` in ``dtype``."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(tokens, inp, dtype=dtype)
    w = torch.randn(out, inp, dtype=dtype)
    calls = max(1, int(2e8 // (tokens * inp * out)))  # batches of ~0.2 GFLOP-pairs: small shapes are timed in bulk
    F.linear(x, w)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            F.linear(x, w)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def child(repeats: int) -> None:
    """Measure every shape in both dtypes under this process's environment; print JSON."""
    import torch

    from hf_qad.devices import compute_dtype_choice

    times = {f"{t}x{i}x{o}": [time_linear(t, i, o, dtype, repeats) for dtype in (torch.float32, torch.bfloat16)]
             for t, i, o, _ in SHAPES}
    dtype, why = compute_dtype_choice("cpu")
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "why": why,
                      "dtype": str(dtype).removeprefix("torch."),
                      "threads": torch.get_num_threads(), "times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.repeats)
        return
    print(machine())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {}
    for name, extra in SETTINGS.items():
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
        done = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                              env={**env, **extra}, check=True, capture_output=True, text=True)
        results[name] = json.loads(done.stdout.splitlines()[-1])
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, r in results.items():
        print(f"{name}: ATen capability {r['capability']}, {r['threads']} threads, "
              f"default compute dtype {r['dtype']}: {r['why']}")
    rows = []
    for t, i, o, what in SHAPES:
        row = [f"{t}x{i} @ {i}x{o}", what]
        for name in SETTINGS:
            f32, bf16 = results[name]["times"][f"{t}x{i}x{o}"]
            row += [f"{f32 * 1e3:.3f}", f"{bf16 * 1e3:.3f}", f"{bf16 / f32:.1f}x"]
        rows.append(row)
    headers = ["linear", "shape"]
    for name in SETTINGS:
        headers += [f"{name} float32 (ms)", f"{name} bf16 (ms)", f"{name} bf16/float32"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
