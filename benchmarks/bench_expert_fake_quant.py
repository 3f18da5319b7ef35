"""Fake-quant of fused experts ([E, N, K], one global scale per expert) vs the 2-D path on the same elements,
and NVFP4Experts' weight fake-quant (both projections: global scales, then one batched call each).

Run: PYTHONPATH=. python benchmarks/bench_expert_fake_quant.py  (CPU; the issue asks for a ratio >= 0.8).
"""

import time

import torch

from hf_qad.nvfp4 import cpu, format
from hf_qad.nvfp4.moe import NVFP4Experts

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
    # NVFP4Experts of a Qwen3-MoE-like layer whose gate_up_proj is the [E, N, K] above: [E, 2I, H] = [8, 768, 576]
    layer = NVFP4Experts(E, K, N // 2, quantize_activations=False, dtype=torch.bfloat16)
    layer.gate_up_proj.data.copy_(experts)
    torch.nn.init.normal_(layer.down_proj)
    elements = layer.gate_up_proj.numel() + layer.down_proj.numel()
    same = torch.randn(elements // K, K, dtype=torch.bfloat16)
    same_s = seconds(lambda: cpu.fake_quant(same, one))
    with torch.no_grad():
        layer_s = seconds(lambda: [layer.fake_quantized_weight(name) for name in ("gate_up_proj", "down_proj")])
    print(f"NVFP4Experts gate_up_proj + down_proj ({elements} elements): {layer_s * 1e3:.1f} ms; "
          f"2-D on as many elements: {same_s * 1e3:.1f} ms; ratio {same_s / layer_s:.2f}")


if __name__ == "__main__":
    main()
