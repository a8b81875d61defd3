"""The download stage against the local server: every failure has its reason, good rows are kept,
and slow or hanging servers cost at most the per-URL deadline."""

from __future__ import annotations

import hashlib
import io
import time

import pyarrow as pa
import pytest
from PIL import Image

from mmcurate.download import breaker
from mmcurate.download import urls as url_checks
from mmcurate.download.stage import Download
from mmcurate.errors import UsageError

FAST = {"allow_private_networks": True, "deadline": 2.0, "timeout": 5.0, "max_body_bytes": 1 << 20}


def run(urls: list, **params) -> tuple[pa.Table, float]:
    """Run the stage on ``urls``; the output table and the seconds it took."""
    stage = Download.from_params({**FAST, **params})
    stage.setup()
    table = pa.table(
        {"key": [f"k{i}" for i in range(len(urls))], "url": pa.array(urls, pa.string()), "reject_reason": pa.nulls(len(urls), pa.string())}
    )
    start = time.monotonic()
    out = stage.process(table)
    return out, time.monotonic() - start


def statuses(out: pa.Table) -> list[str]:
    return out.column("status").to_pylist()


# route -> expected status; all run together in one batch
MATRIX = {
    "/img/jpeg": "ok",
    "/img/png": "ok",
    "/img/webp": "ok",
    "/img/gif": "ok",
    "/img/cmyk": "ok",
    "/img/rgba": "ok",
    "/img/exif": "ok",
    "/img/grey": "ok",
    "/img/palette": "ok",
    "/status/404": "http_404",
    "/status/403": "http_403",
    "/status/500": "http_500",
    "/retry-after/3600": "http_429",
    "/redirect/3": "ok",
    "/redirect/9": "too_many_redirects",
    "/loop/a": "redirect_loop",
    "/trickle": "timeout",
    "/hang": "timeout",
    "/huge": "too_large",
    "/huge-declared": "too_large",
    "/img/html": "not_an_image",
    "/img/garbage": "not_an_image",
    "/img/empty": "not_an_image",
    "/img/truncated": "decode_error",
    "/img/corrupt": "decode_error",
    "/img/bomb": "decompression_bomb",
    "/robots/noai": "opted_out",
    "/robots/noindex, nofollow": "opted_out",
    "/robots/mmcurate: noimageai": "opted_out",
    "/robots/otherbot: noai": "ok",
    "/robots/nofollow": "ok",
    "/slow/0.5": "ok",
}
BAD_URLS = {
    "ftp://127.0.0.1/x.jpg": "bad_scheme",
    "file:///etc/passwd": "bad_scheme",
    "javascript:alert(1)": "bad_scheme",
    "data:image/png;base64,iVBORw0KGgo=": "bad_scheme",
    "not a url": "bad_url",
    "http://": "bad_url",
    "http://[::1": "bad_url",
    "": "bad_url",
    None: "bad_url",
}


def test_matrix_reasons_kept_rows_and_deadline(server):
    urls = [server.url(p) for p in MATRIX] + list(BAD_URLS)
    expected = list(MATRIX.values()) + list(BAD_URLS.values())
    out, seconds = run(urls, retries=1)
    assert statuses(out) == expected
    rejected = out.column("reject_reason").to_pylist()
    assert rejected == [None if s == "ok" else s for s in expected]
    ok = out.filter(pa.compute.equal(out.column("status"), "ok"))
    for row in ok.to_pylist():
        im = Image.open(io.BytesIO(row["image"]))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (row["width"], row["height"])
        assert min(im.size) == 256 and len(row["sha256"]) == 64
    # trickle and hang are cut at the 2 s deadline; the whole batch runs concurrently.
    assert seconds < FAST["deadline"] + 3


