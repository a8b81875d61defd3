"""Dataset-file formats: GRIT-20M's Parquet columns and LLaVA's pretraining JSON.

- ``grit`` writes ``DEST/{id:05d}.parquet`` with GRIT-20M's columns ``key, url, caption, width,
  height, noun_chunks, ref_exps``; each entry is ``[start, end, x0, y0, x1, y1, score]`` (character
  span, normalised box), one per box. ``ref_exps`` holds the referring expressions (a phrase's
  expression span with the phrase's boxes) that no other expression contains. No images. Its
  ``target`` is the caption the spans index.
- ``llava`` writes ``DEST/llava.json``, one JSON array of ``{"id", "image": "00000/KEY.jpg",
  "conversations": [{"from": "human", "value": "<image>\\n" + instruction}, {"from": "gpt", "value":
  caption}]}``, with the images under ``DEST/images/`` (LLaVA's ``--image_folder``). The
  instruction is drawn from the configured list by a hash of the seed and the key. Rows need no box.
  Its ``target`` is the gpt turn and its ``prompt`` the human turn.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from mmcurate.exports.base import Format, Phrase, Sample
from mmcurate.shards.layout import shard_name

_ENTRIES = pa.list_(pa.list_(pa.float64()))
GRIT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("noun_chunks", _ENTRIES),
        ("ref_exps", _ENTRIES),
    ]
)


def _entries(spans: list[tuple[int, int, Phrase]]) -> list[list[float]]:
    return [
        [float(start), float(end), *map(float, box), float(score)]
        for start, end, p in spans
        for box, score in zip(p.boxes, p.scores, strict=True)
    ]


def outermost_expressions(phrases: tuple[Phrase, ...]) -> list[tuple[int, int, Phrase]]:
    """The expression spans that no other phrase's expression contains (KOSMOS-2's rule), in order."""
    spans = sorted({(p.expression_start, p.expression_end): p for p in phrases}.items())
    return [
        (start, end, p) for (start, end), p in spans if not any(s <= start and end <= e and (s, e) != (start, end) for (s, e), _ in spans)
    ]


class Grit(Format):
    name = "grit"
    needs_image = False

    def target(self, sample: Sample) -> dict[str, Any]:
        return {
            "target": sample.caption,
            "noun_chunks": _entries([(p.start, p.end, p) for p in sample.phrases]),
            "ref_exps": _entries(outermost_expressions(sample.phrases)),
        }

    def write_shard(self, shard_id: int, samples: list[Sample]) -> None:
        targets = [self.target(s) for s in samples]
        rows = {
            "key": [s.key for s in samples],
            "url": [s.url for s in samples],
            "caption": [t["target"] for t in targets],
            "width": [s.width for s in samples],
            "height": [s.height for s in samples],
            "noun_chunks": [t["noun_chunks"] for t in targets],
            "ref_exps": [t["ref_exps"] for t in targets],
        }
        self.dest.write_parquet(self.dest.path(f"{shard_name(shard_id)}.parquet"), pa.table(rows, schema=GRIT_SCHEMA))
        self.record(samples)


class Llava(Format):
    name = "llava"
    min_boxes = 0
    grounded = False
    reserved = re.compile(r"<image>|<im_(?:start|end|patch)>")  # LLaVA's image placeholders, cut out of any turn
    path = "llava.json"

    def target(self, sample: Sample) -> dict[str, Any]:
        """The human turn as ``prompt``, the caption (the gpt turn) as ``target``."""
        return {"target": sample.caption, "prompt": "<image>\n" + self.instruction(sample.key)}

    def begin(self) -> None:
        self._out = self.files.enter_context(self.dest.open_atomic(self.dest.path(self.path)))
        self._out.write(b"[")
        self._first = True

    def write_shard(self, shard_id: int, samples: list[Sample]) -> None:
        self.write_images(samples)
        for s in samples:
            fields = self.target(s)
            turns = [{"from": "human", "value": fields["prompt"]}, {"from": "gpt", "value": fields["target"]}]
            entry = {"id": s.key, "image": s.image_path, "conversations": turns}
            self._out.write((("\n" if self._first else ",\n") + json.dumps(entry, ensure_ascii=False)).encode())
            self._first = False
        self.record(samples)

    def finish(self) -> None:
        self._out.write(b"\n]\n")
