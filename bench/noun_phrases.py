"""Phrase extraction on the COCO captions of ``tests/data/images``: noun_phrases against raw spaCy noun_chunks.

Recall is the share of (caption, category) pairs, where a caption names a COCO box category of its
image (191 pairs), whose phrases contain the category's word; the pairs and the recall are defined
in ``tests/support/coco.py``. Also prints phrases per caption and captions/s of both
(parse included), best of ``--repeat``.

    python bench/noun_phrases.py [--model en_core_web_sm] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from mmcurate.captioning.noun_phrases import NounPhraseExtractor, load_spacy
from mmcurate.tests.support import DATA
from mmcurate.tests.support.coco import category_recall, coco_captions, named_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--model", default="en_core_web_sm")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    nlp = load_spacy(args.model)
    extractor = NounPhraseExtractor(nlp)
    captions = [c for cs in coco_captions(DATA / "images").values() for c in cs]
    pairs = named_pairs(DATA / "images")

    def raw(texts: list[str]) -> list[list[str]]:
        return [[chunk.text for chunk in doc.noun_chunks] for doc in nlp.pipe(texts)]

    def repaired(texts: list[str]) -> list[list[str]]:
        return [[e["phrase"] for e in entries] for entries in extractor.entries(texts)]

    for name, fn in (("spaCy noun_chunks", raw), ("noun_phrases", repaired)):
        seconds = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            found = dict(zip(captions, fn(captions), strict=True))
            seconds.append(time.perf_counter() - start)
        recall, misses = category_recall(pairs, found.__getitem__)
        per_caption = sum(map(len, found.values())) / len(found)
        found_pairs = f"{len(pairs) - len(misses)}/{len(pairs)}"
        rate = len(captions) / min(seconds)
        print(f"{name:18} recall {recall:.3f} ({found_pairs}), {per_caption:.2f} phrases/caption, {rate:.0f} captions/s")
        for caption, category in misses:
            print(f"    missed {category!r}: {caption}")


if __name__ == "__main__":
    main()
