"""Fixtures of the dedup tests: real captions with planted near-duplicates and exact-Jaccard ground
truth, COCO paraphrases as hard negatives, an img2dataset output of real photos with copies."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.tests.support.dedup import THRESHOLD, duplicate_components


@pytest.fixture(scope="session")
def coco_captions(data_dir: Path) -> dict[str, list[str]]:
    """COCO captions by image id: five human paraphrases of one image each."""
    by_image: dict[str, list[str]] = defaultdict(list)
    with open(data_dir / "coco_captions" / "captions.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            by_image[row["coco_image_id"]].append(row["caption"])
    return dict(by_image)


@pytest.fixture(scope="session")
def caption_corpus(laion_sample: Path, coco_captions: dict[str, list[str]]) -> dict:
    """Real captions + planted near-duplicates, with keys, sources and exact-Jaccard components.

    Planted copies of LAION captions: upper-cased, punctuation changed, and one word appended (to
    captions of 8+ words, Jaccard >= 0.86, clear of the threshold where MinHash is a coin flip).
    """
    laion = [t for t in pq.read_table(laion_sample, columns=["TEXT"]).column("TEXT").to_pylist()]
    rng = random.Random(7)
    vocab = sorted({w for t in laion if t for w in t.split() if w.isalpha()})
    long_enough = [t for t in laion if t and len(t.split()) >= 8]
    variants = []
    for text in rng.sample([t for t in laion if t and t.split()], 120):
        variants.append(("upper", text.upper()))
        variants.append(("punct", text.replace(",", "").replace(" ", " , ", 1) + "!!"))
    for text in rng.sample(long_enough, 120):
        variants.append(("append", f"{text} {rng.choice(vocab)}"))
    coco = [(image, c) for image, caps in sorted(coco_captions.items()) for c in caps]
    docs = laion + [v for _, v in variants] + [c for _, c in coco]
    kinds = ["laion"] * len(laion) + [k for k, _ in variants] + ["coco"] * len(coco)
    images = [None] * (len(laion) + len(variants)) + [image for image, _ in coco]
    keys = [f"{i:06d}" for i in rng.sample(range(10**6), len(docs))]  # keep order unrelated to position
    return {"docs": docs, "keys": keys, "kinds": kinds, "images": images, "components": duplicate_components(docs, THRESHOLD)}


def _jpeg(data: bytes, size: int, quality: int) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return buf.getvalue()


@pytest.fixture(scope="session")
def photo_rows(photo_dir: Path) -> list[dict]:
    """24 samples from 10 real photos: each original once, 6 byte-identical copies, 4 resized and
    re-encoded copies, a sample whose sha256 img2dataset did not record, and broken image bytes."""
    files = sorted(p for p in photo_dir.iterdir() if p.suffix == ".jpg")[:10]
    photos = [f.read_bytes() for f in files]
    rows = [{"photo": i, "image": data, "kind": "original"} for i, data in enumerate(photos)]
    rows += [{"photo": i, "image": photos[i], "kind": "copy"} for i in (0, 1, 2, 3, 4, 5)]
    rows += [{"photo": i, "image": _jpeg(photos[i], 200 + 40 * i, 70), "kind": "resized"} for i in (6, 7, 8, 9)]
    rows += [{"photo": 0, "image": photos[0], "kind": "copy_no_sha"}]
    rows += [{"photo": None, "image": b"\xff\xd8\xff\xe0 not really a jpeg", "kind": "broken"}]
    rows += [{"photo": i, "image": photos[i], "kind": "copy"} for i in (5,)]
    random.Random(3).shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def i2d_copies(tmp_path_factory, photo_rows: list[dict]) -> Path:
    """``photo_rows`` as an img2dataset output of 3 tar + parquet pairs."""
    root = tmp_path_factory.mktemp("i2d") / "i2d"
    root.mkdir()
    per_file = 8
    for shard in range(0, len(photo_rows), per_file):
        name = f"{shard // per_file:05d}"
        meta = []
        with tarfile.open(root / f"{name}.tar", "w") as tar:
            for i, row in enumerate(photo_rows[shard : shard + per_file]):
                key = f"{name}{i:04d}"
                sha = None if row["kind"] == "copy_no_sha" else hashlib.sha256(row["image"]).hexdigest()
                record = {
                    "key": key,
                    "url": f"https://example.com/{key}.jpg",
                    "caption": f"photo {row['photo']} {row['kind']}",
                    "status": "success",
                    "sha256": sha,
                }
                for member, data in (
                    (f"{key}.jpg", row["image"]),
                    (f"{key}.txt", record["caption"].encode()),
                    (f"{key}.json", json.dumps(record).encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                meta.append({**record, "error_message": None, "width": 0, "height": 0})
        pq.write_table(pa.Table.from_pylist(meta), root / f"{name}.parquet")
    return root
