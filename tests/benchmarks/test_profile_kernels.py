"""``benchmarks/profile_kernels.py``: the Nsight Compute step of the GPU run. ncu is not on
this machine: the report is checked on CSVs in the layout of ncu's raw page, and the
``profile`` plumbing with a stand-in ``ncu`` that runs the profiled command (the cases at
tiny shapes under the interpreter) and exports one row per recorded launch."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
_PATH = _ROOT / "benchmarks" / "profile_kernels.py"
_spec = importlib.util.spec_from_file_location("profile_kernels", _PATH)
profile_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_kernels)

_FIXED = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream"]
_FIXED += ["Block Size", "Grid Size"]
_METRICS = {
    "gpu__time_duration.sum": "nsecond",
    "launch__registers_per_thread": "register/thread",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": "",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": "",
    "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio": "",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": "%",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active": "%",
}


def write_raw(path: Path, kernels: list[str]) -> None:
    """A raw page as ``ncu --csv --page raw --print-units base`` lays it out."""
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh, quoting=csv.QUOTE_ALL)
        out.writerow(_FIXED + list(_METRICS))
        out.writerow([""] * len(_FIXED) + list(_METRICS.values()))
        for i, kernel in enumerate(kernels):
            values = [f"{2_860_320 + i:,}", "168", "12.5", "3.25", "0.75", "61.2", "8.4"]
            launch = [str(i), "1234", "python3", "127.0.0.1", kernel, "1", "7", "(256, 1, 1)", "(128, 2, 1)"]
            out.writerow(launch + values)


def test_report_names_each_launch_with_its_case_and_orders_the_stalls(tmp_path, capsys):
    write_raw(tmp_path / "raw.csv", ["_ce_fwd_kernel", "_ce_dq_kernel"])
    launches = [["loss16k_ce", "_ce_fwd_kernel"], ["loss16k_ce", "_ce_dq_kernel"]]
    (tmp_path / "launches.json").write_text(json.dumps(launches))
    assert profile_kernels.report(str(tmp_path / "raw.csv"), str(tmp_path / "launches.json")) == 0
    out = capsys.readouterr().out
    assert out.count("loss16k_ce: _ce_") == 2
    assert re.search(r"duration\s+2,860\.32 us", out)  # nanoseconds with a thousands separator
    assert re.search(r"registers/thread\s+168\.00", out)
    stalls = "long_scoreboard 12.5, barrier 3.2, math_pipe_throttle 0.8"
    assert f"stalls (cycles per issued instruction, 16.5 in all): {stalls}" in out
    assert "busiest pipes (% of peak): tensor_op_gmma 61, xu 8" in out


def test_report_leaves_cases_out_when_the_launches_do_not_line_up(tmp_path, capsys):
    write_raw(tmp_path / "raw.csv", ["_ce_fwd_kernel", "_ce_dq_kernel"])
    (tmp_path / "launches.json").write_text(json.dumps([["a", "_ce_fwd_kernel"], ["a", "_ce_dc_kernel"]]))
    profile_kernels.report(str(tmp_path / "raw.csv"), str(tmp_path / "launches.json"))
    out = capsys.readouterr().out
    assert "cases unassigned" in out and "?: _ce_dq_kernel" in out
    (tmp_path / "launches.json").write_text(json.dumps([["a", "_ce_fwd_kernel"]]))
    profile_kernels.report(str(tmp_path / "raw.csv"), str(tmp_path / "launches.json"))
    assert "2 profiled launches, 1 recorded" in capsys.readouterr().out


def test_a_file_without_a_header_row_is_refused(tmp_path):
    (tmp_path / "raw.csv").write_text("==PROF== Disconnected\n")
    with pytest.raises(ValueError, match="no header row"):
        profile_kernels.read_raw(str(tmp_path / "raw.csv"))


_STAND_IN_NCU = textwrap.dedent(
    """\
    #!{python}
    # ncu's two calls as profile_kernels makes them: profile a command, export the raw page
    import json, os, re, subprocess, sys
    args = sys.argv[1:]
    if "--import" in args:
        rep = args[args.index("--import") + 1]
        sys.path.insert(0, {tests!r})
        from test_profile_kernels import write_raw
        write_raw("/dev/stdout", json.load(open(rep)))
        sys.exit(0)
    assert args[args.index("--profile-from-start") + 1] == "off"
    assert args[args.index("--clock-control") + 1] == "none"
    assert "WarpStateStats" in args and "SchedulerStats" in args
    kernels = re.compile(args[args.index("--kernel-name") + 1].removeprefix("regex:"))
    rep = args[args.index("-o") + 1]
    command = args[args.index("-o") + 2 :]
    if subprocess.run(command).returncode:
        sys.exit(1)
    launches = json.load(open(command[-1]))
    assert launches and all(kernels.search(name) for _, name in launches)
    json.dump([name for _, name in launches], open(rep + ".ncu-rep", "w"))
    """
)


def test_profile_runs_the_cases_under_ncu_and_reports_every_launch(tmp_path):
    ncu = tmp_path / "bin" / "ncu"
    ncu.parent.mkdir()
    ncu.write_text(_STAND_IN_NCU.format(python=sys.executable, tests=str(Path(__file__).parent)))
    ncu.chmod(0o755)
    env = {**os.environ, "DRY": "1", "PATH": f"{ncu.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, str(_PATH), "profile", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    blocks = [line for line in done.stdout.splitlines() if re.match(r"^\w+: _\w+_kernel ", line)]
    # the loss's forward and dQ (single and three branches; one dQ launch a column slab of
    # the GEMM dC, two slabs at these shapes), the attention's forward and backward (without
    # and with dropout), each named with its case
    assert [b.split()[:2] for b in blocks] == [
        ["loss16k_ce:", "_ce_fwd_kernel"],
        ["loss16k_ce:", "_ce_dq_kernel"],
        ["loss16k_ce:", "_ce_dq_kernel"],
        ["loss16k_odmt3:", "_odmt_fwd_kernel"],
        ["loss16k_odmt3:", "_odmt_dq_kernel"],
        ["loss16k_odmt3:", "_odmt_dq_kernel"],
        ["attn_h2d16:", "_attn_fwd_short_kernel"],
        ["attn_h2d16:", "_attn_bwd_short_kernel"],
        ["attn_h2d16_dropout:", "_attn_fwd_short_kernel"],
        ["attn_h2d16_dropout:", "_attn_bwd_short_kernel"],
        ["loss_last:", "_ce_fwd_kernel"],
        ["loss_last:", "_ce_dq_kernel"],
        ["loss_last:", "_ce_dq_kernel"],
    ]
    assert (tmp_path / "out" / "ncu_raw.csv").exists()


def test_run_starts_no_case_past_its_deadline(tmp_path):
    """ncu writes its report when the profiled program exits: a program cut by the step's cap
    would leave none, so ``run`` stops starting cases at ``NCU_DEADLINE_S``."""
    launches = tmp_path / "launches.json"
    env = {**os.environ, "DRY": "1", "NCU_DEADLINE_S": "0"}
    done = subprocess.run(
        [sys.executable, str(_PATH), "run", str(launches)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loss16k_ce and the cases after it left out (NCU_DEADLINE_S=0 s)" in done.stdout
    assert json.loads(launches.read_text()) == []