def test_images_record_original_size_and_orientation(server, images):
    out, _ = run([server.url("/img/exif"), server.url("/img/jpeg"), server.url("/img/rgba")])
    exif, jpeg, rgba = out.to_pylist()
    assert (exif["original_width"], exif["original_height"]) == (428, 640)  # EXIF orientation 6: portrait
    assert (exif["width"], exif["height"]) == (256, 383)
    assert (jpeg["original_width"], jpeg["original_height"], jpeg["width"], jpeg["height"]) == (640, 428, 383, 256)
    assert jpeg["sha256"] == hashlib.sha256(images["jpeg"]).hexdigest()
    left = Image.open(io.BytesIO(rgba["image"])).convert("RGB").getpixel((10, 128))
    assert min(left) > 245  # the transparent half is composited on white


def test_retries_follow_429_and_5xx_then_succeed(server):
    paths = ["/flaky/429/2/a", "/flaky/503/1/b", "/flaky/500/5/c"]
    out, _ = run([server.url(p) for p in paths], retries=2)
    assert statuses(out) == ["ok", "ok", "http_500"]
    assert [server.hits[p] for p in paths] == [3, 2, 3]


def test_no_retries_when_disabled_and_long_retry_after_is_not_awaited(server):
    out, _ = run([server.url("/flaky/503/1/d")], retries=0)
    assert statuses(out) == ["http_503"] and server.hits["/flaky/503/1/d"] == 1
    before = server.hits["/retry-after/3600"]
    out, seconds = run([server.url("/retry-after/3600")], retries=3)
    assert statuses(out) == ["http_429"] and server.hits["/retry-after/3600"] == before + 1
    assert seconds < 1.5


def test_retry_after_past_the_deadline_stops_retrying(server):
    out, seconds = run([server.url("/retry-after/4")], retries=3, retry_after_cap=5.0, deadline=2.0)
    assert statuses(out) == ["http_429"]
    assert seconds < 2.0


def test_slow_transfers_end_as_too_slow_and_30_kb_per_s_is_kept(server, images):
    """With the default low-speed limit, a trickle ends within a window and every valid image served at
    30 KB/s (smoothly or in bursts once a second) is kept; a 1 s window ends a 2 KB/s transfer."""
    kept = [server.url("/paced/30000/10/jpeg"), server.url("/paced/30000/1/jpeg")]
    out, _ = run([*kept, server.url("/trickle")], deadline=20.0)
    assert statuses(out) == ["ok", "ok", "too_slow"]
    assert out.column("sha256").to_pylist()[:2] == [hashlib.sha256(images["jpeg"]).hexdigest()] * 2
    out, _ = run([server.url("/paced/2000/10/jpeg"), server.url("/trickle")], deadline=20.0, min_speed_window=1.0)
    assert statuses(out) == ["too_slow", "too_slow"]


# The trickle (1 byte/s) is too slow; any other route sends its body at once.
BREAKER = {
    "breaker_failures": 2,
    "breaker_cooldown": 30.0,
    "min_speed": 100,
    "min_speed_window": 1.0,
    "per_host_connections": 2,
    "deadline": 20.0,
}


