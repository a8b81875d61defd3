"""A wheel built from the source tree holds every package folder of the repository."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP = {"tests", "build", "dist", "__pycache__"}


def test_wheel_contains_every_package(tmp_path: Path) -> None:
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed")
    # Build from a copy of the files a clone holds (tracked, or new and not ignored: no venvs or bench
    # output), so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in listed.decode().split("\0"):
        parts = Path(name).parts
        if name and not any(p in SKIP or p.startswith(".") or p.endswith(".egg-info") for p in parts) and (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    packages = sorted(p.parent.relative_to(src) for p in src.rglob("__init__.py"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(tmp_path / "wheel"),
        str(src),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("mmcurate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert Path("exports") in packages and Path("captioning") in packages
    missing = [str(p) for p in packages if f"mmcurate/{p.as_posix()}/__init__.py".replace("/./", "/") not in names]
    assert not missing, f"package folders missing from the wheel (list them in pyproject's packages): {missing}"
    assert "mmcurate/exports/text.py" in names and "mmcurate/captioning/noun_phrases.py" in names
