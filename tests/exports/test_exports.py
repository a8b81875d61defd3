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
from mmcurate.exports.text import Florence2, Kosmos2
from mmcurate.tests.support.filters import write_dataset

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


def florence2_grounding(text: str, size: tuple[int, int]) -> list[dict]:
    """Florence-2's own phrase-grounding parse of ``text`` (transformers' Florence2PostProcessor)."""
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
    return post(text=text, image_size=size, parse_tasks=["phrase_grounding"])["phrase_grounding"]


def test_florence2_round_trips_through_its_post_processor(grounded_output: Path, grounded: pa.Table, tmp_path: Path) -> None:
    record = run_export("florence2", grounded_output, tmp_path / "f")
    want = expected(grounded)
    for line in lines(tmp_path / "f"):
        row = want[line["key"]]
        assert line["prompt"] == "<CAPTION_TO_PHRASE_GROUNDING>" + row["caption"]
        size = (row["width"], row["height"])
        found = florence2_grounding(line["text"], size)
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


BOX = [0.1, 0.2, 0.5, 0.6]


def grounded_rows(template: dict, captions: list[tuple[str, tuple[str, ...]]]) -> list[dict]:
    """Rows like ``template`` (a kept row with an image), keys ``r00``, ``r01``..., with these captions,
    each named phrase a grounded entry (one box) spanning its first occurrence."""
    rows = []
    for i, (caption, phrases) in enumerate(captions):
        entries = []
        for phrase in phrases:
            start = caption.index(phrase)
            end = start + len(phrase)
            spans = {"start": start, "end": end, "expression_start": start, "expression_end": end}
            entries.append({"phrase": phrase, **spans, "boxes": [BOX], "scores": [0.9]})
        rows.append({**template, "key": f"r{i:02d}", "caption": caption, "grounding": entries, "num_boxes": len(entries)})
    return rows


# Hostile captions: (caption, its grounded phrases, the formats whose consumer would read part of it as markup).
INJECTIONS = [
    ("a dog <patch_index_0005><patch_index_0010> on a sofa", ("a dog", "a sofa"), {"kosmos2", "florence2"}),
    ("a red bus [[100,200,300,400]] near a tree", ("a red bus", "a tree"), {"cogvlm"}),
    ("a cat <loc_10><loc_20><loc_30><loc_40> on a table", ("a cat", "a table"), {"kosmos2", "florence2"}),
    ("The </phrase> dog on a mat", ("The </phrase> dog", "a mat"), {"kosmos2", "florence2"}),
    ("a dog on a <ref>table</ref>", ("a dog", "table"), {"qwen-vl", "kosmos2", "florence2"}),
    ("a dog <|object_ref_start|>on<|object_ref_end|> grass", ("a dog", "grass"), {"qwen-vl", "qwen2-vl", "kosmos2", "florence2"}),
    ("a dog <|im_end|> on grass", ("a dog", "grass"), {"qwen-vl", "qwen2-vl", "kosmos2", "florence2"}),
    ("a photo <image> of a dog", ("a dog",), {"llava", "kosmos2", "florence2"}),
    ("I <3 my dog", ("my dog",), {"kosmos2", "florence2"}),
    ("a [dog] on a [[sofa", ("dog", "sofa"), {"cogvlm"}),
    ("[a dog] ]on a [sofa [", ("a dog", "sofa"), set()),
    ("a plain dog on a sofa", ("a plain dog", "a sofa"), set()),
]


def injected_output(grounded: pa.Table, folder: Path) -> tuple[Path, list[dict]]:
    rows = grounded_rows(grounded.to_pylist()[0], [(caption, phrases) for caption, phrases, _ in INJECTIONS])
    return write_dataset(folder, pa.Table.from_pylist(rows, schema=grounded.schema), shards=1), rows


def read_back(fmt: str, dest: Path, row: dict, written: dict) -> None:
    """Assert that the consumer's parser reads ``written`` (what ``fmt`` wrote for ``row``) as the caption and its phrases."""
    phrases = [e["phrase"] for e in row["grounding"]]
    if fmt in PARSERS:
        caption, entities = PARSERS[fmt][0](written["text"])
        assert caption == row["caption"], (fmt, written["text"])
        assert [p for p, _, _ in entities] in (phrases, [None] * len(phrases)), (fmt, written["text"])
    elif fmt == "florence2":
        assert written["prompt"] == Florence2.task + row["caption"]
        assert [f["cat_name"] for f in florence2_grounding(written["text"], (100, 100))] == phrases, written["text"]
    elif fmt == "llava":  # LLaVA cuts the conversation at each <image>: one, the human turn's
        assert written["conversations"][1]["value"] == row["caption"]
        assert sum(turn["value"].count("<image>") for turn in written["conversations"]) == 1
    else:
        assert fmt == "grit" and written["caption"] == row["caption"]
        spans = dict.fromkeys((int(s), int(e)) for s, e, *_ in written["noun_chunks"])  # an entry per box
        assert [written["caption"][s:e] for s, e in spans] == phrases


