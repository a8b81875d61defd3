"""mmcurate export: every format read back by its consumer's own parser, or one written from its specification."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.cli import main
from mmcurate.exports import FORMATS, ExportOptions, export
from mmcurate.exports.base import BRIEF_INSTRUCTIONS

EPS = 1e-6


def run_export(fmt: str, source: Path, dest: Path, *args: str) -> dict:
    assert main(["export", fmt, str(source), str(dest), *args]) == 0
    return json.loads((dest / "export.json").read_text())


def lines(dest: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(dest.glob("*.jsonl")) for line in path.read_text().splitlines()]


def expected(grounded: pa.Table) -> dict[str, dict]:
    """``{key: row}`` of the rows with at least one box."""
    return {r["key"]: r for r in grounded.to_pylist() if r["num_boxes"]}


# Parsers: text -> (caption without markup, [(phrase or None, (start, end), [normalised boxes])]).


def parse_kosmos2(text: str) -> tuple[str, list]:
    from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

    return clean_text_and_extract_entities_with_bboxes(text)


def tagged(ref: tuple[str, str], box: tuple[str, str]):
    """A parser of ``REF phrase /REF`` followed by ``BOX (x1,y1),(x2,y2) /BOX`` groups, integers in thousandths."""
    one = re.escape(box[0]) + r"\((\d+),(\d+)\),\((\d+),(\d+)\)" + re.escape(box[1])
    pattern = re.compile(re.escape(ref[0]) + "(.*?)" + re.escape(ref[1]) + f"((?:{one})+)")

    def parse(text: str) -> tuple[str, list]:
        clean, entities, at = "", [], 0
        for m in pattern.finditer(text):
            clean += text[at : m.start()]
            start = len(clean)
            clean += m.group(1)
            boxes = [tuple(int(v) / 1000 for v in b) for b in re.findall(one, m.group(2))]
            entities.append((m.group(1), (start, len(clean)), boxes))
            at = m.end()
        return clean + text[at:], entities

    return parse


def parse_cogvlm(text: str) -> tuple[str, list]:
    """CogVLM's ``text [[x0,y0,x1,y1;...]]``: boxes belong to the text before them, so only the end is known."""
    clean, entities, at = "", [], 0
    for m in re.finditer(r" \[\[(\d{3},\d{3},\d{3},\d{3}(?:;\d{3},\d{3},\d{3},\d{3})*)\]\]", text):
        clean += text[at : m.start()]
        boxes = [tuple(int(v) / 1000 for v in b.split(",")) for b in m.group(1).split(";")]
        entities.append((None, (None, len(clean)), boxes))
        at = m.end()
    return clean + text[at:], entities


PARSERS = {
    "kosmos2": (parse_kosmos2, 1 / 32),
    "qwen-vl": (tagged(("<ref>", "</ref>"), ("<box>", "</box>")), 1 / 1000),
    "qwen2-vl": (tagged(("<|object_ref_start|>", "<|object_ref_end|>"), ("<|box_start|>", "<|box_end|>")), 1 / 1000),
    "cogvlm": (parse_cogvlm, 1 / 1000),
}


@pytest.mark.parametrize("fmt", sorted(PARSERS))
def test_inline_formats_round_trip(fmt: str, grounded_output: Path, grounded: pa.Table, tmp_path: Path) -> None:
    parse, tolerance = PARSERS[fmt]
    record = run_export(fmt, grounded_output, tmp_path / fmt)
    want = expected(grounded)
    got = lines(tmp_path / fmt)
    assert [g["key"] for g in got] == sorted(want)  # keys kept, shard by shard in key order here
    for line in got:
        row = want[line["key"]]
        caption, entities = parse(line["text"])
        assert caption == row["caption"]
        assert len(entities) == len(row["grounding"])
        for (phrase, (start, end), boxes), entry in zip(entities, row["grounding"], strict=True):
            assert end == entry["end"] and phrase in (None, entry["phrase"]) and start in (None, entry["start"])
            assert len(boxes) == len(entry["boxes"])
            for box, original in zip(boxes, entry["boxes"], strict=True):
                assert all(abs(a - b) <= tolerance + EPS for a, b in zip(box, original, strict=True)), (box, original)
        assert (tmp_path / fmt / line["image"]).read_bytes() == row["image"]
    assert record["rows"] == len(want) and record["skipped"] == {"too_few_boxes": grounded.num_rows - len(want)}
    assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == ["00000.jsonl", "00001.jsonl", "00002.jsonl", "export.json", "images"]
    assert record["boxes"] == sum(r["num_boxes"] for r in want.values())
    quantisation = record["quantisation"]
    assert 0 < quantisation["min_iou"] <= quantisation["mean_iou"] < 1.0
    assert quantisation["mean_iou"] > (0.7 if fmt == "kosmos2" else 0.95)  # a 32 x 32 grid against 1000 bins


def test_kosmos2_cells_are_transformers_patch_indices(grounded_output: Path, grounded: pa.Table, tmp_path: Path) -> None:
    from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index

    run_export("kosmos2", grounded_output, tmp_path / "k")
    want = expected(grounded)
    for line in lines(tmp_path / "k"):
        cells = [tuple(map(int, pair)) for pair in re.findall(r"<patch_index_(\d{4})><patch_index_(\d{4})>", line["text"])]
        boxes = [b for e in want[line["key"]]["grounding"] for b in e["boxes"]]
        assert cells == [coordinate_to_patch_index(tuple(b), 32) for b in boxes]


