"""hf_qad.devices: bf16 only where the device computes it natively, and the ISA caps users set."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_qad import devices
from hf_qad.devices import compute_dtype_choice, cpu_bf16_support, default_compute_dtype, default_device


@pytest.fixture
def x86(monkeypatch):
    """An x86 CPU with AVX512-BF16 and ATen at AVX-512, no oneDNN cap: each test takes one of these away."""
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    return monkeypatch


def test_a_cpu_with_avx512_bf16_computes_in_bf16(x86):
    assert compute_dtype_choice("cpu") == (torch.bfloat16, "this CPU computes bf16 natively (AVX512-BF16)")


def test_a_cpu_without_avx512_bf16_computes_in_float32(x86):
    x86.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    dtype, why = compute_dtype_choice(torch.device("cpu"))
    assert dtype == torch.float32 and "no AVX512-BF16 or AMX" in why


def test_aten_capped_below_avx512_computes_in_float32(x86):
    x86.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_bf16_support() == (False, "this CPU is capped at AVX2 by ATEN_CPU_CAPABILITY "
                                         "(bf16 is emulated below AVX-512)")


@pytest.mark.parametrize(("isa", "native"), [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False),
                                             ("avx512_core_bf16", True), ("AVX512_CORE_AMX", True), ("ALL", True),
                                             ("not-an-isa", True)])  # oneDNN ignores a value it does not know
def test_onednn_max_cpu_isa_below_avx512_core_bf16_computes_in_float32(x86, isa, native):
    x86.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert default_compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    if not native:
        assert f"capped at {isa.upper()} by ONEDNN_MAX_CPU_ISA" in cpu_bf16_support()[1]


def test_onednn_old_variable_name_counts_too(x86):
    x86.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert default_compute_dtype("cpu") == torch.float32


@pytest.mark.parametrize(("capabilities", "dtype"), [({"bf16": True}, torch.bfloat16), ({"neon": True}, torch.float32)])
def test_arm_computes_in_bf16_with_the_bf16_extension(monkeypatch, capabilities, dtype):
    monkeypatch.setattr(devices.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert default_compute_dtype("cpu") == dtype


@pytest.mark.parametrize(("native", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_a_gpu_computes_in_bf16_only_where_it_is_native(monkeypatch, native, dtype):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: calls.append(including_emulation)
                        or native)
    assert default_compute_dtype("cuda:0") == dtype and calls == [False]  # emulated bf16 (pre-Ampere) is not native


def test_default_device_is_the_cpu_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert default_device() == torch.device("cuda")


def test_aten_cpu_capability_is_read_from_torch_itself():
    """The variable as a user sets it, in a fresh process: torch's own capability query reports the cap."""
    code = ("import torch; torch.cpu._is_avx512_bf16_supported = lambda: True\n"
            "from hf_qad.devices import cpu_bf16_support; print(cpu_bf16_support()[1])")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "capped at AVX2 by ATEN_CPU_CAPABILITY" in out