class Clock:
    """The breaker's clock, moved forward by hand: cool-downs pass without waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def test_breaker_pauses_a_failing_host_and_a_probe_reopens_it(server, other_host, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(breaker, "time", clock)
    stage = Download.from_params({**FAST, **BREAKER})
    stage.setup()

    def fetch(urls: list[str]) -> list[str]:
        table = pa.table({"key": [f"k{i}" for i in range(len(urls))], "url": urls, "reject_reason": pa.nulls(len(urls), pa.string())})
        return statuses(stage.process(table))

    trickle, jpeg = other_host.url("/trickle"), other_host.url("/img/jpeg")
    before = other_host.hits["/trickle"]
    # Two slow transfers pause the host (a third may have started between them): its queued URLs end
    # at once, other hosts are untouched.
    first = fetch([trickle] * 5 + [jpeg, server.url("/img/png")])
    slow = first.count("too_slow")
    assert first[:slow] == ["too_slow"] * slow and slow in (2, 3) and other_host.hits["/trickle"] == before + slow
    assert first[slow:] == ["host_unresponsive"] * (6 - slow) + ["ok"]
    assert fetch([jpeg, server.url("/img/jpeg")]) == ["host_unresponsive", "ok"]  # the next shard, within the cool-down
    clock.offset += 31
    assert fetch([trickle, jpeg]) == ["too_slow", "host_unresponsive"]  # a failed probe pauses it again; jpeg waited for it
    clock.offset += 31
    assert fetch([jpeg, jpeg, jpeg]) == ["ok", "ok", "ok"]  # an answered probe reopens it
    assert fetch([trickle] * 3 + [jpeg])[::3] == ["too_slow", "host_unresponsive"]  # and failures count afresh


def test_answers_reset_the_breaker_and_it_can_be_turned_off(server, other_host):
    params = {**BREAKER, "per_host_connections": 1}
    mixed = [other_host.url(p) for p in ("/trickle", "/status/404", "/trickle", "/img/jpeg", "/trickle")]
    assert statuses(run(mixed, **params)[0]) == ["too_slow", "http_404", "too_slow", "ok", "too_slow"]
    trickles = [other_host.url("/trickle")] * 3
    assert statuses(run(trickles, **{**params, "breaker_failures": 0})[0]) == ["too_slow"] * 3


def test_connection_refused_is_a_connection_error(server):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        out, _ = run([f"http://127.0.0.1:{port}/x.jpg"], retries=1)
    assert statuses(out) == ["connection_error"]


def test_malformed_responses_are_bad_response_and_not_retried(raw_server):
    names = ["bad-status-line", "garbage", "conflicting-length", "huge-header"]
    out, _ = run([raw_server.url(n) for n in names], retries=2)
    assert statuses(out) == ["bad_response"] * len(names)
    assert [raw_server.hits[n] for n in names] == [1] * len(names)


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("2002:7f00:1::1", True),  # 6to4 embedding 127.0.0.1
        ("2002:808:808::1", True),  # 6to4 embedding a public address: 6to4 relays are not ours to use either
        ("fec0::1", True),  # deprecated site-local
        ("feff::1", True),
        ("2001:4860:4860::8888", False),
        ("8.8.8.8", False),
        ("::ffff:10.0.0.1", True),
    ],
)
def test_private_address_guard(address, blocked):
    assert url_checks.is_blocked(address) is blocked


def test_loopback_is_refused_by_default(server):
    port = server.base.rsplit(":", 1)[1]
    urls = [
        server.url("/img/jpeg"),
        f"http://localhost:{port}/img/jpeg",
        f"http://[::1]:{port}/img/jpeg",
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/",
    ]
    out, _ = run(urls, allow_private_networks=False)
    assert statuses(out) == ["blocked_address"] * len(urls)
    assert all(v is None for v in out.column("image").to_pylist())


def test_loopback_refusal_sends_no_request(server):
    before = server.hits["/img/png"]
    out, _ = run([server.url("/img/png")], allow_private_networks=False)
    assert statuses(out) == ["blocked_address"] and server.hits["/img/png"] == before


def test_redirect_to_a_blocked_address_is_refused(server, monkeypatch):
    # 127.0.0.1 plays a public host here; 127.0.0.2 (also this machine) plays the private one.
    monkeypatch.setattr(url_checks, "is_blocked", lambda address: address != "127.0.0.1")
    port = server.base.rsplit(":", 1)[1]
    target = f"http://127.0.0.2:{port}/img/jpeg"
    out, _ = run(
        [server.url(f"/redirect-to?url={target}"), server.url("/redirect/1"), server.url("/redirect-to?url=file:///etc/passwd")],
        allow_private_networks=False,
    )
    assert statuses(out) == ["blocked_address", "ok", "bad_scheme"]


def test_user_agent_is_honest_and_configurable(server):
    server.user_agents.clear()
    run([server.url("/img/jpeg")])
    assert {ua.split(" ")[0].split("/")[0] for ua in server.user_agents} == {"mmcurate"}
    run([server.url("/img/jpeg")], user_agent="mybot/1.0 (+https://example.org/bot)")
    assert "mybot/1.0 (+https://example.org/bot)" in server.user_agents


def test_an_unexpected_error_costs_one_row(server, monkeypatch):
    from mmcurate.download import batch

    def broken(data, config):
        raise RuntimeError("bug")

    monkeypatch.setattr(batch, "process_image", broken)
    out, _ = run([server.url("/img/jpeg"), "ftp://x/y"])
    assert statuses(out) == ["download_error", "bad_scheme"]


def test_opt_out_can_be_ignored(server):
    out, _ = run([server.url("/robots/noai")], disallowed_header_directives=[])
    assert statuses(out) == ["ok"]


def test_image_checks_reject_with_their_reason(server):
    urls = [server.url("/img/small"), server.url("/img/jpeg"), server.url("/img/grey")]  # 64x43, 640x428, 512x512
    assert statuses(run(urls, min_image_size=100)[0]) == ["image_too_small", "ok", "ok"]
    assert statuses(run(urls, max_aspect_ratio=1.4)[0]) == ["aspect_ratio_too_large", "aspect_ratio_too_large", "ok"]
    assert statuses(run(urls, max_image_area=10_000)[0]) == ["ok", "image_area_too_large", "image_area_too_large"]
    assert statuses(run(urls, max_pixels=200_000)[0]) == ["ok", "decompression_bomb", "decompression_bomb"]


def test_output_formats(server):
    for fmt, pil in (("png", "PNG"), ("webp", "WEBP")):
        out, _ = run([server.url("/img/gif")], encode_format=fmt, resize_mode="center_crop", image_size=128)
        row = out.to_pylist()[0]
        im = Image.open(io.BytesIO(row["image"]))
        assert (row["status"], row["image_format"], im.format, im.size) == ("ok", fmt, pil, (128, 128))


def test_config_is_validated():
    for bad in (
        {"resize_mode": "stretch"},
        {"encode_format": "png", "encode_quality": 95},
        {"deadline": 0},
        {"concurrency": "many"},
        {"retries": -1},
    ):
        with pytest.raises(UsageError):
            Download.from_params(bad)
    assert Download.from_params({"encode_format": "png"}).config.encode_quality == 6
    assert Download.from_params({}).config.encode_quality == 95


def test_process_works_when_called_from_async_code(server):
    import asyncio

    async def notebook_cell() -> pa.Table:
        return run([server.url("/img/jpeg")])[0]

    assert statuses(asyncio.run(notebook_cell())) == ["ok"]


def test_rows_that_hold_an_image_are_not_fetched_again(server):
    """img2dataset or mmcurate input already holds images: only rows without one are fetched,
    in place, unless refetch is set."""
    held = b"stored bytes, not a fetch"
    table = pa.table(
        {
            "key": ["a", "b", "c"],
            "url": [server.url("/img/jpeg"), server.url("/status/404"), server.url("/img/png")],
            "image": pa.array([None, held, None], pa.binary()),
            "status": ["ok", "ok", "ok"],
            "reject_reason": pa.nulls(3, pa.string()),
        }
    )
    stage = Download.from_params(FAST)
    out = stage.process(table)
    assert out.column("key").to_pylist() == ["a", "b", "c"]
    assert out.column("image").to_pylist()[1] == held
    assert statuses(out) == ["ok", "ok", "ok"]
    assert out.column("image_format").to_pylist()[0] == "jpg" and out.column("image").to_pylist()[2] is not None
    again = Download.from_params({**FAST, "refetch": True}).process(table)
    assert statuses(again) == ["ok", "http_404", "ok"]
