"""benchmarks/gpu_suite.py end to end on the CPU (``--dry-run``), so that GPU time is spent measuring."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_prints_every_section():
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--dry-run"], cwd=ROOT, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    kernels = re.search(r"pytest tests/nvfp4/test_triton_kernels.py .*\*\*(.*)\*\*", out)
    assert kernels and re.search(r"\d+ passed", kernels.group(1)) and "failed" not in kernels.group(1), out
    fake_quant = [line for line in out.splitlines() if re.match(r"\| (weight|activation) \| \d+x\d+ \|", line)]
    assert len(fake_quant) == 2 and all(line.rstrip(" |").endswith("yes") for line in fake_quant), out  # same bits
    assert len([line for line in out.splitlines() if line.startswith("| 64x64 |")]) == 2  # batch 1 and 16
    steps = {line.split("|")[1].strip() + " " + line.split("|")[2].strip() for line in out.splitlines()
             if line.startswith(("| SFT |", "| QAD "))}
    assert steps == {"SFT none", "QAD live teacher W4A4", "QAD live teacher W4A16", "QAD cached teacher (top 32) W4A4",
                     "QAD cached teacher (top 32) W4A16"}, out
    qad_fake_quant = [line.split("|")[7] for line in out.splitlines() if line.startswith("| QAD live teacher |")]
    assert all(not cell.strip().startswith("0 ms") for cell in qad_fake_quant), out  # the profiler saw fake-quant
    for section in ("kernels", "bandwidth", "matmul", "steps"):
        assert re.search(rf"\({section}: \d+ s; \d+ s of the 480 s planned in all\)", out), section
