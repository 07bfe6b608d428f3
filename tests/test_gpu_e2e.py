"""benchmarks/gpu_e2e.py on a machine without CUDA: one clear line and exit status 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_gpu_e2e_without_cuda(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_e2e.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], p.stderr
    assert not list(tmp_path.iterdir())
