"""Fake-quant of fused experts ([E, N, K], one global scale per expert) vs the 2-D path on the same elements.

Run: PYTHONPATH=. python benchmarks/bench_expert_fake_quant.py  (CPU; the issue asks for a ratio >= 0.8).
"""

import time

import torch

from hf_qad.nvfp4 import cpu, format

E, N, K, REPEATS = 8, 768, 576, 5


def seconds(fn) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    return (time.perf_counter() - start) / REPEATS


def main() -> None:
    torch.manual_seed(0)
    experts = torch.randn(E, N, K, dtype=torch.bfloat16)
    per_expert = torch.cat([format.global_scale_from_amax(expert.abs().amax()) for expert in experts])
    flat, one = experts.reshape(E * N, K), per_expert[:1]
    flat_s = seconds(lambda: cpu.fake_quant(flat, one))
    experts_s = seconds(lambda: cpu.fake_quant(experts, per_expert))
    print(f"2-D [{E * N}, {K}], one global scale: {flat_s * 1e3:.1f} ms")
    print(f"experts [{E}, {N}, {K}], [E] global scales: {experts_s * 1e3:.1f} ms")
    print(f"experts / 2-D throughput: {flat_s / experts_s:.2f}")


if __name__ == "__main__":
    main()
