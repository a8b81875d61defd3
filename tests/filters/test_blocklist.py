"""blocklist: URL, domain (with subdomains) and key lists from fsspec paths, the CLI."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mmcurate.errors import UsageError
from mmcurate.filters.blocklist import Blocklist
from mmcurate.tests.support.filters import kept, rejects, run_command

URLS = [
    "https://cdn.Example.com/a.jpg",
    "https://notexample.com/b.jpg",
    "http://bad.org:8080/c.png",
    "http://ok.net/d.jpg ",
    None,
    "http://[broken/e.jpg",
    "http://ok.net/f.jpg",
]


def table() -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(len(URLS))], "url": URLS, "reject_reason": pa.nulls(len(URLS), pa.string())})


def test_domains_urls_and_keys(tmp_path: Path) -> None:
    (tmp_path / "domains.txt").write_text("# domains\nexample.com\n*.bad.org\n\n")
    (tmp_path / "urls.txt").write_text("http://ok.net/d.jpg\n")
    (tmp_path / "keys.txt").write_text("k6\n")
    stage = Blocklist.from_params(
        {"domains": [f"file://{tmp_path / 'domains.txt'}"], "urls": [str(tmp_path / "urls.txt")], "keys": [str(tmp_path / "keys.txt")]}
    )
    stage.setup()
    reasons = stage.process(table()).column("reject_reason").to_pylist()
    assert reasons == ["blocklisted", None, "blocklisted", "blocklisted", None, None, "blocklisted"]


def test_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="at least one list"):
        Blocklist.from_params({})
    stage = Blocklist.from_params({"domains": [str(tmp_path / "missing.txt")]})
    with pytest.raises(UsageError, match="cannot read"):
        stage.setup()


def test_cli(tmp_path: Path, photo_dataset: Path, photos: pa.Table) -> None:
    keys = photos.column("key").to_pylist()
    (tmp_path / "keys.txt").write_text(f"{keys[0]}\n{keys[5]}\n")
    (tmp_path / "urls.txt").write_text(f"https://photos.example.org/{keys[7]}.jpg\n")
    out = tmp_path / "out"
    assert run_command("stage", "blocklist", photo_dataset, out, f"keys={tmp_path / 'keys.txt'}", f"urls={tmp_path / 'urls.txt'}") == 0
    assert rejects(out) == dict.fromkeys([keys[0], keys[5], keys[7]], "blocklisted")
    assert kept(out).num_rows == photos.num_rows - 3
    everything = tmp_path / "everything"
    (tmp_path / "domains.txt").write_text("example.org\n")
    assert run_command("stage", "blocklist", photo_dataset, everything, f"domains={tmp_path / 'domains.txt'}") == 0
    assert len(rejects(everything)) == photos.num_rows
