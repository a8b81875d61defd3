"""Schema, stage protocol helpers and the engine-neutral core, in process."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pytest

from mmcurate.dedup.cluster import ClusterStage
from mmcurate.dedup.graph import components, member_pairs
from mmcurate.engines.core import apply_decisions, apply_stage, shard_stats, start_ledger
from mmcurate.errors import UsageError
from mmcurate.options import bounded, build_config
from mmcurate.pipelines.registry import STAGES, stage_class
from mmcurate.schemas import BY_NAME, FIELDS, METADATA_KEY, SCHEMA_VERSION, binary_array, conform
from mmcurate.stages.base import Stage, decisions, reject
from mmcurate.tests.support.foundation import DropWord


def test_fields_are_unique_and_keys_not_nullable() -> None:
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names))
    assert not BY_NAME["key"].arrow().nullable and BY_NAME["url"].arrow().nullable


def test_conform_orders_casts_fills_and_drops_internal_columns() -> None:
    table = pa.table({"extra": [1, 2], "_signature": [3, 4], "width": pa.array([5, 6], pa.int64()), "key": ["a", "b"]})
    out = conform(table, ["key", "url", "width"])
    assert out.column_names == ["key", "url", "width", "extra"]
    assert out.schema.field("width").type == pa.int32() and out.schema.field("url").type == pa.string()
    assert out.column("url").null_count == 2 and out.column("extra").to_pylist() == [1, 2]
    assert out.schema.metadata[METADATA_KEY] == SCHEMA_VERSION.encode()


@pytest.mark.parametrize("values", [[], [None, None], [b"a", None, b"", b"xyz"], [b"\xff\xd8" * 300] * 5])
def test_binary_array_equals_arrows_own(values: list[bytes | None]) -> None:
    array = binary_array(values)
    array.validate(full=True)
    assert array.equals(pa.array(values, pa.binary()))


def test_every_registered_stage_loads_and_declares_its_columns() -> None:
    for name in STAGES:
        cls = stage_class(name)
        assert cls.name == name
        assert set(cls.adds) <= set(BY_NAME), (name, cls.adds)
    with pytest.raises(UsageError, match="unknown stage 'nope'"):
        stage_class("nope")


def test_reject_keeps_earlier_reasons_and_ignores_null_mask() -> None:
    table = pa.table({"key": ["a", "b", "c", "d"], "reject_reason": pa.array([None, "old", None, None], pa.string())})
    out = reject(table, pa.array([True, True, None, False]), "new")
    assert out.column("reject_reason").to_pylist() == ["new", "old", None, None]
    out = reject(table, [False, False, True, True], ["x", "y", "z", "w"])
    assert out.column("reject_reason").to_pylist() == [None, "old", "z", "w"]


@dataclass
class Options:
    keep: tuple[str, ...] = ("en",)
    min_score: float = 0.5
    limit: int | None = None
    enabled: bool = True
    mode: Literal["filter", "score"] = "filter"
    name: str = "x"


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"keep": "en,de"}, {"keep": ("en", "de")}),
        ({"keep": ["fr"]}, {"keep": ("fr",)}),
        ({"min_score": "1"}, {"min_score": 1.0}),
        ({"limit": "null"}, {"limit": None}),
        ({"limit": "7"}, {"limit": 7}),
        ({"enabled": "false"}, {"enabled": False}),
        ({"mode": "score"}, {"mode": "score"}),
        ({"name": "123"}, {"name": "123"}),  # a string option keeps digits as text
        # Scientific notation, which PyYAML reads as text (it wants 1.0e-3), is a number wherever one is.
        ({"min_score": "1e-3"}, {"min_score": 0.001}),
        ({"min_score": "5E-1"}, {"min_score": 0.5}),
        ({"min_score": "-.25e+1"}, {"min_score": -2.5}),
        ({"limit": "1e3"}, {"limit": 1000}),
        ({"keep": "1e3"}, {"keep": ("1e3",)}),
        ({"name": "1e3"}, {"name": "1e3"}),
    ],
)
def test_build_config_coerces_set_strings(params: dict, expected: dict) -> None:
    config = build_config(Options, params, "stage t")
    for name, value in expected.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize(
    "params, message",
    [
        ({"nope": 1}, "unknown option 'nope'"),
        ({"min_score": "high"}, "must be a number"),
        ({"limit": "1.5"}, "must be an integer"),
        ({"limit": "15e-1"}, "must be an integer, not 1.5"),
        ({"min_score": "1e"}, "must be a number, not '1e'"),
        ({"min_score": "1e999999999"}, "must be a finite number"),
        ({"enabled": "maybe"}, "must be true or false"),
        ({"mode": "fast"}, "must be one of filter, score"),
    ],
)
def test_build_config_errors_are_usage_errors(params: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_config(Options, params, "stage t")


@dataclass
class Bounded:
    seconds: float = bounded(1.0, gt=0)
    retries: int = bounded(2, ge=0)
    fraction: float | None = bounded(None, gt=0, le=1)
    per_column: dict[str, float] = bounded(default_factory=dict, ge=0, le=1)
    sizes: tuple[int, ...] = bounded((), ge=1)
    offset: float = 0.0


@pytest.mark.parametrize(
    "params, message",
    [
        ({"seconds": float("nan")}, "option 'seconds' must be a finite number, not nan"),
        ({"offset": ".inf"}, "option 'offset' must be a finite number"),
        ({"offset": 10**400}, "option 'offset' must be a finite number"),
        ({"seconds": 0}, "option 'seconds' must be positive, not 0"),
        ({"retries": "-1"}, "option 'retries' must not be negative, not -1"),
        ({"fraction": 1.5}, "option 'fraction' must be more than 0 and at most 1, not 1.5"),
        ({"per_column": {"a": 0.5, "b": 2}}, "option 'per_column' must be between 0 and 1, not 2.0"),
        ({"per_column": {"a": "high"}}, "option 'per_column' must be a number, not 'high'"),
        ({"sizes": "3,0"}, "option 'sizes' must be at least 1, not 0"),
        ({"retries": "["}, "option 'retries' must be an integer, not '['"),  # not YAML: refused as text
        ({"per_column": "{a: "}, "option 'per_column' must be a mapping"),
    ],
)
def test_build_config_checks_declared_bounds_and_finite_floats(params: dict, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(f"stage t: {message}")):
        build_config(Bounded, params, "stage t")


def test_bounds_allow_their_limits_and_none() -> None:
    config = build_config(Bounded, {"seconds": "0.5", "retries": 0, "fraction": 1, "per_column": {"a": 0, "b": 1}, "offset": -3}, "t")
    assert (config.seconds, config.retries, config.fraction, config.per_column, config.offset) == (0.5, 0, 1.0, {"a": 0.0, "b": 1.0}, -3.0)
    assert build_config(Bounded, {"fraction": "null"}, "t").fraction is None


def test_components_keep_the_smallest_key() -> None:
    dups, keepers = components(pa.array(["a", "b", "c", "x"]), pa.array(["b", "c", "d", "w"]))  # a chain and a pair
    assert (dups.to_pylist(), keepers.to_pylist()) == (["b", "c", "d", "x"], ["a", "a", "a", "w"])


def test_member_pairs_pair_a_large_group_with_its_center() -> None:
    """The Ray engine names a large group's center (its smallest key) by a callback on row ids."""
    run = np.array([0, 0, 0, 0, 0, 1, 1])
    codes = np.array([4, 2, 7, 9, 3, 5, 1])
    left, right = member_pairs(run, codes, max_group_size=3)
    assert list(zip(left, right, strict=True)) == [(1, 5), (2, 3), (2, 4), (2, 7), (2, 9)]
    left, right = member_pairs(run, codes, max_group_size=3, center=lambda members: 7)
    assert list(zip(left, right, strict=True)) == [(1, 5), (2, 7), (3, 7), (4, 7), (7, 9)]
    left, right = member_pairs(run, codes, max_group_size=5, center=lambda members: 7)  # not large: every pair
    assert len(left) == 10 + 1


