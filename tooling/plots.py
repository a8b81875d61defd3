"""Pictures of a run: the filter funnel and the histograms of stored scores and sizes (``stats --plot``
and ``mmcurate report`` draw through these)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.errors import UsageError
from mmcurate.shards.layout import OutputDir

NUMERIC_COLUMNS = ("clip_score", "language_score", "nsfw_score", "num_boxes", "original_width", "original_height", "caption_words")
SCORE_COLUMNS = (*NUMERIC_COLUMNS, "caption", "captions")  # what the histograms read
BINS = 30


def score_table(out: OutputDir, extra: tuple[str, ...] = (), with_file: bool = False) -> pa.Table:
    """The stored score and size columns (and ``extra``) of every row, kept and rejected (scores are kept for both);
    ``with_file`` adds ``_file``, the Parquet file each row lies in."""
    tables = []
    for path in out.kept_files() + out.rejects_files():
        names = out.parquet_schema(path).names
        wanted = [c for c in (*SCORE_COLUMNS, *extra) if c in names]
        if wanted:
            table = out.read_parquet(path, wanted)
            if with_file:
                indices = pa.array(np.zeros(table.num_rows, np.int32))
                table = table.append_column("_file", pa.DictionaryArray.from_arrays(indices, [path]))
            tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def score_values(table: pa.Table) -> dict[str, np.ndarray]:
    """The non-null values of every score and size column present, with the derived ones: aspect ratio
    (original width / height), caption length in characters, and CapFilt's filter scores by caption source."""
    values: dict[str, np.ndarray] = {}

    def add(name: str, column: pa.Array | pa.ChunkedArray) -> None:
        found = np.asarray(pc.drop_null(column).to_numpy(zero_copy_only=False), dtype=float)
        found = found[np.isfinite(found)]
        if found.size:
            values[name] = found

    names = table.column_names
    for name in NUMERIC_COLUMNS:
        if name in names:
            add(name, table.column(name))
    if "original_width" in names and "original_height" in names:
        height = pc.if_else(pc.greater(table.column("original_height"), 0), table.column("original_height"), None)
        add("aspect_ratio", pc.divide(pc.cast(table.column("original_width"), pa.float64()), height))
    if "caption" in names:
        add("caption_length", pc.utf8_length(table.column("caption")))
    if "captions" in names:
        candidates = pc.list_flatten(table.column("captions"))
        for source in sorted(set(pc.struct_field(candidates, "source").to_pylist()) - {None}):
            chosen = pc.filter(candidates, pc.equal(pc.struct_field(candidates, "source"), source))
            add(f"capfilt_score ({source})", pc.struct_field(chosen, "score"))  # BLIP ITM or CLIP: run.json's filter
    return values


def histogram(values: np.ndarray) -> tuple[list[int], list[float]]:
    """Counts and bin edges of ``values`` (``BINS`` bins)."""
    counts, edges = np.histogram(values, bins=BINS)
    return counts.tolist(), edges.tolist()


def draw_funnel(ax: plt.Axes, summary: dict) -> None:
    """Rows left after each stage (bars), with the top reasons of each drop."""
    names, left, notes = ["input"], [summary["rows_in"]], [""]
    for name, stage in summary["stages"].items():
        names.append(name)
        left.append(left[-1] - stage["rejected"])
        top = sorted(stage["reasons"].items(), key=lambda kv: -kv[1])[:3]
        notes.append(", ".join(f"{r} {n}" for r, n in top))
    bars = ax.barh(range(len(names)), left, color="#4c72b0")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("rows remaining")
    ax.set_title(f"Filter funnel: {summary['kept']} of {summary['rows_in']} kept")
    for bar, note in zip(bars, notes, strict=True):
        if note:
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  -{note}", va="center", fontsize=8)
    ax.set_xlim(0, max(left) * 1.6 if max(left) else 1)


def draw_histogram(ax: plt.Axes, name: str, counts: list[int], edges: list[float]) -> None:
    ax.stairs(counts, edges, fill=True, color="#55a868")
    ax.set_title(f"{name} ({sum(counts)} rows)")
    ax.set_xlabel(name)


def png(fig: plt.Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def plot_funnel(summary: dict, path: str, scores: pa.Table | None = None) -> None:
    """The funnel and the score histograms side by side in one PNG."""
    histograms = {name: histogram(v) for name, v in score_values(scores).items()} if scores is not None else {}
    fig, axes = plt.subplots(1, 1 + len(histograms), figsize=(7 + 4 * len(histograms), 4.5), squeeze=False)
    draw_funnel(axes[0][0], summary)
    for ax, (name, (counts, edges)) in zip(axes[0][1:], histograms.items(), strict=True):
        draw_histogram(ax, name, counts, edges)
    fig.tight_layout()
    data = png(fig)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise UsageError(f"cannot write --plot {path}: {e.strerror}") from None
