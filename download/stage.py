"""The ``download`` stage: URLs in, images and a status per row out; failed rows rejected."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
import pyarrow as pa

from mmcurate.download.batch import Outcome, download_batch
from mmcurate.download.config import DownloadConfig
from mmcurate.stages.base import Resources, Stage, reject, set_column

_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("image", pa.binary()),
    ("image_format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("sha256", pa.string()),
    ("status", pa.string()),
)


class Download(Stage):
    """Fetch every row's ``url`` (async HTTP), decode, resize and re-encode the image.

    Every row gets ``status``: ``ok`` or the reason it failed (``http_404``, ``timeout``,
    ``too_large``, ``not_an_image``, ``decode_error``, ``decompression_bomb``, ``opted_out``,
    ``bad_url``, ``bad_scheme``, ``blocked_address``, ``redirect_loop``, ...); failed rows are
    rejected with the same reason.
    """

    name = "download"
    Config = DownloadConfig
    resources = Resources(cpus=1.0)
    needs = ("url",)
    adds = tuple(name for name, _ in _COLUMNS)
    config: DownloadConfig

    def __init__(self, config: DownloadConfig | None = None) -> None:
        super().__init__(config)
        self._pool: ThreadPoolExecutor | None = None

    def setup(self) -> None:
        self._pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="mmcurate-decode")

    def process(self, batch: pa.Table) -> pa.Table:
        if self._pool is None:
            self.setup()
        outcomes = asyncio.run(download_batch(batch.column("url").to_pylist(), self.config, self._pool))
        return add_outcomes(batch, outcomes)


def add_outcomes(batch: pa.Table, outcomes: list[Outcome]) -> pa.Table:
    """Set the download columns from ``outcomes`` and reject the rows that failed."""
    images = [o.image for o in outcomes]
    values = {
        "image": [i.data if i else None for i in images],
        "image_format": [i.format if i else None for i in images],
        "width": [i.width if i else None for i in images],
        "height": [i.height if i else None for i in images],
        "original_width": [i.original_width if i else None for i in images],
        "original_height": [i.original_height if i else None for i in images],
        "sha256": [o.sha256 for o in outcomes],
        "status": [o.status for o in outcomes],
    }
    for name, type_ in _COLUMNS:
        batch = set_column(batch, name, pa.array(values[name], type_))
    failed = [o.status != "ok" for o in outcomes]
    return reject(batch, failed, values["status"])
