"""The local engine's CPU pool: forked before planning where that is safe, spawned otherwise, with
the same files either way."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading

import pytest

from mmcurate.engines import local
from mmcurate.engines.local import ForkedPool

STAGES = [{"caption_quality": {"min_words": 3}}, {"minhash_dedup": {"threshold": 0.7}}]


def test_fork_only_from_a_lone_thread_on_a_platform_that_forks_safely(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert ForkedPool.possible(2) and ForkedPool.possible(4)
    assert not ForkedPool.possible(1)  # one worker: no pool at all
    assert not ForkedPool.possible(5)  # more than the CPUs: spawned after planning, as many as the run can use
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not ForkedPool.possible(2)
    monkeypatch.undo()
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    assert not ForkedPool.possible(2)


def test_forked_and_spawned_pools_write_the_same_files(caption_input, make_pipeline, run_and_read, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same two-worker run (a filter, then a global step whose phases run in the pool) from a forked and a spawned pool."""
    runs = {}
    for fork in (True, False):
        made: list[int] = []

        class Recorded(ForkedPool):
            possible = staticmethod(lambda workers, fork=fork: fork)

            def __init__(self, workers: int, made: list[int] = made) -> None:
                made.append(workers)
                super().__init__(workers)

        monkeypatch.setattr(local, "ForkedPool", Recorded)
        pipeline = make_pipeline(caption_input, STAGES, f"fork-{fork}", rows_per_shard=200)
        summary, runs[fork] = run_and_read(dataclasses.replace(pipeline, workers=2))
        assert made == ([2] if fork else [])
        assert summary["stages"]["minhash_dedup"]["rejected"] > 50
    assert len(runs[True]) == 5 and runs[True] == runs[False]


def test_spawned_pool_is_capped_at_the_shards(caption_input, make_pipeline, run_and_read, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 workers asked for 3 shards: 3 interpreters started, not 16."""
    sizes: list[int] = []
    spawned = local._spawned_pool
    monkeypatch.setattr(ForkedPool, "possible", staticmethod(lambda workers: False))
    monkeypatch.setattr(local, "_spawned_pool", lambda size, worker: sizes.append(size) or spawned(size, worker))
    pipeline = make_pipeline(caption_input, STAGES[:1], "capped", rows_per_shard=400)
    summary, _ = run_and_read(dataclasses.replace(pipeline, workers=16))
    assert sizes == [3] and summary["shards"] == 3 and summary["rows_in"] == 895


def test_the_pool_has_no_more_workers_than_the_run_can_use(
    caption_input, make_pipeline, run_and_read, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On 2 CPUs, 2 workers are forked before planning; 64 for 5 shards are never forked, but 5 spawned
    after it; the files are the same."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threading, "active_count", lambda: 1)  # a fork would be safe: only the CPU count rules one out
    made: dict[str, list[int]] = {"forked": [], "spawned": []}

    class Recorded(ForkedPool):
        def __init__(self, workers: int) -> None:
            made["forked"].append(workers)
            super().__init__(workers)

    spawned = local._spawned_pool
    monkeypatch.setattr(local, "ForkedPool", Recorded)
    monkeypatch.setattr(local, "_spawned_pool", lambda size, worker: made["spawned"].append(size) or spawned(size, worker))
    runs = {}
    for workers in (2, 64):
        pipeline = make_pipeline(caption_input, STAGES, f"workers-{workers}", rows_per_shard=200)
        runs[workers] = run_and_read(dataclasses.replace(pipeline, workers=workers))[1]
    assert made == {"forked": [2], "spawned": [5]}
    assert len(runs[64]) == 5 and runs[64] == runs[2]


@pytest.mark.parametrize(("shards", "split_rows", "expected"), [(5, None, 5), (500, None, 64), (1, 3, 3), (1, 4000, 64), (0, None, 1)])
def test_usable_workers(shards: int, split_rows: int | None, expected: int) -> None:
    assert local.usable_workers(64, shards, split_rows) == expected
