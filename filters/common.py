"""Helpers the filter stages share: the filter/score mode, source image sizes, image decoding,
bounded prefetching of per-row work in a thread pool, storing a score column."""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from mmcurate.stages.base import reject, set_column

Mode = Literal["filter", "score"]  # "score": add the score columns, reject nothing
MODES = ("filter", "score")

T = TypeVar("T")
R = TypeVar("R")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be filter or score, not {mode!r}")


def source_sizes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Width and height of the source image per row as floats (NaN where unknown).

    ``original_width``/``original_height`` (the downloaded image before resizing) are read first;
    where they are null the stored ``width``/``height`` stand in.
    """

    def column(original: str, stored: str) -> np.ndarray:
        values = table.column(original)
        if stored in table.column_names:
            values = pc.coalesce(values, table.column(stored).cast(values.type))
        return np.asarray(values.cast(pa.float64()).fill_null(np.nan), dtype=np.float64)

    return column("original_width", "width"), column("original_height", "height")


def decode_image(data: bytes | None, draft: tuple[int, int] | None = None) -> Image.Image | None:
    """The image as RGB, or None when ``data`` is missing or not a decodable image.

    ``draft`` lets JPEG decoding skip detail below that size (a free speed-up before a downscale).
    """
    if data is None:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        if draft is not None:
            image.draft("RGB", draft)
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def prefetched(executor: Executor, fn: Callable[[T], R], items: Iterable[T], depth: int) -> Iterator[R]:
    """``map(fn, items)`` run in ``executor``, in order, with at most ``depth`` results pending.

    The caller's work on one result overlaps with the preparation of the next ones, without holding
    more than ``depth`` prepared results in memory.
    """
    pending: deque = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def prepared_batches(executor: Executor, prepare: Callable[[T], R], items: list[T], size: int, ahead: int) -> Iterator[list[tuple[int, R]]]:
    """``prepare`` every item in ``executor``, up to ``ahead`` batches in advance of the consumer;
    yield ``(index, result)`` pairs in batches of ``size``, in order."""
    results = prefetched(executor, prepare, items, depth=size * ahead)
    for start in range(0, len(items), size):
        yield [(i, next(results)) for i in range(start, min(start + size, len(items)))]


def store_scores(batch: pa.Table, column: str, scores: np.ndarray, reasons: list[str | None], mode: str) -> pa.Table:
    """Set ``column`` (NaN stored as null) and, unless in score mode, reject the rows with a reason."""
    batch = set_column(batch, column, pa.array(scores, pa.float32(), mask=np.isnan(scores)))
    if mode == "score":
        return batch
    reasons_array = pa.array(reasons, pa.string())
    return reject(batch, reasons_array.is_valid(), reasons_array)
