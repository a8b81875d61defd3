"""Engine test fixtures: small test stages, a caption input with duplicates, output comparison.

The test stages cover every path an engine has: a plain per-row filter (Ray task), a stage with
``setup()`` (Ray actor), a ClusterStage with a verify step and a plain GlobalStage. They are pickled
by value so Ray and Spark workers need not import this file.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mmcurate.dedup.cluster import ClusterStage
from mmcurate.engines import run_pipeline
from mmcurate.pipelines import registry
from mmcurate.pipelines.config import parse_pipeline
from mmcurate.shards.layout import OutputDir
from mmcurate.stages.base import GlobalStage, Resources, Stage, decisions, reject, set_column


@dataclass
class WordsConfig:
    min_words: int = 4


class Words(Stage):
    """Count caption words; reject short captions."""

    name = "t_words"
    Config = WordsConfig
    needs = ("caption",)
    adds = ("caption_words",)

    def process(self, batch: pa.Table) -> pa.Table:
        words = [len((c or "").split()) for c in batch.column("caption").to_pylist()]
        batch = set_column(batch, "caption_words", words, pa.int32())
        return reject(batch, np.array(words) < self.config.min_words, "too_short")


@dataclass
class CharsConfig:
    word: str = "pizza"


class Chars(Stage):
    """A stage with setup(): counts characters, rejects captions mentioning ``word``."""

    name = "t_chars"
    Config = CharsConfig
    resources = Resources(cpus=0.5)
    needs = ("caption",)
    adds = ("caption_chars",)
    batch_size = 7

    def setup(self) -> None:
        self.word = self.config.word

    def process(self, batch: pa.Table) -> pa.Table:
        captions = [c or "" for c in batch.column("caption").to_pylist()]
        batch = set_column(batch, "caption_chars", [len(c) for c in captions], pa.int32())
        return reject(batch, [self.word in c.lower() for c in captions], f"mentions_{self.word}")


class OnGpu(Stage):
    """Declares a GPU (it runs on CPUs where there is none): cuts a Ray segment into three chains."""

    name = "t_gpu"
    resources = Resources(cpus=1, gpus=1)
    needs = ("caption",)
    batch_size = 16

    def process(self, batch: pa.Table) -> pa.Table:
        return reject(batch, [(c or "").endswith("?") for c in batch.column("caption").to_pylist()], "question")


@dataclass
class DedupConfig:
    words: int = 3


class CaptionDedup(ClusterStage):
    """Candidates share their first ``words`` words; verified when lengths differ by at most 3."""

    name = "t_dedup"
    Config = DedupConfig
    needs = ("caption",)
    global_columns = ("_first3", "_length")
    reason = "near_duplicate"
    max_group_size = 3

    def process(self, batch: pa.Table) -> pa.Table:
        captions = [(c or "").lower() for c in batch.column("caption").to_pylist()]
        first3 = [
            int.from_bytes(hashlib.sha256(" ".join(c.split()[: self.config.words]).encode()).digest()[:8], "little", signed=True)
            for c in captions
        ]
        batch = set_column(batch, "_first3", first3, pa.int64())
        return set_column(batch, "_length", [len(c) for c in captions], pa.int64())

    def group_rows(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(table.num_rows), table.column("_first3").to_numpy()

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        return pc.less_equal(pc.abs(pc.subtract(left.column("_length"), right.column("_length"))), 3)


@dataclass
class LongestConfig:
    fraction: float = 0.8


class Longest(GlobalStage):
    """Keep the longest ``fraction`` of captions (ties by key): a plain global decide()."""

    name = "t_longest"
    Config = LongestConfig
    needs = ("caption_words",)
    global_columns = ("caption_words",)

    def process(self, batch: pa.Table) -> pa.Table:
        return batch

    def decide(self, table: pa.Table) -> pa.Table:
        order = sorted(
            zip(table.column("caption_words").to_pylist(), table.column("key").to_pylist(), strict=True), key=lambda r: (-r[0], r[1])
        )
        drop = [k for _, k in order[int(len(order) * self.config.fraction) :]]
        return decisions(drop, "below_fraction")


@dataclass
class CrashConfig:
    marker: str = ""
    from_row: int = 800


class Crash(Stage):
    """Fails on batches holding input rows from ``from_row`` on while the ``marker`` file exists."""

    name = "t_crash"
    Config = CrashConfig
    needs = ("url",)

    def process(self, batch: pa.Table) -> pa.Table:
        rows = [int(u.rsplit("/", 1)[1].split(".")[0]) for u in batch.column("url").to_pylist()]
        if os.path.exists(self.config.marker) and max(rows, default=-1) >= self.config.from_row:
            raise RuntimeError("simulated crash")
        return batch


TEST_STAGES = {cls.name: f"{__name__}:{cls.__name__}" for cls in (Words, Chars, OnGpu, CaptionDedup, Longest, Crash)}
TEST_STAGES["t_model"] = "mmcurate.tests.support.model_probe:Probe"  # importable by the local runner's worker processes
for _pickler in ("ray.cloudpickle", "pyspark.cloudpickle"):
    importlib.import_module(_pickler).register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def test_stages(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Register the test stages under their names for the duration of a test."""
    for name, target in TEST_STAGES.items():
        monkeypatch.setitem(registry.STAGES, name, target)
    return TEST_STAGES


