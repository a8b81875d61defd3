"""Fixtures shared by every test folder. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No model hub is reachable: fail fast instead of waiting for a network time-out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repo (real test data with its licenses)."""
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the repo")
    return SHARED_DATA


@pytest.fixture(scope="session")
def laion_sample(shared_data: Path) -> Path:
    """1,000 real LAION URL/caption rows (columns URL, TEXT)."""
    return shared_data / "url_caption_samples" / "test_1000.parquet"


@pytest.fixture(scope="session")
def photo_dir(shared_data: Path) -> Path:
    """53 real CC-licensed / public-domain photos with manifest.csv and COCO captions."""
    return shared_data / "images"


@pytest.fixture(scope="session")
def img2dataset_output(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """A folder in img2dataset's output layout made from 12 real photos: 2 shards, each a tar
    (KEY.jpg, KEY.txt, KEY.json), a Parquet of every row (2 failed downloads among them) and a
    _stats.json, as img2dataset 1.47 writes them with output_format=webdataset."""
    import hashlib
    import io
    import json
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root = tmp_path_factory.mktemp("img2dataset")
    photos = sorted(photo_dir.glob("coco_*.jpg"))[:12]
    for shard in range(2):
        rows = []
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for i, photo in enumerate(photos[shard * 6 : shard * 6 + 6]):
                key = f"{shard:05d}{i:04d}"
                url = f"http://images.example.org/{photo.name}"
                caption = f"photo {photo.stem}"
                failed = i == 5
                row = {"key": key, "url": url, "caption": caption, "status": "failed_to_download" if failed else "success",
                       "error_message": "HTTP Error 404: Not Found" if failed else None, "width": None, "height": None,
                       "original_width": None, "original_height": None, "exif": None, "sha256": None}
                if not failed:
                    data = photo.read_bytes()
                    with Image.open(io.BytesIO(data)) as im:
                        row.update(width=im.width, height=im.height, original_width=im.width, original_height=im.height)
                    row["sha256"] = hashlib.sha256(data).hexdigest()
                    for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", json.dumps(row).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
                rows.append(row)
        schema = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
                            ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                            ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()), ("sha256", pa.string())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 6, "successes": 5, "failed_to_download": 1}))
    return root
