"""A re-run of a finished output has nothing to do: on Ray it is summarised without starting or joining
Ray (and without the storage check); a finished output with a removed shard does join Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmcurate.cli import main
from mmcurate.engines import ray_runner
from mmcurate.tests.support.foundation import LAION, register

pytest.importorskip("ray")


class Joined(Exception):
    """Raised where the Ray engine would join Ray."""


def test_a_finished_output_is_summarised_without_ray(tmp_path: Path, laion_sample: Path, capsys, monkeypatch) -> None:
    src = tmp_path / "urls.parquet"
    pq.write_table(pq.read_table(laion_sample, columns=["URL", "TEXT"]).slice(0, 20), src)
    out = tmp_path / "out"
    register(monkeypatch)
    args = ["stage", "drop_word", "--input", str(src), "--output", str(out), "--rows-per-shard", "10", "--no-progress", *LAION]
    assert main([*args, "--engine", "local", "--workers", "1"]) == 0
    first = capsys.readouterr().out
    run_json, names = (out / "run.json").read_bytes(), sorted(p.name for p in out.iterdir())

    def join(workers: int) -> bool:
        raise Joined

    monkeypatch.setattr(ray_runner, "connect", join)
    assert main([*args, "--engine", "ray"]) == 0
    assert capsys.readouterr().out == first  # the same summary
    assert (out / "run.json").read_bytes() == run_json  # nothing changed
    assert sorted(p.name for p in out.iterdir()) == names  # no lease, work folder or probe left

    (out / "_done" / "00001").unlink()  # a shard to redo: now Ray is joined, before the run is recorded as unfinished
    assert main([*args, "--engine", "ray"]) == 1
    assert "Joined" in capsys.readouterr().err
    assert (out / "run.json").read_bytes() == run_json and not (out / "_work").exists() and not (out / "_lease.json").exists()
