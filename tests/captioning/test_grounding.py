"""grounding with tiny random OWLv2 and Grounding DINO models on real COCO photos and phrases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mmcurate.captioning.grounding import Grounding, select_boxes
from mmcurate.cli import main
from mmcurate.errors import UsageError
from mmcurate.stages.model import decode_image
from mmcurate.tests.support.coco import coco_grounded_table
from mmcurate.tests.support.detectors import save_grounding_dino, save_owlv2
from mmcurate.tests.support.filters import kept, read_parquet_folder, write_dataset


@pytest.fixture(scope="module")
def phrases(photo_dir: Path) -> pa.Table:
    """The COCO photos with the category words of their caption as phrases, boxes not yet found; one row without an image."""
    table = coco_grounded_table(photo_dir).slice(0, 12)
    entries = [[{**e, "boxes": [], "scores": []} for e in g] for g in table.column("grounding").to_pylist()]
    table = table.set_column(table.column_names.index("grounding"), "grounding", pa.array(entries, table.schema.field("grounding").type))
    images = table.column("image").to_pylist()
    images[3] = None
    return table.set_column(table.column_names.index("image"), "image", pa.array(images, pa.binary())).drop_columns(["num_boxes"])


@pytest.fixture(scope="module")
def owlv2(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_owlv2(tmp_path_factory.mktemp("owlv2")))


@pytest.fixture(scope="module")
def grounding_dino(tmp_path_factory: pytest.TempPathFactory, phrases: pa.Table) -> str:
    words = sorted({w for g in phrases.column("grounding").to_pylist() for e in g for w in e["phrase"].lower().split()})
    return str(save_grounding_dino(tmp_path_factory.mktemp("gdino"), words))


def stage(detector: str, **options) -> Grounding:
    s = Grounding.from_params({"detector": detector, "device": "cpu", **options})
    s.setup()
    return s


def check_boxes(table: pa.Table) -> int:
    """Every box four numbers in [0, 1] with x0 <= x1, y0 <= y1; scores match; num_boxes adds up. The boxes."""
    total = 0
    for entries, count in zip(table.column("grounding").to_pylist(), table.column("num_boxes").to_pylist(), strict=True):
        assert count == sum(len(e["boxes"]) for e in entries)
        for e in entries:
            assert e["boxes"] and len(e["boxes"]) == len(e["scores"])
            for x0, y0, x1, y1 in e["boxes"]:
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        total += count
    return total


@pytest.mark.parametrize("detector", ["owlv2", "grounding_dino"])
def test_batched_padded_phrases_match_one_image_at_a_time(detector: str, phrases: pa.Table, request) -> None:
    folder = request.getfixturevalue(detector)
    phrases = phrases.slice(0, 7)
    if detector == "grounding_dino":
        # Grounding DINO keeps each image's aspect ratio and pads a batch to its largest image, which
        # moves its boxes (transformers' own processor does the same): one photo, many phrase lists.
        image = phrases.column("image")[0]
        phrases = phrases.set_column(
            phrases.column_names.index("image"), "image", pa.array([image.as_py()] * phrases.num_rows, pa.binary())
        )
    one = stage(folder, threshold=0.0, batch_size=1).process(phrases)
    many = stage(folder, threshold=0.0, batch_size=5).process(phrases)
    assert check_boxes(one) > 0
    assert one.column("reject_reason").to_pylist() == many.column("reject_reason").to_pylist()
    for a, b in zip(one.column("grounding").to_pylist(), many.column("grounding").to_pylist(), strict=True):
        assert [e["phrase"] for e in a] == [e["phrase"] for e in b]
        for x, y in zip(a, b, strict=True):
            assert np.allclose(x["boxes"], y["boxes"], atol=1e-4) and np.allclose(x["scores"], y["scores"], atol=1e-4)


def test_owlv2_boxes_agree_with_transformers_post_processing(owlv2: str, phrases: pa.Table) -> None:
    import torch
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    row = phrases.slice(0, 1)
    texts = [e["phrase"] for e in row.column("grounding")[0].as_py()]
    grounding = stage(owlv2, threshold=0.3, nms_iou=1.0)
    got = grounding.process(row).column("grounding")[0].as_py()
    model, processor = AutoModelForZeroShotObjectDetection.from_pretrained(owlv2), AutoProcessor.from_pretrained(owlv2)
    image = decode_image(row.column("image")[0].as_py(), grounding.detector.draft)
    inputs = processor(text=[texts], images=image, return_tensors="pt", padding="max_length", truncation=True, max_length=16)
    with torch.no_grad():
        outputs = model(**inputs)
    side = max(image.size)
    found = processor.post_process_grounded_object_detection(outputs, threshold=0.3, target_sizes=[(side, side)])[0]
    scale = torch.tensor([image.width, image.height] * 2)
    want = {}
    for box, score, label in zip(
        (found["boxes"] / scale).clamp(0, 1).tolist(), found["scores"].tolist(), found["labels"].tolist(), strict=True
    ):
        if box[2] > box[0] and box[3] > box[1]:
            want.setdefault(texts[label], []).append((score, box))
    assert {e["phrase"]: sorted(zip(e["scores"], e["boxes"], strict=True), reverse=True) for e in got}.keys() == want.keys()
    for e in got:
        mine = sorted(zip(e["scores"], e["boxes"], strict=True), reverse=True)
        theirs = sorted(want[e["phrase"]], reverse=True)
        assert len(mine) == len(theirs)
        assert np.allclose([s for s, _ in mine], [s for s, _ in theirs], atol=1e-4)
        assert np.allclose([b for _, b in mine], [b for _, b in theirs], atol=1e-4)


def test_nms_across_phrases_threshold_and_degenerate_boxes() -> None:
    labels = np.array([0, 1, 1, 2, 0])
    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.5, 0.52], [0.6, 0.6, 0.9, 0.9], [0.3, 0.3, 0.3, 0.6], [0.7, 0.0, 1.4, 0.2]])
    scores = np.array([0.8, 0.9, 0.2, 0.95, 0.5])
    found = select_boxes(labels, boxes, scores, threshold=0.3, nms_iou=0.5)
    # box 1 (phrase 1) suppresses box 0 (phrase 0); box 2 is below the threshold; box 3 is a line; box 4 is clipped
    assert found == [(1, (0.12, 0.1, 0.5, 0.52), 0.9), (0, (0.7, 0.0, 1.0, 0.2), 0.5)]
    assert len(select_boxes(labels, boxes, scores, threshold=0.3, nms_iou=1.0)) == 3


def test_min_boxes_and_score_mode(owlv2: str, phrases: pa.Table) -> None:
    rejected = stage(owlv2, threshold=1.0).process(phrases)
    reasons = rejected.column("reject_reason").to_pylist()
    assert reasons[3] == "image_missing" and reasons.count("no_grounding") == len(reasons) - 1
    scored = stage(owlv2, threshold=1.0, mode="score").process(phrases)
    assert scored.column("reject_reason").null_count == phrases.num_rows
    assert (
        scored.column("num_boxes").to_pylist() == [0] * phrases.num_rows
        and scored.column("grounding").to_pylist() == [[]] * phrases.num_rows
    )


def test_detector_architecture_is_read_from_its_config(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="is a bert model"):
        stage(str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        stage(str(tmp_path / "missing"))


def test_cli_stage_writes_normalised_boxes_and_rows_add_up(owlv2: str, phrases: pa.Table, tmp_path: Path) -> None:
    source = write_dataset(tmp_path / "in", phrases, shards=2)
    args = ["stage", "grounding", "--input", str(source), "--output", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    assert main([*args, "--set", f"detector={owlv2}", "--set", "threshold=0.2", "--set", "device=cpu"]) == 0
    out, rejects = kept(tmp_path / "out"), read_parquet_folder(tmp_path / "out" / "rejects")
    assert out.num_rows + rejects.num_rows == phrases.num_rows and out.num_rows > 0
    assert check_boxes(out) > 0
    assert set(pc.unique(rejects.column("reject_reason")).to_pylist()) <= {"image_missing", "no_grounding"}
    assert main(["validate", str(tmp_path / "out")]) == 0


def test_grit_preset_then_kosmos2_export(nlp, owlv2: str, photo_dir: Path, tmp_path: Path) -> None:
    """URLs to grounded shards with the grit preset, then to Kosmos-2 text that transformers parses."""
    import json

    from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

    from mmcurate.examples.demo import serve
    from mmcurate.tests.support.coco import coco_captions

    captions = dict(sorted(coco_captions(photo_dir).items())[:6])
    with serve(photo_dir) as base:
        lines = [json.dumps({"url": f"{base}/{file}", "caption": texts[0]}) for file, texts in captions.items()]
        (tmp_path / "urls.jsonl").write_text("\n".join(lines) + "\n")
        settings = ["download.allow_private_networks=true", f"grounding.detector={owlv2}", "grounding.threshold=0.2"]
        args = ["run", "grit", "--input", str(tmp_path / "urls.jsonl"), "--output", str(tmp_path / "out"), "--workers", "1"]
        assert main([*args, "--no-progress", *(a for s in [*settings, "grounding.device=cpu"] for a in ("--set", s))]) == 0
    out, rejects = kept(tmp_path / "out"), read_parquet_folder(tmp_path / "out" / "rejects")
    assert out.num_rows + rejects.num_rows == len(captions) and out.num_rows > 0
    assert check_boxes(out) > 0
    assert main(["export", "kosmos2", str(tmp_path / "out"), str(tmp_path / "kosmos2")]) == 0
    texts = [json.loads(line)["text"] for f in sorted((tmp_path / "kosmos2").glob("*.jsonl")) for line in f.read_text().splitlines()]
    expected = {r["key"]: r for r in out.to_pylist()}
    assert len(texts) == out.num_rows
    for text, row in zip(texts, expected.values(), strict=True):
        caption, entities = clean_text_and_extract_entities_with_bboxes(text)
        assert caption == row["caption"] and [e[0] for e in entities] == [g["phrase"] for g in row["grounding"]]
