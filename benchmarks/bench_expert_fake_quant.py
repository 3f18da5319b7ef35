"""Fake-quant of fused experts ([E, N, K], one global scale per expert) vs the 2-D path on the same elements,
and NVFP4Experts' whole weight fake-quant (global scales per expert, then one batched call per projection).

Run: python benchmarks/bench_expert_fake_quant.py  (CPU; the issue asks for a ratio >= 0.8). Each case runs
REPEATS times, interleaved with its 2-D counterpart, and the fastest run counts: on a shared machine the
minimum is the least disturbed measurement.
"""

import time

import common  # noqa: F401  (puts the checkout first on sys.path)
import torch

from hf_qad.nvfp4 import cpu, format
from hf_qad.nvfp4.moe import NVFP4Experts

E, N, K, REPEATS = 8, 768, 576, 5


def fastest(*fns) -> list[float]:
    """The fastest of REPEATS runs of each function, the functions interleaved (after a warm-up)."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    for _ in range(REPEATS):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    torch.manual_seed(0)
    experts = torch.randn(E, N, K, dtype=torch.bfloat16)
    per_expert = torch.cat([format.global_scale_from_amax(expert.abs().amax()) for expert in experts])
    flat, one = experts.reshape(E * N, K), per_expert[:1]
    flat_s, experts_s = fastest(lambda: cpu.fake_quant(flat, one), lambda: cpu.fake_quant(experts, per_expert))
    # NVFP4Experts of a Qwen3-MoE-like layer whose gate_up_proj is the [E, N, K] above: [E, 2I, H] = [8, 768, 576]
    layer = NVFP4Experts(E, K, N // 2, quantize_activations=False, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.gate_up_proj.copy_(experts)
        layer.down_proj.normal_()
    elements = layer.gate_up_proj.numel() + layer.down_proj.numel()
    same = torch.randn(elements // K, K, dtype=torch.bfloat16)
    with torch.no_grad():
        same_s, layer_s = fastest(
            lambda: cpu.fake_quant(same, one),
            lambda: [layer.fake_quantized_weight(name) for name in ("gate_up_proj", "down_proj")],
        )
    print(common.machine())
    print(common.markdown_table(
        ["case", "elements", "2-D, one global scale (ms)", "experts (ms)", "experts / 2-D throughput"],
        [[f"cpu.fake_quant [{E}, {N}, {K}], [E] global scales", str(experts.numel()), f"{flat_s * 1e3:.1f}",
          f"{experts_s * 1e3:.1f}", f"{flat_s / experts_s:.2f}"],
         [f"NVFP4Experts E={E}, H={K}, I={N // 2}: gate_up_proj + down_proj", str(elements), f"{same_s * 1e3:.1f}",
          f"{layer_s * 1e3:.1f}", f"{same_s / layer_s:.2f}"]],
    ))  # fmt: skip


if __name__ == "__main__":
    main()
