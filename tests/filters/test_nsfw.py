"""nsfw: the real NudeNet detector (offline, from its wheel) on real photos, bad rows, the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mmcurate.errors import UsageError
from mmcurate.filters.nsfw import EXPOSED, Nsfw, detector_labels
from mmcurate.tests.support.filters import kept, rejects, run_command

pytest.importorskip("nudenet")


@pytest.fixture(scope="module")
def nsfw() -> Nsfw:
    stage = Nsfw.from_params({"max_score": 0.5})
    stage.setup()
    return stage


def test_scores_only_exposed_classes(nsfw: Nsfw, photos: pa.Table, photo_dir: Path) -> None:
    """Everyday photos score low; the astronaut portrait's face is detected yet counts for nothing."""
    rows = photos.take(list(range(0, photos.num_rows, 5)))
    out = nsfw.process(rows)
    scores = out.column("nsfw_score").to_numpy()
    assert scores.shape == (rows.num_rows,) and np.all((scores >= 0) & (scores < 0.5))
    assert out.column("reject_reason").null_count == rows.num_rows
    astronaut = (photo_dir / "skimage_astronaut.png").read_bytes()
    assert any(d["class"] == "FACE_FEMALE" for d in nsfw._detector.detect(astronaut))
    assert nsfw.score([astronaut])[0][0] == 0.0
    face_counts = Nsfw.from_params({"classes": ["FACE_FEMALE"], "mode": "score"})
    face_counts.setup()
    assert face_counts.score([astronaut])[0][0] > 0.2


def test_bad_rows_and_threshold(nsfw: Nsfw, photo_dir: Path) -> None:
    t = pa.table(
        {
            "key": ["a", "b", "c"],
            "image": [(photo_dir / "skimage_astronaut.png").read_bytes(), b"nope", None],
            "reject_reason": pa.nulls(3, pa.string()),
        }
    )
    out = nsfw.process(t)
    assert out.column("nsfw_score").to_pylist()[1:] == [None, None]
    assert out.column("reject_reason").to_pylist() == [None, "decode_error", "image_missing"]
    one_by_one = Nsfw.from_params({"batch_size": 1})  # batches holding no decodable image at all
    one_by_one.setup()
    assert one_by_one.process(t).column("nsfw_score").to_pylist() == out.column("nsfw_score").to_pylist()
    strict = Nsfw.from_params({"classes": ["FACE_FEMALE"], "max_score": 0.2})
    strict.setup()
    assert strict.process(t).column("reject_reason").to_pylist()[0] == "nsfw"
    with pytest.raises(UsageError):
        Nsfw.from_params({"max_score": 3})


def test_classes_are_nudenet_labels_in_any_case() -> None:
    """A typo would count no class at all (every score 0): it is refused, with the detector's names."""
    assert set(EXPOSED) < set(detector_labels()) and len(detector_labels()) == 18
    assert Nsfw.from_params({"classes": "face_female,Anus_Exposed"}).config.classes == ("FACE_FEMALE", "ANUS_EXPOSED")
    with pytest.raises(UsageError, match=r"has no class 'FEMALE_BREAST_EXPOSD' \(its classes: ANUS_COVERED, .*FACE_FEMALE") as error:
        Nsfw.from_params({"classes": ["female_breast_exposd"]})
    assert "\n" not in str(error.value)


def test_cli(tmp_path: Path, photo_dataset: Path, photos: pa.Table) -> None:
    out = tmp_path / "out"
    assert run_command("stage", "nsfw", photo_dataset, out, "mode=score") == 0
    table = kept(out)
    assert table.num_rows == photos.num_rows and not rejects(out)
    assert table.column("nsfw_score").null_count == 0


def test_missing_package_is_a_usage_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if the nsfw extra were not installed
    with pytest.raises(UsageError, match=r"pip install 'mmcurate\[nsfw\]'"):
        Nsfw().setup()
