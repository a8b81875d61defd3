"""Helpers the filter stages share: the filter/score mode, source image sizes, storing a score column.
(Image decoding and prefetching ahead of a model live in :mod:`mmcurate.stages.model`.)"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.stages.base import reject, set_column

Mode = Literal["filter", "score"]  # "score": add the score columns, reject nothing
MODES = ("filter", "score")


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


def store_scores(batch: pa.Table, column: str, scores: np.ndarray, reasons: list[str | None], mode: str) -> pa.Table:
    """Set ``column`` (NaN stored as null) and, unless in score mode, reject the rows with a reason."""
    batch = set_column(batch, column, pa.array(scores, pa.float32(), mask=np.isnan(scores)))
    if mode == "score":
        return batch
    reasons_array = pa.array(reasons, pa.string())
    return reject(batch, reasons_array.is_valid(), reasons_array)
