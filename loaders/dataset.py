"""A PyTorch ``IterableDataset`` over an mmcurate output folder (local or any fsspec URL).

The finished shards are split between distributed ranks and DataLoader workers: consumer
``rank * num_workers + worker`` of ``world_size * num_workers`` reads shards ``consumer::consumers``
(of the seeded shard order when ``shuffle``), so together they see every kept sample once per
epoch. A consumer left without a shard yields nothing: give a run at least as many shards as consumers.
Shards are streamed back by the writer that wrote them (:mod:`mmcurate.shards.writers`), a batch of
rows at a time: a Parquet shard by row group, a WebDataset tar member by member. With ``shuffle`` the
rows of a shard pass through a seeded buffer of ``shuffle_buffer`` rows, the only rows held at once;
a shard that fits in it is shuffled whole.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmcurate.errors import UsageError
from mmcurate.exports import FORMATS, ExportOptions, needed_columns, sample_of
from mmcurate.loaders.captions import WEB, capfilt_threshold, check_choice, choose
from mmcurate.shards.layout import SHARDS, OutputDir, detect_layout
from mmcurate.shards.writers import written_by
from mmcurate.stages.model import decode_image

logger = logging.getLogger(__name__)
SHUFFLE_BUFFER = 10_000  # rows: a default shard (output.rows_per_shard) is shuffled whole
T = TypeVar("T")
logger = logging.getLogger(__name__)


class CuratedDataset(IterableDataset):
    """The kept samples of an mmcurate output, as dicts:

    - ``key``; ``image``: RGB ``PIL.Image``, or ``transform(image)`` (rows whose image does not decode are skipped);
    - ``caption`` and ``caption_source`` (``web`` | ``synthetic``), by ``caption``: ``"web"`` (the source
      caption only), ``"synthetic"`` (the highest-scoring synthetic caption that passed capfilt's filter,
      else the web caption) or p, the probability of the synthetic one, drawn per key and epoch from
      ``seed`` (a row with only one of the two gets that one); a row without the caption asked for is skipped;
    - with ``grounding=FORMAT`` (a format of :data:`mmcurate.exports.FORMATS`), what that export writes
      for the row (:meth:`mmcurate.exports.base.Format.target`): ``target``, from the stored ``caption``
      column (the markup of its grounded phrases for the text formats), plus ``prompt`` (``florence2``,
      ``llava``) or ``noun_chunks`` and ``ref_exps`` (``grit``); rows without a ``caption`` are skipped, and
      so are those the export skips as ``span_mismatch`` or ``reserved_markup``;
    - each column named in ``columns``, as stored.

    ``min`` / ``max`` keep rows whose stored score is at least / at most the bound (``min={"clip_score": 0.3}``);
    a row without that score is left out. ``rank`` / ``world_size`` default to ``torch.distributed``'s when it
    is initialised. ``shuffle`` shuffles the shard order and, through a buffer of ``shuffle_buffer`` rows,
    the rows of each shard. Call :meth:`set_epoch` before each epoch for a new shuffle and a new caption draw.
    A warning per shard counts the rows skipped, by reason.
    """

    def __init__(
        self,
        url: str,
        *,
        caption: str | float = "web",
        seed: int = 0,
        transform: Callable[[Any], Any] | None = None,
        grounding: str | None = None,
        min: Mapping[str, float] | None = None,
        max: Mapping[str, float] | None = None,
        columns: Sequence[str] = (),
        shuffle: bool = False,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.out = OutputDir.open(url)
        if not self.out.exists(self.out.root) or detect_layout(self.out.fs, self.out.root) != "mmcurate":
            raise UsageError(f"{url} is not an mmcurate output (no run.json or _done)")
        self.out.check_whole()
        self.caption = check_choice(caption)
        if grounding is not None and grounding not in FORMATS:
            raise UsageError(f"grounding must be one of {', '.join(FORMATS)}, not {grounding!r}")
        if shuffle_buffer < 1:
            raise UsageError(f"shuffle_buffer must be at least 1, not {shuffle_buffer}")
        self.grounding, self.seed, self.transform = grounding, seed, transform
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.bounds = [(c, v, pc.greater_equal) for c, v in (min or {}).items()] + [(c, v, pc.less_equal) for c, v in (max or {}).items()]
        for column, bound, _ in self.bounds:
            if not isinstance(bound, (int, float)) or isinstance(bound, bool):
                raise UsageError(f"min/max bounds are numbers, not {bound!r} ({column!r})")
        self.columns = tuple(columns)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.shards = [i for i in self.out.shard_ids(SHARDS) if self.out.is_done(i)]
        self._check_columns()
        self.threshold = capfilt_threshold(self.out) if self.caption != WEB else None

    def _check_columns(self) -> None:
        """UsageError when the stored rows carry no images, or a column the options need is not stored or
        (``min``/``max``) not numeric."""
        stored = self.out.stored_schema()
        if stored is None:
            return
        if "image" not in stored.names and "image_format" not in stored.names:  # a tar's images are where image_format says
            raise UsageError(f"{self.out.root} holds no images (a run without download); CuratedDataset yields image-caption samples")
        needed = {c: "min/max" for c, _, _ in self.bounds} | dict.fromkeys(self.columns, "columns")
        if self.caption != WEB:
            needed["captions"] = "a synthetic caption (run capfilt)"
        if self.grounding:
            needed |= needed_columns(self.grounding)
        for column, why in needed.items():
            if column not in stored.names:
                raise UsageError(f"{self.out.root} has no {column!r} column, which {why} needs")
        for column, _, _ in self.bounds:
            kind = stored.field(column).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise UsageError(f"min/max bound numeric columns; {column!r} holds {kind}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def consumer(self) -> tuple[int, int]:
        """(this reader's index, readers in all): ranks times DataLoader workers."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
            world = world if world is not None else (torch.distributed.get_world_size() if dist else 1)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + worker, world * workers

    def my_shards(self) -> list[int]:
        """The shard ids this reader reads this epoch, in order."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)  # the same order in every reader
        index, count = self.consumer()
        return order[index::count]

    def select(self, table: pa.Table) -> pa.Table:
        """The rows within the score bounds."""
        for column, bound, compare in self.bounds:
            table = table.filter(pc.fill_null(compare(table.column(column), bound), False))
        return table

    def rows(self, shard_id: int) -> Iterator[dict[str, Any]]:
        """The rows of a shard within the score bounds, in stored order, streamed."""
        for batch in written_by(self.out, shard_id).batches(self.out, shard_id):
            yield from self.select(batch).to_pylist()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        fmt = FORMATS[self.grounding](self.out, ExportOptions(seed=self.seed)) if self.grounding else None
        rng = random.Random(f"{self.seed}:{self.epoch}:rows")
        for shard_id in self.my_shards():
            rows = self.rows(shard_id)
            skipped: Counter[str] = Counter()
            for row in shuffled(rows, self.shuffle_buffer, rng) if self.shuffle else rows:
                if fmt is not None and row.get("caption") is None:  # the export skips it too
                    skipped["caption_missing"] += 1
                    continue
                chosen = choose(row, self.caption, self.seed, self.epoch, self.threshold)
                if chosen is None:
                    skipped["no_web_caption" if self.caption == WEB else "no_web_or_synthetic_caption"] += 1
                    continue
                as_stored = sample_of(shard_id, row) if fmt is not None else None
                if as_stored is not None and (reason := fmt.refusal(as_stored)):
                    skipped[reason] += 1
                    continue
                image = decode_image(row.get("image"))
                if image is None:
                    skipped["image_missing_or_undecodable"] += 1
                    continue
                sample = {"key": row["key"], "image": self.transform(image) if self.transform else image, "caption": chosen[0]}
                sample["caption_source"] = chosen[1]
                if as_stored is not None:
                    sample.update(fmt.target(as_stored))
                sample.update({c: row[c] for c in self.columns})
                yield sample
            if skipped:
                reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
                logger.warning("%s shard %05d: skipped %d rows (%s)", self.out.root, shard_id, skipped.total(), reasons)


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """``items`` in a random order drawn from ``rng``, holding at most ``size`` of them: once the buffer
    is full each new item takes the place of a drawn one, which is yielded; the rest is shuffled at the
    end. With ``size`` at least the number of items this is ``rng.shuffle`` of their list."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        at = rng.randrange(size)
        yield buffer[at]
        buffer[at] = item
    rng.shuffle(buffer)
    yield from buffer
