"""image_size and aspect_ratio: bounds on the source image, unknown sizes, the CLI on real photos."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mmcurate.errors import UsageError
from mmcurate.filters.image_size import AspectRatio, ImageSize
from mmcurate.tests.support.filters import kept, rejects, run_command


def table(sizes: list[tuple[int | None, int | None]], stored: list[tuple[int | None, int | None]] | None = None) -> pa.Table:
    stored = stored or [(None, None)] * len(sizes)
    return pa.table(
        {
            "key": [f"k{i}" for i in range(len(sizes))],
            "original_width": pa.array([w for w, _ in sizes], pa.int32()),
            "original_height": pa.array([h for _, h in sizes], pa.int32()),
            "width": pa.array([w for w, _ in stored], pa.int32()),
            "height": pa.array([h for _, h in stored], pa.int32()),
            "reject_reason": pa.nulls(len(sizes), pa.string()),
        }
    )


def reasons(stage, t: pa.Table) -> list[str | None]:
    return stage.process(t).column("reject_reason").to_pylist()


def test_image_size_bounds() -> None:
    t = table([(200, 300), (199, 1000), (1000, 199), (4000, 300), (150, 150), (None, None)])
    stage = ImageSize.from_params({"min_side": 200, "max_side": 3000})
    assert reasons(stage, t) == [None, "image_too_small", "image_too_small", "image_too_large", "image_too_small", "image_size_unknown"]
    assert reasons(ImageSize.from_params({"min_area": 60_000}), t)[:5] == [None, None, None, None, "image_too_small"]


def test_image_size_reads_the_source_size_not_the_stored_one() -> None:
    """A 2,000 px photo stored as a 256 px thumbnail is not small; stored sizes stand in only where originals are unknown."""
    t = table([(2000, 1500), (None, None)], stored=[(256, 240), (256, 240)])
    assert reasons(ImageSize.from_params({"min_side": 200}), t) == [None, None]
    assert reasons(ImageSize.from_params({"min_side": 1000}), t) == [None, "image_too_small"]


def test_aspect_ratio_both_orientations_and_asymmetric_bounds() -> None:
    t = table([(600, 100), (601, 100), (100, 601), (300, 100), (100, 0), (None, 5)])
    assert reasons(AspectRatio.from_params({"max_ratio": 6}), t) == [
        None,
        "extreme_aspect_ratio",
        "extreme_aspect_ratio",
        None,
        "image_size_unknown",
        "image_size_unknown",
    ]
    wide_only = AspectRatio.from_params({"max_ratio": None, "min_width_ratio": 1.0})
    assert reasons(wide_only, t)[:4] == [None, None, "extreme_aspect_ratio", None]


@pytest.mark.parametrize(
    "params", [{"min_side": 0}, {"min_side": 500, "max_side": 100}, {"max_ratio": 0.5}, {"min_width_ratio": 2, "max_width_ratio": 1}]
)
def test_bad_options_are_usage_errors(params: dict) -> None:
    stage = ImageSize if set(params) & {"min_side", "max_side"} else AspectRatio
    with pytest.raises(UsageError):
        stage.from_params(params)


def test_cli_datacomp_size_rules_on_real_photos(tmp_path: Path, photo_dataset: Path, photos: pa.Table) -> None:
    """`mmcurate stage image_size` then `aspect_ratio` on the photos; decisions follow the manifest sizes."""
    sizes = dict(
        zip(
            photos.column("key").to_pylist(),
            zip(photos.column("original_width").to_pylist(), photos.column("original_height").to_pylist(), strict=True),
            strict=True,
        )
    )
    small = tmp_path / "small"
    assert run_command("stage", "image_size", photo_dataset, small, "min_side=200", output_format="parquet") == 0
    expected_small = {k for k, (w, h) in sizes.items() if min(w, h) < 200}
    assert expected_small and set(rejects(small)) == expected_small
    assert set(rejects(small).values()) == {"image_too_small"}

    ratio = tmp_path / "ratio"
    assert run_command("stage", "aspect_ratio", small, ratio, "max_ratio=2", output_format="parquet") == 0
    expected_ratio = {k for k, (w, h) in sizes.items() if k not in expected_small and max(w, h) / min(w, h) > 2}
    assert expected_ratio and set(rejects(ratio)) == expected_ratio
    assert kept(ratio).num_rows == len(sizes) - len(expected_small) - len(expected_ratio)