@pytest.fixture(scope="session")
def caption_input(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Parquet URL list of 795 real COCO captions plus 60 exact and 40 near-duplicate rows."""
    with open(data_dir / "coco_captions" / "captions.tsv", newline="") as f:
        captions = [row["caption"].strip() for row in csv.DictReader(f, delimiter="\t")]
    rng = np.random.default_rng(0)
    exact = [captions[i] for i in rng.choice(len(captions), 60, replace=False)]
    near = [
        captions[i] + " " + w
        for i, w in zip(rng.choice(len(captions), 40, replace=False), ["today"] * 20 + ["in the sunny afternoon light"] * 20, strict=True)
    ]
    rows = captions + exact + near
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    path = tmp_path_factory.mktemp("captions") / "captions.parquet"
    pq.write_table(pa.table({"url": [f"http://example.com/{i}.jpg" for i in range(len(rows))], "caption": rows}), path, row_group_size=200)
    return path


@pytest.fixture
def make_pipeline(tmp_path: Path):
    """Build a pipeline over ``input_path`` with ``stages`` writing to ``tmp_path/<name>``."""

    def make(input_path: Path, stages: list, name: str, engine: str = "local", rows_per_shard: int = 100, **output):
        return parse_pipeline(
            {
                "input": {"path": str(input_path)},
                "output": {"path": str(tmp_path / name), "rows_per_shard": rows_per_shard, "format": "parquet", **output},
                "stages": stages,
                "engine": engine,
                "workers": 1 if engine == "local" else 2,
            }
        )

    return make


def read_output(path: str) -> dict:
    """Everything that must match across engines: per shard the kept rows (all columns), the
    rejects and the stats without timings."""
    out = OutputDir.open(path)
    result = {}
    for shard_id in out.shard_ids("_done"):
        kept = _read_kept(out, shard_id)
        rejects = out.read_parquet(out.shard_path("rejects", shard_id, ".parquet"))
        stats = out.read_json(out.shard_path("_stats", shard_id, ".json"))
        for entry in stats["stages"]:
            entry.pop("seconds")
        tar = out.shard_path("shards", shard_id, ".tar")
        result[shard_id] = {
            "tar": hashlib.sha256(out.fs.cat(tar)).hexdigest() if out.exists(tar) else None,
            "kept": kept.to_pylist(),
            "columns": kept.column_names,
            "rejects": sorted(rejects.to_pylist(), key=lambda r: r["key"]),
            "stats": stats,
        }
    return result


def _read_kept(out: OutputDir, shard_id: int) -> pa.Table:
    parquet = out.shard_path("shards", shard_id, ".parquet")
    return out.read_parquet(parquet if out.exists(parquet) else out.shard_path("meta", shard_id, ".parquet"))


@pytest.fixture
def output_of():
    """:func:`read_output` for tests."""
    return read_output


@pytest.fixture
def run_and_read():
    """Run a pipeline and return (summary, read_output(its output))."""

    def run(pipeline, progress: bool = False) -> tuple[dict, dict]:
        summary = run_pipeline(pipeline, progress=progress)
        return summary, read_output(pipeline.output.path)

    return run
