"""The loss kernels compile for the GPU (sm_90, Triton's own ptxas; no GPU needed).

The interpreter runs a kernel's Python, not the compiler's rules: a variable whose type
changes inside a runtime branch, for one, runs there and fails to compile. So the
benchmark's compile-only mode (``AOT=1``) runs here in a subprocess without the interpreter,
at every launch configuration the benchmark's cases use, and every kernel must compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_inbatch_loss.py"


def test_loss_kernels_compile_for_sm90(tmp_path):
    env = {**os.environ, "AOT": "1", "OUT": str(tmp_path), "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(BENCH)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "bench_inbatch_loss.json").read_text())
    compiled = {k: v for k, v in report.items() if k.startswith("aot_")}
    # 3 cases x 6 kernels, less the three-branch ones at the single-branch 65k case, + 2 flag grids
    assert len(compiled) == 17, sorted(compiled)
    failed = {k: v["error"] for k, v in compiled.items() if "error" in v}
    assert not failed, failed
    for name, info in compiled.items():
        assert int(info["regs"]) > 0, (name, info)
