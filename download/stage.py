"""The ``download`` stage: URLs in, images and a status per row out; failed rows rejected."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.download.batch import Outcome, download_batch
from mmcurate.download.breaker import REFUSED, HostBreaker
from mmcurate.download.config import DownloadConfig
from mmcurate.download.urls import parse_url
from mmcurate.schemas import BY_NAME, binary_array
from mmcurate.stages.base import Resources, Stage, reject, set_column

# The columns this stage sets, with their declared types.
_COLUMNS: tuple[tuple[str, pa.DataType], ...] = tuple(
    (name, BY_NAME[name].type)
    for name in ("image", "image_format", "width", "height", "original_width", "original_height", "sha256", "status")
)


class Download(Stage):
    """Fetch every row's ``url``; store the image decoded, resized and re-encoded (img2dataset's options).

    Async HTTP with ``concurrency`` downloads in flight per worker, at most
    ``per_host_connections`` of them to one host; decoding runs in ``decode_threads`` threads beside
    the event loop. ``timeout`` bounds connecting and each read; a body slower than ``min_speed``
    bytes/s over a ``min_speed_window`` ends as ``too_slow``; ``deadline`` bounds everything one
    URL may take: redirects (at most ``max_redirects``) and ``retries`` with exponential backoff on
    429, 5xx and connection errors, honouring Retry-After up to ``retry_after_cap``. After
    ``breaker_failures`` consecutive timeouts, slow transfers or connection errors from one host,
    its queued URLs end as ``host_unresponsive`` for ``breaker_cooldown`` seconds, then a probe may
    reopen it; a shard's stats name these hosts (``hosts_tripped``). Bodies larger
    than ``max_body_bytes`` are cut off while streaming. Only http(s) URLs are fetched, and
    loopback, private, link-local, multicast and reserved addresses are refused, after every
    redirect too, unless ``allow_private_networks``. An ``X-Robots-Tag`` with one of
    ``disallowed_header_directives``, for every agent or for ``user_agent_token``, refuses the sample.
    JPEGs are decoded in draft mode when downscaling; images of more than ``max_pixels`` (read from
    the header) are refused before decoding; EXIF orientation is applied; alpha is composited on
    white; animated images keep their first frame. ``encode_quality`` defaults to 95 (jpg, webp)
    or zlib level 6 (png).

    Every row gets ``status``: ``ok`` or the reason it failed (``bad_url``, ``bad_scheme``,
    ``blocked_address``, ``dns_error``, ``connection_error``, ``ssl_error``, ``timeout``, ``too_slow``,
    ``http_404``-style codes, ``too_many_redirects``, ``redirect_loop``, ``opted_out``,
    ``too_large``, ``not_an_image``, ``decode_error``, ``decompression_bomb``, ``image_too_small``,
    ``image_area_too_large``, ``aspect_ratio_too_large``, ``bad_response``, ``host_unresponsive``,
    ``download_error``);
    failed rows are rejected with the same reason. ``mmcurate run PIPELINE --retry-failed`` fetches
    the failed rows of a finished run again. Rows that already hold an image (img2dataset or
    mmcurate input) keep it and are not fetched, unless ``refetch``; so a preset that starts with
    ``download`` also runs on data downloaded earlier.
    """

    name = "download"
    Config = DownloadConfig
    resources = Resources(cpus=1.0)
    needs = ("url",)
    split_rows = True
    adds = tuple(name for name, _ in _COLUMNS)
    config: DownloadConfig

    def __init__(self, config: DownloadConfig | None = None) -> None:
        super().__init__(config)
        self._pool: ThreadPoolExecutor | None = None
        self._breaker: HostBreaker | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "_breaker": None}  # threads and host state stay in their process

    def setup(self) -> None:
        self._pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="mmcurate-decode")
        self._breaker = HostBreaker(self.config.breaker_failures, self.config.breaker_cooldown)

    def process(self, batch: pa.Table) -> pa.Table:
        """Fetch the rows without an image; rows that already hold one (an img2dataset or mmcurate
        input) keep it as it is, unless ``refetch``."""
        if "image" not in batch.column_names or self.config.refetch:
            return self._fetch(batch)
        held = pc.is_valid(batch.column("image"))
        todo = pc.indices_nonzero(pc.invert(held))
        if len(todo) == 0:
            return batch
        fetched = self._fetch(batch.take(todo))
        merged = pa.concat_tables([batch.filter(held), fetched], promote_options="permissive")
        order = pa.concat_arrays([pc.indices_nonzero(held), todo])
        return merged.take(pc.sort_indices(order))

    def shard_stats(self, rejected: pa.Table) -> dict[str, list[str]]:
        """``hosts_tripped``: the hosts whose rows the breaker refused in this shard."""
        refused = rejected.filter(pc.equal(rejected.column("reject_reason"), REFUSED)).column("url").to_pylist()
        return {"hosts_tripped": sorted({str(parse_url(u)[0].host) for u in refused})}

    def _fetch(self, batch: pa.Table) -> pa.Table:
        if self._pool is None or self._breaker is None:
            self.setup()
        run = functools.partial(asyncio.run, download_batch(batch.column("url").to_pylist(), self.config, self._pool, self._breaker))
        if _loop_running():  # called from async code (a notebook): run the batch's own loop in a thread
            with ThreadPoolExecutor(1) as runner:
                return add_outcomes(batch, runner.submit(run).result())
        return add_outcomes(batch, run())


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def add_outcomes(batch: pa.Table, outcomes: list[Outcome]) -> pa.Table:
    """Set the download columns from ``outcomes`` and reject the rows that failed."""
    images = [o.image for o in outcomes]
    values = {
        "image": binary_array([i.data if i else None for i in images]),
        "image_format": [i.format if i else None for i in images],
        "width": [i.width if i else None for i in images],
        "height": [i.height if i else None for i in images],
        "original_width": [i.original_width if i else None for i in images],
        "original_height": [i.original_height if i else None for i in images],
        "sha256": [o.sha256 for o in outcomes],
        "status": [o.status for o in outcomes],
    }
    for name, type_ in _COLUMNS:
        batch = set_column(batch, name, values[name], type_)
    failed = [o.status != "ok" for o in outcomes]
    return reject(batch, failed, values["status"])
