"""The COCO photos of ``tests/data/images``: their captions, boxes, and which box categories a caption names.

Shared by the captioning tests and ``bench/noun_phrases.py``.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa

from mmcurate.schemas import conform


def coco_captions(photo_dir: Path) -> dict[str, list[str]]:
    """``{file: its 5 human captions}`` of the COCO photos."""
    captions: dict[str, list[str]] = defaultdict(list)
    with open(photo_dir / "coco_captions.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            captions[row["file"]].append(row["caption"])
    return dict(captions)


def coco_boxes(photo_dir: Path) -> dict[str, list[dict]]:
    """``{file: [{"category", "x", "y", "w", "h"}]}``, COCO xywh in pixels."""
    boxes: dict[str, list[dict]] = defaultdict(list)
    with open(photo_dir / "coco_boxes.csv", newline="") as f:
        for row in csv.DictReader(f):
            boxes[row["file"]].append({"category": row["category"], **{k: float(row[k]) for k in ("x", "y", "w", "h")}})
    return dict(boxes)


def _head_word(category: str) -> re.Pattern:
    """A category's last word ("dining table" -> table), singular or plural, as a whole word."""
    return re.compile(rf"\b{re.escape(category.split()[-1])}(?:s|es)?\b", re.IGNORECASE)


def named_pairs(photo_dir: Path) -> list[tuple[str, str]]:
    """(caption, category) pairs where a caption names a box category of its image (191 pairs)."""
    boxes = coco_boxes(photo_dir)
    pairs = []
    for file, captions in coco_captions(photo_dir).items():
        categories = sorted({b["category"] for b in boxes.get(file, [])})
        pairs += [(caption, category) for caption in captions for category in categories if _head_word(category).search(caption)]
    return pairs


def category_recall(pairs: Iterable[tuple[str, str]], phrases: Callable[[str], list[str]]) -> tuple[float, list[tuple[str, str]]]:
    """The share of pairs whose caption's ``phrases`` contain the category's word, and the misses."""
    pairs = list(pairs)
    misses = [(caption, category) for caption, category in pairs if not any(_head_word(category).search(p) for p in phrases(caption))]
    return 1 - len(misses) / len(pairs), misses


def coco_grounded_table(photo_dir: Path) -> pa.Table:
    """The 36 COCO photos as kept mmcurate rows grounded from COCO's own boxes: per photo, its first
    caption that names a box category, each named category word a phrase with all boxes of that
    category (xyxy normalised, score 1); photos none of whose captions names a category keep their
    first caption with no phrase."""
    boxes = coco_boxes(photo_dir)
    with open(photo_dir / "manifest.csv", newline="") as f:
        sizes = {r["file"]: (int(r["width"]), int(r["height"])) for r in csv.DictReader(f)}
    rows = []
    for file, captions in sorted(coco_captions(photo_dir).items()):
        width, height = sizes[file]
        by_category = defaultdict(list)
        for b in boxes.get(file, []):
            by_category[b["category"]].append([b["x"] / width, b["y"] / height, (b["x"] + b["w"]) / width, (b["y"] + b["h"]) / height])
        caption = next((c for c in captions if any(_head_word(k).search(c) for k in by_category)), captions[0])
        found = sorted((m.start(), m.end(), k) for k in by_category for m in _head_word(k).finditer(caption))
        entries, end = [], -1
        for start, stop, category in found:
            if start >= end:  # one phrase per span ("table" for both "dining table" and "table")
                entries.append(
                    {"phrase": caption[start:stop], "start": start, "end": stop, "expression_start": start, "expression_end": stop,
                     "boxes": by_category[category], "scores": [1.0] * len(by_category[category])}
                )  # fmt: skip
                end = stop
        rows.append({"key": file.rsplit(".", 1)[0], "url": f"https://img.invalid/{file}", "caption": caption,
                     "image": (photo_dir / file).read_bytes(), "image_format": "jpg", "width": width, "height": height,
                     "grounding": entries, "num_boxes": sum(len(e["boxes"]) for e in entries)})  # fmt: skip
    table = pa.Table.from_pylist(rows)
    return conform(table.append_column("reject_reason", pa.nulls(table.num_rows, pa.string())))