def test_florence2_round_trips_through_its_post_processor(grounded_output: Path, grounded: pa.Table, tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    post = Florence2PostProcessor(config={"phrase_grounding": {}}, tokenizer=tokenizer)
    record = run_export("florence2", grounded_output, tmp_path / "f")
    want = expected(grounded)
    for line in lines(tmp_path / "f"):
        row = want[line["key"]]
        assert line["prompt"] == "<CAPTION_TO_PHRASE_GROUNDING>" + row["caption"]
        size = (row["width"], row["height"])
        found = post(text=line["text"], image_size=size, parse_tasks=["phrase_grounding"])["phrase_grounding"]
        assert [f["cat_name"] for f in found] == [e["phrase"] for e in row["grounding"]]
        for f, entry in zip(found, row["grounding"], strict=True):
            for box, original in zip(f["bbox"], entry["boxes"], strict=True):
                pixels = [v * size[i % 2] for i, v in enumerate(original)]
                assert all(abs(a - b) <= size[i % 2] / 1000 + 1 for i, (a, b) in enumerate(zip(box, pixels, strict=True))), (box, pixels)
    assert 0.9 < record["quantisation"]["mean_iou"] < 1.0


def test_grit_parquet(grounded_output: Path, grounded: pa.Table, tmp_path: Path) -> None:
    record = run_export("grit", grounded_output, tmp_path / "g")
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "g").glob("*.parquet"))])
    assert table.column_names == ["key", "url", "caption", "width", "height", "noun_chunks", "ref_exps"]
    want = expected(grounded)
    for row in table.to_pylist():
        entries = want[row["key"]]["grounding"]
        flat = [[e["start"], e["end"], *b, s] for e in entries for b, s in zip(e["boxes"], e["scores"], strict=True)]
        assert row["noun_chunks"] == flat
        assert row["ref_exps"] == flat  # expressions here are the phrases themselves, none inside another
    assert record["quantisation"]["mean_iou"] == 1.0 and record["rows"] == len(want)


def test_llava_json(grounded_output: Path, grounded: pa.Table, tmp_path: Path) -> None:
    record = run_export("llava", grounded_output, tmp_path / "l")
    data = json.loads((tmp_path / "l" / "llava.json").read_text())
    rows = {r["key"]: r for r in grounded.to_pylist()}
    assert sorted(d["id"] for d in data) == sorted(rows) and record["skipped"] == {}  # no box needed
    for d in data:
        human, gpt = d["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].removeprefix("<image>\n") in BRIEF_INSTRUCTIONS
        assert gpt == {"from": "gpt", "value": rows[d["id"]]["caption"]}
        assert (tmp_path / "l" / "images" / d["image"]).read_bytes() == rows[d["id"]]["image"]
    assert len({d["conversations"][0]["value"] for d in data}) > 3  # drawn per key, not one for all
    # The draw depends only on the seed and the key; a custom list is honoured.
    (tmp_path / "mine.txt").write_text("Caption this.\n\nWhat is shown?\n")
    again = export("llava", str(grounded_output), str(tmp_path / "l2"), ExportOptions(instructions=("Caption this.", "What is shown?")))
    assert again["rows"] == len(rows)
    run_export("llava", grounded_output, tmp_path / "l3", "--instructions", str(tmp_path / "mine.txt"))
    first = json.loads((tmp_path / "l2" / "llava.json").read_text())
    assert first == json.loads((tmp_path / "l3" / "llava.json").read_text())
    assert {d["conversations"][0]["value"] for d in first} == {"<image>\nCaption this.", "<image>\nWhat is shown?"}


def test_export_refuses_bad_input(grounded_output: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("not mmcurate's")
    assert main(["export", "kosmos2", str(grounded_output), str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "mine.txt").read_text() == "not mmcurate's"
    assert main(["export", "yolo", str(grounded_output), str(tmp_path / "x")]) == 2
    assert main(["export", "kosmos2", str(tmp_path / "full"), str(tmp_path / "y")]) == 2
    assert main(["export", "llava", str(grounded_output), str(tmp_path / "z"), "--instructions", str(tmp_path / "missing.txt")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("mmcurate: error: ") for e in errors)
    assert set(FORMATS) == {"kosmos2", "qwen-vl", "qwen2-vl", "cogvlm", "florence2", "grit", "llava"}


def test_grit_keeps_only_outermost_expressions() -> None:
    from mmcurate.exports.base import Phrase
    from mmcurate.exports.datasets import outermost_expressions

    box = ((0.1, 0.1, 0.5, 0.5),)
    dog = Phrase("a dog", 0, 5, 0, 20, box, (0.9,))  # "a dog on a red couch"
    couch = Phrase("a red couch", 9, 20, 9, 20, box, (0.8,))  # inside the dog's expression
    cat = Phrase("a cat", 25, 30, 25, 30, box, (0.7,))
    assert [p.text for _, _, p in outermost_expressions((couch, cat, dog))] == ["a dog", "a cat"]
