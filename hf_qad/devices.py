"""Where to compute and in which dtype: bf16 only where the device computes it natively.

On x86 CPUs without AVX512-BF16 (AMX-BF16 CPUs have it too), bf16 matmuls are emulated and
several times slower than float32 (7-9x measured on an AVX2 EPYC; see
``benchmarks/bench_cpu_dtype.py``), so the CLI's defaults compute in float32 there. The ISA caps
that torch and oneDNN honour, ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA``, count: below
AVX-512 (ATen) or below ``AVX512_CORE_BF16`` (oneDNN), this CPU is treated as one without native
bf16, as those libraries will then run it.
"""

from __future__ import annotations

import os
import platform

import torch

# oneDNN's ISA names in increasing order (its docs, "CPU ISA Hints"); bf16 dot products from AVX512_CORE_BF16 on.
_ONEDNN_ISAS = ["SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL"]


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 matmuls natively as torch runs them, and why, in words.

    x86: AVX512-BF16 in hardware, ATen's kernels at AVX-512 (``ATEN_CPU_CAPABILITY`` not lower) and
    oneDNN allowed AVX512_CORE_BF16 (``ONEDNN_MAX_CPU_ISA`` not lower). ARM64: the BF16 extension.

    >>> native, why = cpu_bf16_support()
    >>> isinstance(native, bool) and why.startswith("this CPU ")
    True
    """
    arch = platform.machine().lower()
    if arch in ("x86_64", "amd64", "i686", "x86"):
        if not torch.cpu._is_avx512_bf16_supported():
            return False, "this CPU has no AVX512-BF16 or AMX (bf16 matmuls are emulated, several times slower)"
        capability = torch.backends.cpu.get_cpu_capability()
        if capability != "AVX512":
            return False, f"this CPU is capped at {capability} by ATEN_CPU_CAPABILITY (bf16 is emulated below AVX-512)"
        isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
        if isa in _ONEDNN_ISAS and _ONEDNN_ISAS.index(isa) < _ONEDNN_ISAS.index("AVX512_CORE_BF16"):
            return False, f"this CPU is capped at {isa} by ONEDNN_MAX_CPU_ISA (bf16 is emulated below AVX512_CORE_BF16)"
        return True, "this CPU computes bf16 natively (AVX512-BF16)"
    if arch in ("aarch64", "arm64"):
        # get_capabilities: torch >= 2.10; older versions cannot tell, and float32 is never the slow choice.
        if getattr(torch.cpu, "get_capabilities", dict)().get("bf16", False):
            return True, "this CPU computes bf16 natively (ARM BF16 extension)"
        return False, "this CPU has no ARM BF16 extension that torch reports"
    return False, f"this CPU ({arch or 'unknown'}) has no native bf16 that hf_qad knows of"


def compute_dtype_choice(device: torch.device | str) -> tuple[torch.dtype, str]:
    """The dtype to compute in on ``device`` by default, and why, in words for a log line.

    bf16 where the device computes it natively; float32 otherwise (a CPU without AVX512-BF16, a
    GPU before Ampere: float16 would be native there but needs loss scaling, so it stays a choice).

    >>> dtype, why = compute_dtype_choice("cpu")
    >>> dtype in (torch.bfloat16, torch.float32) and why.startswith("this CPU ")
    True
    """
    device = torch.device(device)
    if device.type == "cpu":
        native, why = cpu_bf16_support()
    elif device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        why = f"this GPU {'computes' if native else 'does not compute'} bf16 natively"
    else:  # xpu, mps, npu, hpu: the accelerator's own bf16, as transformers and TRL default to
        native, why = True, f"{device.type} computes bf16"
    return (torch.bfloat16 if native else torch.float32), why


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where ``device`` computes it natively, else float32 (see :func:`compute_dtype_choice`).

    >>> default_compute_dtype("cpu") in (torch.bfloat16, torch.float32)
    True
    """
    return compute_dtype_choice(device)[0]


def default_device() -> torch.device:
    """The accelerator torch finds (CUDA, XPU, MPS, ...), else the CPU.

    >>> default_device().type in ("cpu", "cuda", "xpu", "mps", "npu", "hpu", "mtia")
    True
    """
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return accelerator or torch.device("cpu")