class Echo(Stage):
    name = "echo"
    batch_size = 3

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def process(self, table: pa.Table) -> pa.Table:
        self.seen.append(table.column("key").to_pylist())
        return reject(table, [k == "k4" for k in table.column("key").to_pylist()], "four")


def shard(n: int, rejected: dict[int, str] | None = None) -> pa.Table:
    rejected = rejected or {}
    return pa.table(
        {
            "key": [f"k{i}" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "reject_stage": pa.array(["read" if i in rejected else None for i in range(n)], pa.string()),
            "reject_reason": pa.array([rejected.get(i) for i in range(n)], pa.string()),
        }
    )


def test_apply_stage_batches_kept_rows_and_accounts() -> None:
    table = start_ledger(shard(8, {1: "malformed_row"}))
    stage = Echo()
    out = apply_stage(stage, table, 0)
    assert stage.seen == [["k0", "k2", "k3"], ["k4", "k5", "k6"], ["k7"]]  # rejected rows skip the stage
    assert out.num_rows == 8 and sorted(out.column("key").to_pylist()) == sorted(table.column("key").to_pylist())
    reasons = dict(
        zip(
            out.column("key").to_pylist(),
            zip(out.column("reject_stage").to_pylist(), out.column("reject_reason").to_pylist(), strict=True),
            strict=True,
        )
    )
    assert reasons["k1"] == ("read", "malformed_row") and reasons["k4"] == ("echo", "four") and reasons["k0"] == (None, None)
    summary = shard_stats(0, out, [stage])
    assert (summary["rows_in"], summary["kept"], summary["rejected"]) == (8, 6, 2)
    assert [(s["stage"], s["rows_in"], s["reasons"]) for s in summary["stages"]] == [
        ("read", 8, {"malformed_row": 1}),
        ("echo", 7, {"four": 1}),
    ]


def test_apply_stage_refuses_a_stage_that_changes_rows() -> None:
    class Dropper(Stage):
        name = "dropper"

        def process(self, table: pa.Table) -> pa.Table:
            return table.slice(1)

    with pytest.raises(RuntimeError, match="returned other rows"):
        apply_stage(Dropper(), start_ledger(shard(3)), 0)


def test_apply_stage_on_a_shard_with_no_kept_rows() -> None:
    out = apply_stage(DropWord(), start_ledger(shard(2, {0: "a", 1: "b"})), 0)
    assert out.column("reject_reason").to_pylist() == ["a", "b"]


def test_apply_decisions_rejects_by_key_and_only_kept_rows() -> None:
    class Dedup(ClusterStage):
        name = "dedup"

    table = start_ledger(shard(4, {2: "malformed_row"}))
    out = apply_decisions(Dedup(), 0, table, decisions(["k3", "k2", "zz"], "duplicate", ["k0", "k0", "k0"]))
    rows = {r["key"]: r for r in out.to_pylist()}
    assert (rows["k3"]["reject_stage"], rows["k3"]["reject_reason"], rows["k3"]["duplicate_of"]) == ("dedup", "duplicate", "k0")
    assert (rows["k2"]["reject_stage"], rows["k2"]["reject_reason"], rows["k2"]["duplicate_of"]) == ("read", "malformed_row", None)
    assert rows["k0"]["reject_reason"] is None and rows["k1"]["reject_reason"] is None
    stats = shard_stats(0, out, [Dedup()])["stages"]
    assert stats == [
        {"stage": "read", "rows_in": 4, "rejected": 1, "reasons": {"malformed_row": 1}, "seconds": 0.0},
        {"stage": "dedup", "rows_in": 3, "rejected": 1, "reasons": {"duplicate": 1}, "seconds": stats[1]["seconds"]},
    ]


def test_relative_model_paths_resolve_against_the_pipeline_yaml(tmp_path, monkeypatch) -> None:
    """Model paths that exist beside the YAML resolve against it (``local-dir:`` too), whatever the
    current folder; hub ids, names and options that are no path stay as written; ``--set`` values
    resolve against the current folder."""
    from mmcurate.pipelines.config import apply_overrides, load_pipeline

    here = tmp_path / "project"
    for folder in ("models/blip", "models/clip", "models/det", "prompt"):
        (here / folder).mkdir(parents=True)
    (here / "ckpt.pt").write_bytes(b"")
    (here / "p.yaml").write_text(
        "input: {path: in}\noutput: {path: out}\nstages:\n"
        "  - capfilt: {captioner: models/blip, filter_model: 'local-dir:models/clip', prompt: prompt}\n"
        "  - clip_score: {model: ViT-B-32, pretrained: ckpt.pt}\n"
        "  - grounding: {detector: google/owlv2-base-patch16-ensemble}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models" / "det").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    pipeline = load_pipeline(here / "p.yaml")
    capfilt, clip, grounding = (spec.params for spec in pipeline.stages)
    assert capfilt == {"captioner": str(here / "models/blip"), "filter_model": f"local-dir:{here / 'models/clip'}", "prompt": "prompt"}
    assert clip == {"model": "ViT-B-32", "pretrained": str(here / "ckpt.pt")}
    assert grounding == {"detector": "google/owlv2-base-patch16-ensemble"}  # no such folder: a hub id
    assert pipeline.as_dict()["stages"][0]["capfilt"]["captioner"] == str(here / "models/blip")  # what run.json records
    pipeline = apply_overrides(pipeline, ["grounding.detector=models/det", "capfilt.captioner=org/name"])
    assert pipeline.stages[2].params["detector"] == str(elsewhere / "models/det")
    assert pipeline.stages[0].params["captioner"] == "org/name"
