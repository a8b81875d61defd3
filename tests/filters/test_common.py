"""Shared filter helpers: image decoding, bounded prefetching, source sizes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from mmcurate.filters.common import source_sizes
from mmcurate.stages.model import decode_image, prefetched


def test_decode_image(photo_dir: Path) -> None:
    grey = decode_image((photo_dir / "skimage_camera.png").read_bytes())
    assert grey is not None and grey.mode == "RGB" and grey.size == (512, 512)
    # Draft decoding of a JPEG never goes below the requested size.
    retina = decode_image((photo_dir / "skimage_retina.jpg").read_bytes(), draft=(224, 224))
    assert retina is not None and 224 <= min(retina.size) < 1411
    assert decode_image(None) is None and decode_image(b"GIF89a broken") is None


def test_prefetched_keeps_order_and_bounds_work_ahead() -> None:
    submitted: list[int] = []

    def items():
        for x in range(50):
            submitted.append(x)
            yield x

    results: list[int] = []
    with ThreadPoolExecutor(8) as pool:
        for value in prefetched(pool, lambda x: x * x, items(), depth=3):
            assert len(submitted) - len(results) <= 4  # the one being handed over + at most depth ahead
            results.append(value)
    assert results == [x * x for x in range(50)]


def test_source_sizes_fall_back_to_stored_size() -> None:
    t = pa.table(
        {
            "original_width": pa.array([800, None, None], pa.int32()),
            "original_height": pa.array([600, None, None], pa.int32()),
            "width": pa.array([256, 256, None], pa.int32()),
            "height": pa.array([192, 100, None], pa.int32()),
        }
    )
    width, height = source_sizes(t)
    assert width[:2].tolist() == [800, 256] and height[:2].tolist() == [600, 100] and np.isnan(width[2])
