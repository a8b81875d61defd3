"""Options of the ``download`` stage; names follow img2dataset's where one exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmcurate import __version__
from mmcurate.options import bounded
from mmcurate.shards.image_check import MAX_PIXELS

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
EncodeFormat = Literal["jpg", "png", "webp"]
DEFAULT_USER_AGENT = f"mmcurate/{__version__} (image-text dataset downloader; +https://github.com/mmcurate/mmcurate)"
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


@dataclass(frozen=True)
class DownloadConfig:
    """How to fetch, check and store images.

    Time: ``timeout`` bounds connecting and each read; a body must arrive at ``min_speed`` bytes/s
    or faster over each ``min_speed_window`` seconds, or it ends as ``too_slow`` (a trickle ends
    within a window; 0 turns the check off); ``deadline`` bounds everything one URL may take
    (redirects, retries and their waits included): a server at 30 KB/s delivers 1.8 MB within it.
    Retries follow 429, 5xx and connection errors with exponential backoff (0.5 s, 1 s, ...) or the server's Retry-After when it is at most
    ``retry_after_cap``; a longer Retry-After, or a wait past the deadline, ends the sample.
    After ``breaker_failures`` consecutive timeouts, ``too_slow`` transfers or connection errors
    from one host, the host's queued URLs end as ``host_unresponsive`` for ``breaker_cooldown``
    seconds; then one probe may reopen it.
    """

    image_size: int = bounded(256, ge=1)
    resize_mode: ResizeMode = "keep_ratio"
    resize_only_if_bigger: bool = False
    encode_format: EncodeFormat = "jpg"
    encode_quality: int | None = None  # jpg/webp quality (default 95); png zlib level 0-9 (default 6)
    min_image_size: int = bounded(0, ge=0)
    max_image_area: float | None = bounded(None, gt=0)  # reject sources with more pixels (img2dataset's filter)
    max_aspect_ratio: float | None = bounded(None, gt=0)
    max_pixels: int = bounded(MAX_PIXELS, ge=1)  # decompression-bomb guard, checked from the header before decoding
    timeout: float = bounded(10.0, gt=0)
    deadline: float = bounded(60.0, gt=0)
    min_speed: int = bounded(4096, ge=0)  # bytes/s
    min_speed_window: float = bounded(3.0, gt=0)
    retries: int = bounded(2, ge=0)
    breaker_failures: int = bounded(5, ge=0)  # consecutive timeouts / too_slow / connection errors that pause a host; 0: never
    breaker_cooldown: float = bounded(60.0, gt=0)  # seconds a paused host's URLs fail fast before a probe
    retry_after_cap: float = bounded(5.0, ge=0)
    max_body_bytes: int = bounded(32 * 1024 * 1024, ge=1)
    max_redirects: int = bounded(5, ge=0)
    concurrency: int = bounded(64, ge=1)  # downloads in flight per worker (img2dataset's thread_count)
    per_host_connections: int = bounded(16, ge=1)  # per worker
    decode_threads: int = bounded(2, ge=1)  # threads decoding and encoding beside the event loop, per worker
    user_agent: str = DEFAULT_USER_AGENT
    user_agent_token: str = "mmcurate"  # X-Robots-Tag directives addressed to this token apply too
    disallowed_header_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES  # empty: ignore opt-outs
    allow_private_networks: bool = False
    refetch: bool = False  # fetch rows that already hold an image (img2dataset / mmcurate input) again

    def __post_init__(self) -> None:
        if self.encode_quality is None:
            object.__setattr__(self, "encode_quality", 6 if self.encode_format == "png" else 95)
        low, high = (0, 9) if self.encode_format == "png" else (1, 100)
        if not low <= self.encode_quality <= high:
            raise ValueError(f"encode_quality for {self.encode_format} must be between {low} and {high}, not {self.encode_quality}")
        if not self.user_agent.strip():
            raise ValueError("user_agent must not be empty")
        object.__setattr__(self, "disallowed_header_directives", tuple(d.strip().lower() for d in self.disallowed_header_directives))
