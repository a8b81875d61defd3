"""img2dataset's webdataset output layout built from real photos, for the tests that read it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def jpeg_photos(photo_dir: Path) -> list[dict]:
    """Manifest rows of the JPEG photos (sorted by file name)."""
    with open(photo_dir / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["format"] == "JPEG"]
    return sorted(rows, key=lambda r: r["file"])


I2D_SHARDS = 2
I2D_ROWS = 6  # rows per img2dataset shard; the last row of each failed to download


def _member(tar: tarfile.TarFile, name: str, data: bytes, hostile: str | None = None) -> None:
    if hostile and hostile.startswith("->"):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = tarfile.SYMTYPE, hostile[2:]
        tar.addfile(info)
        return
    info = tarfile.TarInfo(hostile or name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset(
    folder: Path,
    photos: list[dict],
    photo_dir: Path,
    shards: int = I2D_SHARDS,
    rows: int = I2D_ROWS,
    hostile: dict[str, str] | None = None,
    content: dict[str, bytes] | None = None,
) -> Path:
    """img2dataset's webdataset layout: NNNNN.tar (KEY.jpg/txt/json), NNNNN.parquet, NNNNN_stats.json.

    The last row of every shard is a failed download (in the Parquet, not in the tar).
    ``hostile`` maps an image member (``KEY.jpg``) to the name it is stored under instead (an absolute
    or ``..`` path), or, written ``"->TARGET"``, to a symbolic link to TARGET. ``content`` maps an
    image member (``KEY.jpg``) to the bytes stored instead of its photo.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        records = []
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(rows):
                photo = photos[shard * rows + i]
                key = f"{shard:05d}{i:04d}"
                url = f"https://example.com/img/{photo['file']}"
                caption = photo["caption_if_known"] or None
                if i == rows - 1:
                    records.append(
                        {
                            "key": key,
                            "url": url,
                            "caption": caption,
                            "status": "failed_to_download",
                            "error_message": "HTTP Error 404: Not Found",
                            "width": None,
                            "height": None,
                            "original_width": None,
                            "original_height": None,
                            "exif": None,
                            "sha256": None,
                        }
                    )
                    continue
                data = (content or {}).get(f"{key}.jpg") or (photo_dir / photo["file"]).read_bytes()
                meta = {
                    "url": url,
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": int(photo["width"]),
                    "height": int(photo["height"]),
                    "original_width": int(photo["width"]),
                    "original_height": int(photo["height"]),
                    "exif": "{}",
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                _member(tar, f"{key}.jpg", data, (hostile or {}).get(f"{key}.jpg"))
                _member(tar, f"{key}.txt", (caption or "").encode())
                _member(tar, f"{key}.json", json.dumps(meta).encode())
                records.append(meta)
        (folder / f"{shard:05d}.tar").write_bytes(buf.getvalue())
        schema = pa.schema(
            [
                ("key", pa.string()),
                ("url", pa.string()),
                ("caption", pa.string()),
                ("status", pa.string()),
                ("error_message", pa.string()),
                ("width", pa.int64()),
                ("height", pa.int64()),
                ("original_width", pa.int64()),
                ("original_height", pa.int64()),
                ("exif", pa.string()),
                ("sha256", pa.string()),
            ]
        )
        pq.write_table(pa.Table.from_pylist(records, schema=schema), folder / f"{shard:05d}.parquet")
        ok = sum(r["status"] == "success" for r in records)
        (folder / f"{shard:05d}_stats.json").write_text(
            json.dumps(
                {
                    "count": rows,
                    "successes": ok,
                    "failed_to_download": rows - ok,
                    "failed_to_resize": 0,
                    "status_dict": {"success": ok, "HTTP Error 404: Not Found": rows - ok},
                }
            )
        )
    return folder
