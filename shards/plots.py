"""Pictures of a run: the filter funnel and the histograms of stored scores."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from mmcurate.shards.layout import OutputDir, open_parquet  # noqa: E402

SCORE_COLUMNS = ("clip_score", "language_score", "nsfw_score", "caption_words")


def score_table(out: OutputDir) -> pa.Table:
    """The stored score columns of every row, kept and rejected (scores are kept for both)."""
    tables = []
    for path in out.kept_files() + out.rejects_files():
        with open_parquet(out.fs, path) as pf:
            names = pf.schema_arrow.names
        wanted = [c for c in SCORE_COLUMNS if c in names]
        if wanted:
            tables.append(out.read_parquet(path, wanted))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def plot_funnel(summary: dict, path: str, scores: pa.Table | None = None) -> None:
    """Rows left after each stage (bars, with the reasons of each drop), and score histograms."""
    columns = [c for c in SCORE_COLUMNS if scores is not None and c in scores.column_names and scores.column(c).null_count < scores.num_rows]
    fig, axes = plt.subplots(1, 1 + len(columns), figsize=(7 + 4 * len(columns), 4.5), squeeze=False)
    ax = axes[0][0]
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
    for ax, column in zip(axes[0][1:], columns, strict=True):
        values = [v for v in scores.column(column).to_pylist() if v is not None]
        ax.hist(values, bins=30, color="#55a868")
        ax.set_title(f"{column} ({len(values)} rows)")
        ax.set_xlabel(column)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
