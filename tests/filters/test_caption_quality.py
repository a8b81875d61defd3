"""caption_quality: normalisation, counts, junk patterns, thresholds, score mode, the CLI."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.errors import UsageError
from mmcurate.filters.caption_quality import CaptionQuality, normalize_caption
from mmcurate.tests.support.filters import kept, rejects, run_command


def run(captions: list[str | None], **params) -> pa.Table:
    t = pa.table(
        {
            "key": [f"k{i}" for i in range(len(captions))],
            "caption": pa.array(captions, pa.string()),
            "reject_reason": pa.nulls(len(captions), pa.string()),
        }
    )
    return CaptionQuality.from_params(params).process(t)


JUNK = {
    "IMG_1234.jpg": "caption_filename",
    "DSC01234": "caption_filename",
    "PXL_20230101_123456789": "caption_filename",
    "shaker-heritage-barn-wedding-day007.jpg": "caption_filename",
    "Cowshed_Gorgeous_Cow_Blissful_Body_Lotion_300ml_1372086846": "caption_filename",
    "https://example.com/photos/1.jpg": "caption_url",
    "www.example.org": "caption_url",
    "hitachi-solutions.jp": "caption_url",
    "Untitled": "caption_placeholder",
    "image 3": "caption_placeholder",
    "No description available.": "caption_placeholder",
    "Lorem ipsum dolor sit amet, consectetur": "caption_placeholder",
    "Sale <span class=meta": "caption_html",
    "Amazing!!!!!!! deal today": "caption_repeated_chars",
    "zzzzzzzz sleeping cat on sofa": "caption_repeated_chars",
    None: "caption_missing",
    "   ": "caption_missing",
    "dog": "caption_too_short",
}
GOOD = [
    "A bowl of noodles, meat and broccoli with a fork.",
    "Price $100000 for a two bedroom house",  # repeated digits are numbers, not junk
    "Purple Orchid Flower Isolated...",
    "Scan of page 12 (1995 edition)",
]


def test_junk_patterns_and_good_captions() -> None:
    captions = list(JUNK) + GOOD
    out = run(captions)
    assert out.column("reject_reason").to_pylist() == list(JUNK.values()) + [None] * len(GOOD)


def test_counts_on_normalised_caption() -> None:
    out = run(["<b>Game 20:</b> at&nbsp;Denver   109", "Ã©tÃ© Ã  Paris au soleil", "&quot;Keep Calm&quot; - Blue Canvas"])
    assert out.column("caption").to_pylist() == ["Game 20: at Denver 109", "été à Paris au soleil", '"Keep Calm" - Blue Canvas']
    assert out.column("caption_words").to_pylist() == [5, 5, 5]
    assert out.column("caption_chars").to_pylist() == [22, 21, 25]
    assert out.column("reject_reason").null_count == 3
    assert normalize_caption("Orchid Jungle<br>Hawaiian Dresses<br/>") == "Orchid Jungle Hawaiian Dresses"


def test_without_normalisation_markup_is_junk_and_caption_untouched() -> None:
    captions = ["<b>Game 20: at Denver</b>", "Western theme &quot;save the date&quot; postcard"]
    out = run(captions, normalize=False)
    assert out.column("caption").to_pylist() == captions
    assert out.column("reject_reason").to_pylist() == ["caption_html", "caption_html"]


def test_datacomp_thresholds_more_than_2_words_and_5_chars() -> None:
    captions = ["red car", "a b c", "a b cd", "one two three"]  # 2 words; 5 chars; 6 chars; ok
    out = run(captions, min_words=3, min_chars=6, junk=[])
    assert out.column("reject_reason").to_pylist() == ["caption_too_short", "caption_too_short", None, None]
    out = run(["one two three four five"], max_words=4)
    assert out.column("reject_reason").to_pylist() == ["caption_too_long"]


def test_score_mode_and_selected_checks() -> None:
    out = run(list(JUNK), mode="score")
    assert out.column("reject_reason").null_count == len(JUNK)
    assert out.column("caption_words").null_count == 0
    only_url = run(["IMG_1234.jpg trip", "www.example.org"], junk=["url"], min_words=1)
    assert only_url.column("reject_reason").to_pylist() == [None, "caption_url"]


def test_bad_options() -> None:
    with pytest.raises(UsageError, match="unknown junk check"):
        CaptionQuality.from_params({"junk": ["emoji"]})
    with pytest.raises(UsageError):
        CaptionQuality.from_params({"min_words": 5, "max_words": 2})


def test_real_laion_captions(laion_sample: Path) -> None:
    """On 1,000 real alt-texts most captions pass; every rejection is one of the documented reasons."""
    captions = pq.read_table(laion_sample, columns=["TEXT"]).column("TEXT").to_pylist()
    out = run(captions)
    reasons = out.column("reject_reason").to_pylist()
    assert 0.9 < reasons.count(None) / len(reasons) < 1.0
    assert set(reasons) <= {
        None,
        "caption_too_short",
        "caption_filename",
        "caption_url",
        "caption_placeholder",
        "caption_html",
        "caption_repeated_chars",
    }
    assert not any("<br>" in c or "&quot;" in c for c in out.column("caption").to_pylist())


def test_cli(tmp_path: Path, photo_dataset: Path, photos: pa.Table) -> None:
    out = tmp_path / "out"
    assert run_command("stage", "caption_quality", photo_dataset, out, "min_words=3") == 0
    missing = {k for k, c in zip(photos.column("key").to_pylist(), photos.column("caption").to_pylist(), strict=True) if c is None}
    assert missing and rejects(out) == dict.fromkeys(missing, "caption_missing")
    table = kept(out)
    assert table.num_rows == photos.num_rows - len(missing)
    assert min(table.column("caption_words").to_pylist()) >= 3
