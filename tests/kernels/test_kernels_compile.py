"""The kernels compile for the GPU (sm_90, Triton's own ptxas; no GPU needed).

The interpreter runs a kernel's Python, not the compiler's rules: a variable whose type
changes inside a runtime branch, for one, runs there and fails to compile. So the
benchmarks' compile-only mode (``AOT=1``) runs here in a subprocess without the interpreter,
at the launch configurations the benchmarks use, and every kernel must compile.
"""

from __future__ import annotations

import json
import os
import re
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
    # 3 cases x 6 kernels, less the three-branch ones at the single-branch 65k case, + the
    # paper scale's split three-branch backward kernels, + 2 flag grids and their dense marks,
    # + a later slab of the GEMM dC path of each dQ kernel (5) and the dz-only kernels (5),
    # + the drop lists' builder, + the paper scale's forward and dz-only kernels reading score
    # slabs (single and three branches: 4)
    assert len(compiled) == 36, sorted(compiled)
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
    # Each kernel's first configuration must fit an H100 (227 KB of shared memory a block; the
    # one-chunk forward runs two programs an SM): past it, the launch would silently take the
    # next configuration (fewer pipeline stages), which Runs 5-7 timed slower.
    two_an_sm = 233472 // 2 - 1024
    budget = {"d64_fwd_short": two_an_sm, "d64_drop_fwd_short": two_an_sm}
    for line in lines:
        name, smem = line.split()[0], int(re.search(r"smem=(\d+)", line).group(1))
        assert smem <= budget.get(name, 232448), line


# One process of benchmarks/precompile.py's chain (capture, parallel compile, timed run) on
# this GPU-less machine: a stand-in driver reports an sm_90 device, so the launcher derives
# the specialisations and cache keys a GPU run would, and no launch is ever reached.
_CHAIN = r"""
import glob, json, os, sys
os.environ["TRITON_CACHE_DIR"] = sys.argv[2]
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class SM90:  # what Triton's launcher asks of the driver before it compiles
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(SM90())
sys.path.insert(0, sys.argv[4])
import precompile
from odmt_components.kernels import inbatch_loss as K

K._interpreting = lambda t: False  # the GPU's tiles and paths, drop lists included
K._SM_OVERRIDE, K._DL_MIN_PAIRS = 132, 0
g = torch.Generator().manual_seed(0)
R, N, d = 40, 48, 32
cand = torch.randint(1, 30, (N,), generator=g)
target = torch.randint(0, N, (R,), generator=g)
hist = cand[torch.randint(0, N, (R, 5), generator=g)]
q = torch.randn(R, d, generator=g).half().requires_grad_()
c = torch.randn(N, d, generator=g).half().requires_grad_()


def calls():
    for gemm in (True, False):  # dC from stored dz slabs (cuBLAS), then by the dC kernel
        K._DC_GEMM = gemm
        K.debiased_inbatch_cross_entropy(q, c, target, cand, hist, None, 0, -100, "mean").backward()


mode, specs = sys.argv[1], sys.argv[3]
if mode == "capture":
    precompile.capture(specs)
    calls()
elif mode == "compile":
    sys.exit(precompile.main([specs, "--workers", "2"]))
else:  # the timed run: compile (or load) every kernel, launch none
    import triton.runtime.jit as jit

    launched = []
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        launched.append(self.__name__)
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    jit.JITFunction.run = compile_only
    before = set(glob.glob(os.path.join(sys.argv[2], "*")))
    calls()
    new = set(glob.glob(os.path.join(sys.argv[2], "*"))) - before
    print(json.dumps(dict(launched=len(launched), compiled=sorted(os.listdir(p)[0] for p in new))))
"""


def test_precompiled_kernels_load_from_the_cache(tmp_path):
    """What the warm step of benchmarks/gpu_check.sh relies on: the capture records each
    launch's compile request without compiling, the parallel compile fills Triton's cache,
    and a later process finds every kernel there (with Triton 3.6's order-dependent keys this
    needs ``kernels/_cache_keys.py``: the pool compiles in another order than the run)."""
    script = tmp_path / "chain.py"
    script.write_text(_CHAIN)
    cache, specs = tmp_path / "cache", tmp_path / "specs.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}

    def step(mode: str) -> subprocess.CompletedProcess:
        run = subprocess.run(
            [sys.executable, str(script), mode, str(cache), str(specs), str(BENCHMARKS)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        return run

    step("capture")
    captured = json.loads(specs.read_text())
    names = {item["name"] for item in captured}
    assert {"_ce_fwd_kernel", "_ce_dq_kernel", "_ce_dc_kernel", "_flag_kernel", "_dense_kernel"} <= names, names
    assert not cache.exists() or not any(cache.iterdir()), "the capture compiled something"
    compiled = step("compile")
    assert f"{len(captured)} of {len(captured)} kernels compiled" in compiled.stdout, compiled.stdout
    report = json.loads(step("run").stdout.strip().splitlines()[-1])
    assert report["launched"] >= len(captured)
    assert report["compiled"] == [], f"not found in the cache: {report['compiled']}"
