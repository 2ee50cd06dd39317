"""The kernels compile for the GPU (sm_90, Triton's own ptxas; no GPU needed).

The interpreter runs a kernel's Python, not the compiler's rules: a variable whose type
changes inside a runtime branch, for one, runs there and fails to compile. So the
benchmarks' compile-only mode (``AOT=1``) runs here in a subprocess without the interpreter,
at the launch configurations the benchmarks use, and every kernel must compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
BENCH = BENCHMARKS / "bench_inbatch_loss.py"


def _compile_only(script: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AOT": "1", "OUT": str(out), "TRITON_INTERPRET": "0"}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)


def test_loss_kernels_compile_for_sm90(tmp_path):
    run = _compile_only(BENCH, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "bench_inbatch_loss.json").read_text())
    compiled = {k: v for k, v in report.items() if k.startswith("aot_")}
    # 3 cases x 6 kernels, less the three-branch ones at the single-branch 65k case, + 2 flag
    # grids and their dense marks
    assert len(compiled) == 19, sorted(compiled)
    failed = {k: v["error"] for k, v in compiled.items() if "error" in v}
    assert not failed, failed
    for name, info in compiled.items():
        assert int(info["regs"]) > 0, (name, info)


def test_attention_kernels_compile_for_sm90(tmp_path):
    run = _compile_only(BENCHMARKS / "bench_attention.py", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if "regs=" in line or "ERROR" in line]
    # head dims 384 and 64, with and without dropout: two short and three blocked kernels
    # each, and the split backward's dQ/dK kernel at 384 (no dropout inside it)
    assert len(lines) == 21, run.stdout[-3000:]
    failed = [line for line in lines if "ERROR" in line]
    assert not failed, failed
