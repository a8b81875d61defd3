"""clip_score with a tiny open_clip ViT loaded through the real local-dir: path (no hub download)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mmcurate.errors import UsageError
from mmcurate.filters.clip_score import ClipScore
from mmcurate.stages.model import decode_image
from mmcurate.tests.support.filters import kept, rejects, run_command


@pytest.fixture(scope="module")
def clip(tiny_clip: str) -> ClipScore:
    stage = ClipScore.from_params({"model": tiny_clip, "min_score": None, "batch_size": 8})
    stage.setup()
    return stage


def reference_scores(model_name: str, images: list[bytes], captions: list[str], draft: tuple[int, int] | None) -> np.ndarray:
    """One pair at a time, straight through open_clip: the score the stage must reproduce."""
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    scores = []
    with torch.no_grad():
        for data, caption in zip(images, captions, strict=True):
            image = model.encode_image(preprocess(decode_image(data, draft)).unsqueeze(0))
            text = model.encode_text(tokenizer([caption]))
            scores.append(torch.nn.functional.cosine_similarity(image, text).item())
    return np.array(scores, dtype=np.float32)


def test_scores_match_open_clip_reference(clip: ClipScore, tiny_clip: str, photos: pa.Table) -> None:
    rows = photos.filter(pc.is_valid(photos.column("caption"))).take(list(range(0, 46, 4)))  # JPEG and PNG, RGB and grey
    images, captions = rows.column("image").to_pylist(), rows.column("caption").to_pylist()
    scores = clip.process(rows).column("clip_score").to_numpy()
    assert np.allclose(scores, reference_scores(tiny_clip, images, captions, clip._draft), atol=1e-5)
    # JPEG draft decoding (a reduced DCT scale, never below the model's input size) barely moves the score.
    assert np.allclose(scores, reference_scores(tiny_clip, images, captions, None), atol=0.02)
    assert np.all(np.abs(scores) <= 1.0)


def test_batch_size_does_not_change_scores(tiny_clip: str, photos: pa.Table) -> None:
    rows = photos.filter(pc.is_valid(photos.column("caption"))).slice(0, 12)
    results = []
    for batch_size, workers in ((1, 1), (5, 3)):
        stage = ClipScore.from_params({"model": tiny_clip, "min_score": None, "batch_size": batch_size, "workers": workers})
        stage.setup()
        results.append(stage.process(rows).column("clip_score").to_numpy())
    assert np.allclose(results[0], results[1], atol=1e-5)


def test_bad_rows_get_reasons_not_a_crash(clip: ClipScore, photos: pa.Table) -> None:
    good = photos.column("image")[0].as_py()
    t = pa.table(
        {
            "key": ["ok", "truncated", "garbage", "no_image", "no_caption"],
            "image": [good, good[: len(good) // 3], b"<html>not an image</html>", None, good],
            "caption": ["A plate of food.", "A plate of food.", "A plate of food.", "A plate of food.", "  "],
            "reject_reason": pa.nulls(5, pa.string()),
        }
    )
    out = clip.process(t)
    scores = out.column("clip_score").to_pylist()
    assert scores[0] is not None and scores[2:] == [None, None, None]
    reasons = out.column("reject_reason").to_pylist()
    assert reasons[2:] == ["decode_error", "image_missing", "caption_missing"]
    assert reasons[1] in (None, "decode_error")  # Pillow may decode a truncated JPEG's first rows


def test_threshold_and_score_mode(tiny_clip: str, photos: pa.Table) -> None:
    rows = photos.filter(pc.is_valid(photos.column("caption")))
    scorer = ClipScore.from_params({"model": tiny_clip, "mode": "score"})
    scorer.setup()
    scored = scorer.process(rows)
    scores = scored.column("clip_score").to_numpy()
    assert scored.column("reject_reason").null_count == rows.num_rows
    threshold = float(np.median(scores))
    stage = ClipScore.from_params({"model": tiny_clip, "min_score": threshold})
    stage.setup()
    reasons = stage.process(rows).column("reject_reason").to_pylist()
    assert [r == "low_clip_score" for r in reasons] == list(scores.astype(np.float64) < threshold)


def test_model_errors_are_usage_errors(tmp_path: Path) -> None:
    for params in ({"model": f"local-dir:{tmp_path / 'nothing'}"}, {"model": "ViT-Nope-99", "pretrained": None}):
        stage = ClipScore.from_params(params)
        with pytest.raises(UsageError, match="cannot load open_clip model"):
            stage.setup()
    with pytest.raises(UsageError):
        ClipScore.from_params({"min_score": 2})


def test_random_weights_only_when_asked_for(tmp_path: Path, tiny_clip: str) -> None:
    """A built-in name without a tag, or a folder without weights, would be a randomly initialised
    CLIP: refused; ``pretrained: random`` asks for one."""
    (tmp_path / "no_weights").mkdir()
    config = Path(tiny_clip.removeprefix("local-dir:")) / "open_clip_config.json"
    (tmp_path / "no_weights" / "open_clip_config.json").write_text(config.read_text())
    for params, message in (
        ({"model": "ViT-B-32", "pretrained": None}, "no pretrained tag, so its weights would be random: give one of openai, .*, random"),
        ({"model": f"local-dir:{tmp_path / 'no_weights'}"}, "weights .* could not be loaded"),
    ):
        with pytest.raises(UsageError, match=message):
            ClipScore.from_params(params).setup()
    stage = ClipScore.from_params({"model": "mmcurate-tiny-clip", "pretrained": "random"})  # the name tiny_clip registered
    stage.setup()
    assert stage._model.visual.image_size == (64, 64)


def test_cli(tmp_path: Path, photo_dataset: Path, photos: pa.Table, tiny_clip: str) -> None:
    out = tmp_path / "out"
    assert run_command("stage", "clip_score", photo_dataset, out, f"model={tiny_clip}", "min_score=0.0", "batch_size=16") == 0
    table, rejected = kept(out), rejects(out)
    assert table.num_rows + len(rejected) == photos.num_rows
    assert table.column("clip_score").null_count == 0 and pc.min(table.column("clip_score")).as_py() >= 0.0
    assert set(rejected.values()) <= {"caption_missing", "low_clip_score"}
    assert list(rejected.values()).count("caption_missing") == photos.column("caption").null_count


def test_missing_package_is_a_usage_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if the models extra were not installed
    with pytest.raises(UsageError, match=r"pip install 'mmcurate\[models\]'"):
        ClipScore().setup()
