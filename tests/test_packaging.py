"""Packaging: kernels/ installs as odmt_components.kernels, never as a top-level `kernels`
module (that name belongs to the Hugging Face `kernels` package, which transformers imports
when present). Checked for the wheel of `pip install .` and for the editable install."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import odmt_components

REPO = Path(__file__).resolve().parents[1]


def test_editable_or_source_import_maps_kernels_into_the_package():
    spec = importlib.util.find_spec("odmt_components.kernels")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).parent.name == "kernels"
    import odmt_components.kernels as kernels

    assert kernels.__name__ == "odmt_components.kernels"
    # transformers may have imported the folder as a top-level `kernels` while probing for the
    # Hugging Face package (the repository root is on sys.path under `python -m pytest`):
    # then it must be the empty stand-in, not a second copy of the package.
    stray = sys.modules.get("kernels")
    assert stray is None or not hasattr(stray, "id_masked_attention_reference")
    assert hasattr(odmt_components, "IMT")


def test_transformers_does_not_take_the_folder_for_the_hugging_face_kernels_package():
    probe = (
        "import sys, kernels; "
        "from transformers.utils.import_utils import is_kernels_available; "
        "assert not hasattr(kernels, 'id_masked_attention_reference'); "
        "assert not is_kernels_available(); "
        "import odmt_components.kernels as k; assert k.id_masked_attention_reference; print('ok')"
    )
    # The repository root first on sys.path: the situation of `python -m pytest` or a REPL there.
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "ok"


def test_wheel_installs_kernels_under_the_package(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("odmt_components-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "odmt_components/kernels/__init__.py" in names
    assert "odmt_components/kernels/reference.py" in names
    assert not any(name.startswith("kernels/") for name in names), names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        cwd=tmp_path,
    )
    assert not (target / "kernels").exists()
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import odmt_components.kernels.reference as r, odmt_components as o; "
        "assert r.__file__.startswith(sys.argv[1]), r.__file__; "
        "assert o.IMT and r.id_masked_attention_reference; print('ok')"
    )
    # Run outside the repository so the source tree cannot be picked up instead.
    result = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(target)], check=True, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.stdout.strip() == "ok"