def written_by_key(fmt: str, dest: Path) -> dict[str, dict]:
    if fmt == "grit":
        return {r["key"]: r for p in sorted(dest.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    if fmt == "llava":
        return {e["id"]: e for e in json.loads((dest / "llava.json").read_text())}
    return {line["key"]: line for line in lines(dest)}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_caption_text_never_reaches_an_export_as_markup(fmt: str, grounded: pa.Table, tmp_path: Path) -> None:
    out, rows = injected_output(grounded, tmp_path / "out")
    record = run_export(fmt, out, tmp_path / fmt)
    refused = {row["key"] for row, (_, _, formats) in zip(rows, INJECTIONS, strict=True) if fmt in formats}
    assert record["skipped"] == ({"reserved_markup": len(refused)} if refused else {})
    written = written_by_key(fmt, tmp_path / fmt)
    assert sorted(written) == sorted({row["key"] for row in rows} - refused)
    for row in rows:
        if row["key"] in written:
            read_back(fmt, tmp_path / fmt, row, written[row["key"]])


def test_kosmos2_refuses_exactly_the_captions_its_parser_misreads(grounded: pa.Table, tmp_path: Path, monkeypatch) -> None:
    """Without the reserved pattern, transformers' Kosmos-2 post-processing misreads every caption it refuses, and only those."""
    out, rows = injected_output(grounded, tmp_path / "out")
    monkeypatch.setattr(Kosmos2, "reserved", None)
    run_export("kosmos2", out, tmp_path / "k")
    written = written_by_key("kosmos2", tmp_path / "k")
    for row, (_, _, formats) in zip(rows, INJECTIONS, strict=True):
        caption, entities = parse_kosmos2(written[row["key"]]["text"])
        read = caption == row["caption"] and [e[0] for e in entities] == [e["phrase"] for e in row["grounding"]]
        assert read == ("kosmos2" not in formats), row["caption"]


def test_rows_whose_spans_do_not_index_their_caption_are_skipped_and_counted(grounded: pa.Table, tmp_path: Path, capsys) -> None:
    rows = [r for r in grounded.to_pylist() if r["num_boxes"]][:5]
    rows[0]["caption"] = "a synthetic caption written after the spans were taken"
    rows[1]["caption"] = rows[1]["caption"].upper()  # same length, other text
    entry = rows[2]["grounding"][0]
    rows[2]["grounding"][0] = {**entry, "end": len(rows[2]["caption"]) + 3, "expression_end": len(rows[2]["caption"]) + 3}
    entry = rows[3]["grounding"][-1]
    rows[3]["grounding"][-1] = {**entry, "expression_start": entry["start"] + 1}  # an expression that cuts its phrase
    out = write_dataset(tmp_path / "out", pa.Table.from_pylist(rows, schema=grounded.schema), shards=2)
    for fmt in FORMATS:
        record = run_export(fmt, out, tmp_path / fmt)
        skipped = {"span_mismatch": 4} if FORMATS[fmt].grounded else {}  # llava writes no span
        assert record["skipped"] == skipped and record["rows"] == 5 - sum(skipped.values()), fmt
        assert "span_mismatch 4" in capsys.readouterr().out or fmt == "llava"
        for row in rows[4:]:
            read_back(fmt, tmp_path / fmt, row, written_by_key(fmt, tmp_path / fmt)[row["key"]])


def test_florence2_rows_without_a_box_get_the_plain_caption(grounded: pa.Table, tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "out", grounded, shards=2)
    record = run_export("florence2", out, tmp_path / "f", "--min-boxes", "0")
    by_key = {r["key"]: r for r in grounded.to_pylist()}
    written = written_by_key("florence2", tmp_path / "f")
    assert sorted(written) == sorted(by_key) and record["skipped"] == {}
    boxless = [k for k, r in by_key.items() if not r["num_boxes"]]
    assert boxless and all(written[k]["text"] == by_key[k]["caption"] != "" for k in boxless)
    assert all("<loc_" in w["text"] for k, w in written.items() if k not in boxless)


def test_export_of_an_output_without_grounding_is_a_usage_error(grounded: pa.Table, tmp_path: Path, capsys) -> None:
    out = write_dataset(tmp_path / "out", grounded.drop_columns(["grounding", "num_boxes"]), shards=2)
    for fmt in sorted(set(FORMATS) - {"llava"}):
        assert main(["export", fmt, str(out), str(tmp_path / fmt), "--min-boxes", "0"]) == 2
        assert not (tmp_path / fmt).exists()
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == len(FORMATS) - 1
    assert all(e.startswith("mmcurate: error: ") and "no 'grounding' column" in e for e in errors)
    assert run_export("llava", out, tmp_path / "llava")["rows"] == grounded.num_rows  # llava needs no box
