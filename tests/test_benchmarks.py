"""The CPU-checkable parts of the benchmark scripts: memory sampling, the NSD-shape ridge benchmark
on its tiny stand-in, and gpu_check.sh's argument handling (the GPU figures need a GPU machine)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memory import AnonPeak, anon_now_bytes  # benchmarks/ is on pytest's pythonpath

ROOT = Path(__file__).resolve().parent.parent


def test_anon_peak_sees_a_short_lived_allocation_but_not_a_mapped_file(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.ones((64, 2**20 // 8), np.float64))  # 64 MiB on disk
    with AnonPeak(interval=0.005) as mem:
        base = anon_now_bytes()
        mapped = np.load(path, mmap_mode="r")
        assert float(mapped.sum()) == 64 * 2**20 // 8  # every page read: file-backed, not anonymous
        after_map = anon_now_bytes()
        a = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        a.sum()
        import time
        time.sleep(0.5)  # long enough for the sampler thread to run on a loaded machine
        del a
    assert mem.peak - base > 180 * 2**20
    assert after_map - base < 32 * 2**20
    assert mem.samples >= 2


@pytest.mark.slow
def test_ridge_bench_nsd_tiny_runs_both_sides_and_cleans_up(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ridge_bench.py"), "--shape", "nsd", "--tiny",
                        "--tmp-dir", str(tmp_path), "--threads", "1"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    line = next(l for l in out.splitlines() if l.startswith("NSD SHAPE:"))
    worst = float(re.search(r"worst relative difference ([0-9.e+-]+)", line).group(1))
    assert worst < 1e-4
    assert "SPEEDUP" in line and "peak anon" in line
    assert "decomposition=cholesky" in out  # fixed alphas: no eigendecomposition
    assert "cost model t(T) = a + b*T" in out
    assert list(tmp_path.iterdir()) == []  # the temporary memmaps are deleted


@pytest.mark.parametrize("args, message", [(["--bogus"], "unknown argument"),
                                           (["--only", "ridge,gpu"], "unknown part 'gpu'"),
                                           (["--wheels", "/nonexistent"], "no .whl files")])
def test_gpu_check_rejects_bad_arguments(args, message, tmp_path):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, GPU_CHECK_OUT=str(tmp_path)))
    assert r.returncode == 2 and message in r.stderr
