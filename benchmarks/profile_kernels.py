"""Hardware counters of our main kernels, one launch each, read by Nsight Compute (``ncu``).

The benchmarks say how long each kernel takes; this says why: for every forward and backward
kernel of the loss and the attention at the benchmarks' shapes, how busy the SM and the
memory system were, how many warps an SM held, how often a scheduler issued, what the warps
waited on between two instructions (the stall reasons: a global load, a tensor-core result,
a barrier, the exponential unit, ...) and which pipes did the work. Runs without a GPU
cannot read these, and the kernels' changes since the last lent GPU were guided by
instruction counts alone: the stall reasons tell the next change where the time goes.

Three subcommands::

    python benchmarks/profile_kernels.py profile OUT_DIR    # all of it, on the GPU machine
    python benchmarks/profile_kernels.py run LAUNCHES.json  # the calls, under ncu
    python benchmarks/profile_kernels.py report RAW.csv LAUNCHES.json

``profile`` runs ``run`` under ``ncu --profile-from-start off --clock-control none
--kernel-name regex:KERNELS --section ...`` (:data:`KERNELS`, :data:`SECTIONS`), exports
ncu's raw page to ``OUT_DIR/ncu_raw.csv`` and prints the ``report``. ``run`` builds the
benchmarks' inputs (``bench_inbatch_loss.make_data``, ``attention_problem.inputs``: the same
shapes and layouts, so the kernels come from the compile cache the benchmarks filled) and,
case by case, calls it once to compile and warm it, then once more (forward and backward)
inside a profiler window (``cudaProfilerStart`` / ``Stop``), recording the order of the
kernel launches that :data:`KERNELS` matches: ncu profiles exactly those, in that order. It
starts no case past ``NCU_DEADLINE_S`` seconds (ncu writes its report only when the program
exits: a run killed by a time cap would leave nothing). ``report`` reads the raw page and
prints one block a launch: duration, launch shape and occupancy, throughput against the
peaks, the scheduler's issue rate, the top stall reasons (cycles a warp waits per issued
instruction) and the busiest pipes. Metrics a version of ncu names
otherwise are left out of the block rather than guessed; the raw CSV keeps everything.

``benchmarks/gpu_check.sh`` runs ``profile`` as its ``ncu`` step. ``DRY=1 ... run`` goes
through the cases at tiny shapes under ``TRITON_INTERPRET=1`` on the CPU (plumbing only, no
profiler). Hardware counters need a machine whose runtime lets ncu read them (the lent
H100s, Firecracker; not the H200s, gVisor): elsewhere ``profile`` reports ncu's failure and
exits 1.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

STARTED = time.time()
DRY = os.environ.get("DRY", "0") not in ("", "0")
#: ``run`` profiles no case that would start after this many seconds since the process
#: started (``NCU_DEADLINE_S``; ncu writes its report only when the program exits, so a run
#: stopped by a step's time cap would leave nothing)
DEADLINE_S = float(os.environ.get("NCU_DEADLINE_S", "inf"))
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: The kernels profiled: the loss's split forward and row-wise dQ (single and three branches;
#: with the default GEMM dC one dQ launch a column slab, storing its dz, and cuBLAS for dC,
#: which is not profiled; the column-wise dC kernels where ``_DC_GEMM`` is off) and every
#: attention kernel (ncu's ``--kernel-name regex:`` takes the same).
KERNELS = r"^_(ce|odmt)_(fwd|dq|dc)_kernel$|^_attn_\w+$"

#: Sections ncu collects (about twenty replays of each launch).
SECTIONS = (
    "SpeedOfLight",
    "LaunchStats",
    "Occupancy",
    "SchedulerStats",
    "WarpStateStats",
    "ComputeWorkloadAnalysis",
    "MemoryWorkloadAnalysis",
)


def loss_cases() -> list[tuple[str, Callable[[], None]]]:
    """Forward + backward of the benchmark's loss cases (anchors' layout, bf16)."""
    import bench_inbatch_loss as bl

    shapes = [
        ("loss16k_ce", 16384, 16384, 256, False),
        ("loss16k_odmt3", 16384, 16384, 256, True),
        ("paper_odmt3", 1536, 1664, 768, True),
        ("loss65k_ce", 65536, 65536, 128, False),  # ~0.1 s a call: last
    ]
    if DRY:
        shapes = [(tag, 40, 44, 32, three) for tag, _, _, _, three in shapes[:2]] + [("loss_last", 24, 26, 16, False)]
    cases = []
    for tag, rows, cols, dim, three in shapes:
        hs, ds, target, cand, hist, log_pop = bl.make_data(rows, cols, dim)
        ce, odmt = bl.our_fns(hs, ds, target, cand, hist, log_pop)
        loss = odmt if three else ce
        leaves = hs + ds

        def step(loss=loss, leaves=leaves) -> None:
            for t in leaves:
                t.grad = None
            loss().backward()

        cases.append((tag, step))
    return cases


def attention_cases() -> list[tuple[str, Callable[[], None]]]:
    """Forward + backward of the attention benchmark's configurations (no dropout), and the
    12 x 64 one with dropout 0.1 (Run 5: 3x the time without at D = 64)."""
    from attention_problem import CONFIGS, N_IMG, inputs

    from odmt_components.kernels import attention

    configs = [(h, d, tag, 0.0) for h, d, tag in CONFIGS] + [(12, 64, "h12d64_dropout", 0.1)]
    if DRY:
        configs = [(2, 16, "h2d16", 0.0), (2, 16, "h2d16_dropout", 0.1)]
    cases = []
    for heads, dim, tag, p in configs:
        q, k, v, grad_out, _, key_valid = inputs(heads, dim, drawn_on_device=True)
        padding = ~key_valid

        def step(q=q, k=k, v=v, g=grad_out, padding=padding, p=p, scale=dim**-0.5) -> None:
            for t in (q, k, v):
                t.grad = None
            attention.id_masked_attention(q, k, v, padding, N_IMG, p, scale, 1234).backward(g)

        cases.append((f"attn_{tag}", step))
    return cases


def run(launches_path: str) -> int:
    """Each case in turn: a warm-up call, then one call inside a profiler window (``cudaProfilerStart``
    / ``Stop``), until :data:`DEADLINE_S`; writes the profiled launches, in order."""
    import torch
    import triton.runtime.jit as jit
    from triton.runtime.interpreter import InterpretedFunction

    if not DRY and not torch.cuda.is_available():
        print("profile_kernels: no CUDA GPU here; nothing to profile (DRY=1 runs the cases on the CPU).")
        return 0
    wanted = re.compile(KERNELS)
    launches: list[list[str]] = []
    current = [""]
    # kernels are JITFunctions, or InterpretedFunctions under TRITON_INTERPRET=1 (DRY)
    kernel_class = InterpretedFunction if DRY else jit.JITFunction
    plain_run = kernel_class.run

    def recording_run(self, *args, **kwargs):
        launched = plain_run(self, *args, **kwargs)  # (a launch refused for its tile raises)
        if current[0] and wanted.search(self.fn.__name__):
            launches.append([current[0], self.fn.__name__])
        return launched

    kernel_class.run = recording_run
    cuda = torch.cuda.is_available() and not DRY
    loss = loss_cases()
    # most wanted first: the 16k loss cases, the attention, then the paper and 65k loss cases
    cases = loss[:2] + attention_cases() + loss[2:]
    failed, profiled = [], 0
    for tag, step in cases:
        if time.time() - STARTED > DEADLINE_S:
            print(f"profile_kernels: {tag} and the cases after it left out (NCU_DEADLINE_S={DEADLINE_S:g} s)")
            break
        try:  # compile (or load from the cache) and warm, outside the profiler's window
            step()
        except Exception as exc:  # one failing case must not cost the others their counters
            failed.append(tag)
            print(f"profile_kernels: {tag} failed in its warm-up call: {type(exc).__name__}: {exc}"[:400])
            continue
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        current[0] = tag
        try:
            step()
            profiled += 1
        except Exception as exc:
            failed.append(tag)
            print(f"profile_kernels: {tag} failed in its profiled call: {type(exc).__name__}: {exc}"[:400])
        finally:
            current[0] = ""
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
    with open(launches_path, "w") as fh:
        json.dump(launches, fh)
    print(f"profile_kernels: {len(launches)} launches of {profiled} cases in the profiler's windows")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------

#: (label, metric name, unit shown) printed first for each launch, when ncu reported them.
HEADLINE = [
    ("duration", "gpu__time_duration.sum", "us"),
    ("registers/thread", "launch__registers_per_thread", ""),
    ("block", "launch__block_size", ""),
    ("grid", "launch__grid_size", ""),
    ("shared mem/block (dynamic)", "launch__shared_mem_per_block_dynamic", "KB"),
    ("theoretical occupancy", "sm__maximum_warps_per_active_cycle_pct", "%"),
    ("achieved occupancy", "sm__warps_active.avg.pct_of_peak_sustained_active", "%"),
    ("SM throughput", "sm__throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("memory throughput", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("DRAM throughput", "dram__throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("L1 hit rate", "l1tex__t_sector_hit_rate.pct", "%"),
    ("L2 hit rate", "lts__t_sector_hit_rate.pct", "%"),
    ("issue slots busy", "smsp__issue_active.avg.pct_of_peak_sustained_active", "%"),
    ("active warps/scheduler", "smsp__warps_active.avg.per_cycle_active", ""),
    ("eligible warps/scheduler", "smsp__warps_eligible.avg.per_cycle_active", ""),
    ("cycles between issues (per warp)", "smsp__average_warp_latency_per_inst_issued.ratio", ""),
]
_STALL = re.compile(r"^smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$")
_PIPE = re.compile(r"^sm__(?:inst_executed_)?pipe_(\w+?)(?:_cycles_active)?\.avg\.pct_of_peak_sustained_active$")


def _number(text: str) -> float | None:
    """ncu's value cells: thousands separators, sometimes units or 'n/a'."""
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def read_raw(path: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Rows of ``ncu --csv --page raw``: a header row (``ID``, ..., ``Kernel Name``, metric
    names), an optional units row, then one row a profiled launch, in launch order; returns
    the launches (metric name -> cell) and the units. ncu's own ``==PROF==`` lines, if the
    CSV was captured with them, are skipped."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].startswith("==")]
    for i, row in enumerate(rows):
        if "Kernel Name" in row or "Function Name" in row:
            header, body = row, rows[i + 1 :]
            header = ["Kernel Name" if h == "Function Name" else h for h in header]
            break
    else:
        raise ValueError(f"{path}: no header row with 'Kernel Name' (is it ncu's --csv --page raw?)")
    units: dict[str, str] = {}
    if body and not body[0][0].strip():  # the units row has no launch ID
        units = dict(zip(header, body[0], strict=False))
        body = body[1:]
    return [dict(zip(header, row, strict=False)) for row in body], units


def _scaled(value: float, unit_from: str, unit_to: str) -> float:
    factors = {("nsecond", "us"): 1e-3, ("usecond", "us"): 1.0, ("msecond", "us"): 1e3, ("second", "us"): 1e6}
    factors.update({("byte", "KB"): 1 / 1024, ("Kbyte", "KB"): 1.0, ("Mbyte", "KB"): 1024.0})
    return value * factors.get((unit_from, unit_to), 1.0)


def describe(rec: dict[str, str], units: dict[str, str], case: str) -> list[str]:
    """The printed block of one launch."""
    kernel, grid, block = (rec.get(k, "?") for k in ("Kernel Name", "Grid Size", "Block Size"))
    lines = [f"{case or '?'}: {kernel}  grid {grid} block {block}"]
    for label, name, unit in HEADLINE:
        value = _number(rec.get(name, ""))
        if value is None:
            continue
        if unit in ("us", "KB"):
            value = _scaled(value, units.get(name, ""), unit)
        lines.append(f"    {label:34s} {value:12,.2f} {unit}")
    stalls = sorted(
        ((v, m.group(1)) for k, raw in rec.items() if (m := _STALL.match(k)) and (v := _number(raw)) is not None),
        reverse=True,
    )
    total = sum(v for v, _ in stalls)
    if stalls:
        top = ", ".join(f"{name} {v:.1f}" for v, name in stalls[:6] if v > 0)
        lines.append(f"    stalls (cycles per issued instruction, {total:.1f} in all): {top}")
    pipes = sorted(
        ((v, m.group(1)) for k, raw in rec.items() if (m := _PIPE.match(k)) and (v := _number(raw)) is not None),
        reverse=True,
    )
    if pipes:
        lines.append("    busiest pipes (% of peak): " + ", ".join(f"{name} {v:.0f}" for v, name in pipes[:5]))
    return lines


def report(raw_path: str, launches_path: str) -> int:
    records, units = read_raw(raw_path)
    launches = json.load(open(launches_path)) if os.path.exists(launches_path) else []
    if len(launches) != len(records):
        print(f"profile_kernels: {len(records)} profiled launches, {len(launches)} recorded: cases unassigned")
        launches = []
    for i, rec in enumerate(records):
        case, kernel = launches[i] if launches else ("", "")
        if kernel and kernel not in rec.get("Kernel Name", ""):
            print(f"profile_kernels: launch {i} is {rec.get('Kernel Name')!r}, recorded {kernel!r}: cases unassigned")
            launches, case = [], ""
        print("\n".join(describe(rec, units, case)))
    return 0


def _find_ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    installed = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu") + glob.glob("/usr/local/cuda*/bin/ncu"))
    return installed[-1] if installed else None


def profile(out_dir: str) -> int:
    """``run`` under ncu, the raw page exported to ``out_dir/ncu_raw.csv``, then ``report``."""
    ncu = _find_ncu()
    if ncu is None:
        print("profile_kernels: no ncu (Nsight Compute) on this machine; nothing profiled")
        return 1
    os.makedirs(out_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="odmt_ncu_")
    rep, launches = os.path.join(scratch, "kernels"), os.path.join(scratch, "launches.json")
    sections = [arg for name in SECTIONS for arg in ("--section", name)]
    command = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--kernel-name", f"regex:{KERNELS}"]
    command += [*sections, "-f", "-o", rep, sys.executable, os.path.abspath(__file__), "run", launches]
    print("profile_kernels:", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        print("profile_kernels: the profiled run failed (see above); the report covers what ncu wrote")
    if not os.path.exists(rep + ".ncu-rep"):
        print("profile_kernels: ncu wrote no report")
        return 1
    raw = os.path.join(out_dir, "ncu_raw.csv")
    export = [ncu, "--import", rep + ".ncu-rep", "--csv", "--page", "raw", "--print-units", "base"]
    with open(raw, "w") as fh:
        exported = subprocess.run(export, stdout=fh)
    if exported.returncode != 0:
        print("profile_kernels: ncu could not export its report as CSV")
        return 1
    return report(raw, launches)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "profile":
        return profile(argv[1])
    if len(argv) == 2 and argv[0] == "run":
        return run(argv[1])
    if len(argv) == 3 and argv[0] == "report":
        return report(argv[1], argv[2])
    print(__doc__.split("Three subcommands::")[1].split("``profile``")[0].strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
