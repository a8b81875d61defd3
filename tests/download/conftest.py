"""A local HTTP server on 127.0.0.1 with good, broken, slow and hostile routes, built from real photos."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (one empty compressed row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def images(photo_dir: Path) -> dict[str, bytes]:
    """Test images made from the real photos of tests/data, by route name."""
    photo = Image.open(photo_dir / "coco_000000062554.jpg").convert("RGB")  # 640 x 428
    other = Image.open(photo_dir / "coco_000000084284.jpg").convert("RGB")
    rgba = photo.copy()
    alpha = Image.new("L", photo.size, 255)
    alpha.paste(0, (0, 0, photo.width // 2, photo.height))  # left half fully transparent
    rgba.putalpha(alpha)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    frames = [photo.resize((320, 214)), other.resize((320, 214))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    jpeg = (photo_dir / "coco_000000062554.jpg").read_bytes()
    return {
        "jpeg": jpeg,
        "png": (photo_dir / "skimage_coffee.png").read_bytes(),
        "webp": _save(photo, "WEBP", quality=90),
        "gif": gif.getvalue(),
        "cmyk": _save(photo.convert("CMYK"), "JPEG", quality=90),
        "rgba": _save(rgba, "PNG"),
        "exif": _save(photo, "JPEG", quality=90, exif=exif),
        "grey": (photo_dir / "skimage_camera.png").read_bytes(),
        "palette": _save(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "small": _save(photo.resize((64, 43)), "JPEG"),
        "truncated": jpeg[: len(jpeg) // 3],
        "corrupt": JPEG_MAGIC + bytes(range(256)) * 8,
        "garbage": bytes(range(256)) * 8,
        "empty": b"",
        "html": b"<!doctype html><html><body>Not found, but here is a page</body></html>",
        "bomb": _png_bomb(200_000, 200_000),
    }


class Server:
    """The test server: ``url(path)``, and per-path request counts in ``hits``."""

    def __init__(self, images: dict[str, bytes], address: str = "127.0.0.1") -> None:
        self.images = images
        self.address = address
        self.hits: Counter[str] = Counter()
        self.user_agents: set[str] = set()
        self.base = ""
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def url(self, path: str) -> str:
        return self.base + path

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.middlewares.append(self._count)
        app.add_routes(
            [
                web.get("/img/{name}", self.image),
                web.get("/status/{code}", self.status),
                web.get("/flaky/{code}/{fails}/{id}", self.flaky),
                web.get("/retry-after/{seconds}", self.retry_after),
                web.get("/redirect/{n}", self.redirect),
                web.get("/redirect-to", self.redirect_to),
                web.get("/loop/{side}", self.loop_route),
                web.get("/trickle", self.trickle),
                web.get("/hang", self.hang),
                web.get("/huge", self.huge),
                web.get("/huge-declared", self.huge_declared),
                web.get("/robots/{value}", self.robots),
                web.get("/slow/{seconds}", self.slow),
                web.get("/paced/{rate}/{ticks}/{name}", self.paced),
            ]
        )
        self.runner = web.AppRunner(app, shutdown_timeout=0.2)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, self.address, 0)
        self.loop.run_until_complete(site.start())
        port = self.runner.addresses[0][1]
        self.base = f"http://{self.address}:{port}"
        self._ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @web.middleware
    async def _count(self, request: web.Request, handler):
        self.hits[request.path] += 1
        self.user_agents.add(request.headers.get("User-Agent", ""))
        return await handler(request)

    async def image(self, request: web.Request) -> web.Response:
        return web.Response(body=self.images[request.match_info["name"]], content_type="image/jpeg")

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="no")

    async def flaky(self, request: web.Request) -> web.Response:
        """Fails with ``code`` the first ``fails`` times (per ``id``), then serves the JPEG."""
        if self.hits[request.path] <= int(request.match_info["fails"]):
            return web.Response(status=int(request.match_info["code"]), headers={"Retry-After": "0"})
        return web.Response(body=self.images["jpeg"], content_type="image/jpeg")

    async def retry_after(self, request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": request.match_info["seconds"]})

    async def redirect(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        raise web.HTTPFound("/img/jpeg" if n == 0 else f"/redirect/{n - 1}")

    async def redirect_to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])

    async def loop_route(self, request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/loop/b" if request.match_info["side"] == "a" else "/loop/a")

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        """One byte of a JPEG per second."""
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await resp.prepare(request)
        for byte in self.images["jpeg"][:120]:
            await resp.write(bytes([byte]))
            await asyncio.sleep(1)
        return resp

    async def paced(self, request: web.Request) -> web.StreamResponse:
        """Image ``name`` at ``rate`` bytes/s, sent in ``ticks`` pieces a second (1: bursts of a second's worth)."""
        rate, ticks = int(request.match_info["rate"]), int(request.match_info["ticks"])
        data = self.images[request.match_info["name"]]
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(len(data))})
        await resp.prepare(request)
        step = max(1, rate // ticks)
        for start in range(0, len(data), step):
            await resp.write(data[start : start + step])
            await asyncio.sleep(1 / ticks)
        return resp

    async def hang(self, request: web.Request) -> web.Response:
        await asyncio.sleep(120)
        return web.Response(text="too late")

    async def huge(self, request: web.Request) -> web.StreamResponse:
        """2 GiB without a Content-Length, streamed until the client hangs up."""
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await resp.prepare(request)
        chunk = b"\xff" * (1 << 20)
        for _ in range(2048):
            await resp.write(chunk)
        return resp

    async def huge_declared(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(2 << 30)})
        await resp.prepare(request)
        await resp.write(self.images["jpeg"])
        return resp

    async def robots(self, request: web.Request) -> web.Response:
        return web.Response(body=self.images["jpeg"], content_type="image/jpeg", headers={"X-Robots-Tag": request.match_info["value"]})

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(body=self.images["jpeg"], content_type="image/jpeg")


@pytest.fixture(scope="session")
def server(images: dict[str, bytes]):
    srv = Server(images)
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def other_host(images: dict[str, bytes]):
    """The same routes on 127.0.0.2 (loopback too): a second host, for per-host behaviour."""
    srv = Server(images, "127.0.0.2")
    yield srv
    srv.close()


# Malformed HTTP answers, written raw: no HTTP library would send them.
RAW_RESPONSES = {
    "bad-status-line": b"HTTP/1.1 OK-ish\r\nContent-Length: 4\r\n\r\nbody",
    "garbage": bytes(range(256)) * 4,
    "conflicting-length": b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\nhello",
    "huge-header": b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * (10 << 20) + b"\r\n\r\n",
}


class RawServer:
    """A TCP server on 127.0.0.1 answering ``GET /NAME`` with ``RAW_RESPONSES[NAME]`` as it is; ``hits`` counts requests."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.loop = asyncio.new_event_loop()
        self._server = self.loop.run_until_complete(asyncio.start_server(self._answer, "127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            name = (await reader.readline()).split()[1].decode().strip("/")
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            self.hits[name] += 1
            writer.write(RAW_RESPONSES[name])
            await writer.drain()
        except (OSError, IndexError, KeyError):
            pass  # the client hung up first
        finally:
            writer.close()

    def close(self) -> None:
        self._server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="session")
def raw_server():
    srv = RawServer()
    yield srv
    srv.close()
