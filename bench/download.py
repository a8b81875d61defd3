"""Benchmark the download stage against img2dataset 1.47 on the same local corpus, clean and on a slow web, in one run.

Builds a corpus of ~800 px JPEGs from the test photos and serves it with nginx; the misbehaving
hosts are served by this script. Both tools download each scenario's URL list at 256 px
keep_ratio, JPEG q95, WebDataset. img2dataset (in its own venv) runs 2 processes x 64 threads,
500-row shards, timeout 10; mmcurate runs ``mmcurate run`` with its default settings (one
10,000-row shard for 4,000 URLs, its rows downloaded in one piece per core). Scenarios, all on
loopback addresses:

- ``clean``: every URL good, on 127.0.0.1;
- ``a``: 5% of the URLs on one host (127.0.0.2) that trickles one byte a second (and hangs up after 60 s);
- ``b``: the same 5% spread over 20 trickling hosts (127.0.0.2 to 127.0.0.21);
- ``c``: 2% of the hosts (1 of 50, with 2% of the URLs) answer 429 with Retry-After: 1;
- ``d``: 2% of the hosts accept connections and never answer (hang up after 60 s).

In a-d the good URLs are spread over 49 hosts (127.0.1.1 to 127.0.1.49). Prints, per scenario and
tool, images/s (ok images over wall-clock seconds, process start included), CPU ms per image and
peak RSS (largest process, process tree), then the ratio; last the single-core
decode+resize+encode ceiling. A run that passes ``--limit`` seconds is killed and reported.

Last figures (``--scenarios clean,a,b --repeat 2``, 2 shared cores, best of 2 in one run): clean
475 vs img2dataset 299 images/s, 1.59x (3.7 vs 6.1 CPU ms/image; 1.68x in another run); (a) 335 vs
15.1, 22.1x; (b) 334 vs 15.1, 22.1x; ``--scenarios c,d``: (c) 307 vs 279, 1.10x; (d) 167 vs 77, 2.17x.
Where mmcurate's CPU goes: README, Figures.

    python bench/download.py [--images 4000] [--scenarios clean,a,b,c,d] [--repeat 1] [--limit 300]
                             [--autogroup-nice -10] [--set KEY=VALUE]

Linux schedules sessions (autogroups) fairly against each other, so on a machine shared with other
sessions either tool gets only a share of the cores and the figures swing run to run;
``--autogroup-nice -10`` (root) raises this session's weight while the bench runs and restores it
after. CPU ms per image (user + system of each tool's whole process tree) is robust to that load.

Needs nginx (``apt-get install -y nginx-light``; installed here when missing). Everything it
writes lives under bench/out/download/ (gitignored).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "tests" / "data" / "images"
WORK = REPO / "bench" / "out" / "download"
I2D_VENV = WORK / "venv-img2dataset"
I2D_ROWS_PER_SHARD = 500
PROCESSES = 2
GOOD_HOSTS = [f"127.0.1.{i}" for i in range(1, 50)]
TRICKLE_HOSTS = [f"127.0.0.{i}" for i in range(2, 22)]
RATE_LIMITED_HOST = "127.0.2.1"
SILENT_HOST = "127.0.3.1"
HANG_UP_S = 60.0
SCENARIOS = {
    "clean": "every URL good, one host",
    "a": "5% of URLs on one trickling host",
    "b": "5% of URLs trickling, over 20 hosts",
    "c": "2% of hosts answer 429, Retry-After: 1",
    "d": "2% of hosts never answer",
}


def build_corpus(count: int) -> Path:
    """At least ``count`` JPEGs of about 800 px (random crops, flips and scales of the test photos); the first ``count`` are used."""
    corpus = WORK / "corpus"
    if corpus.exists() and len(list(corpus.glob("*.jpg"))) >= count:
        return corpus
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    rng = random.Random(0)
    sources = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.iterdir()) if p.suffix in (".jpg", ".png")]
    for i in range(count):
        im = sources[i % len(sources)]
        w, h = im.size
        crop = rng.uniform(0.7, 1.0)
        cw, ch = int(w * crop), int(h * crop)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im2 = im.crop((left, top, left + cw, top + ch))
        scale = rng.uniform(760, 840) / max(cw, ch)
        im2 = im2.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            im2 = im2.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im2.save(corpus / f"{i:06d}.jpg", "JPEG", quality=rng.randint(80, 92))
    return corpus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(root: Path, port: int) -> subprocess.Popen:
    """nginx serving ``root`` on 127.0.0.1 and the good hosts, and 429 with Retry-After on the rate-limited host."""
    if shutil.which("nginx") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True, stdout=subprocess.DEVNULL)
    conf_dir = WORK / "nginx"
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "nginx.conf"
    listens = "".join(f"listen {host}:{port}; " for host in ["127.0.0.1", *GOOD_HOSTS])
    conf.write_text(f"""daemon off;
worker_processes 1;
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 100000;
  client_body_temp_path {conf_dir}/tmp;
  proxy_temp_path {conf_dir}/tmp;
  fastcgi_temp_path {conf_dir}/tmp;
  uwsgi_temp_path {conf_dir}/tmp;
  scgi_temp_path {conf_dir}/tmp;
  types {{ image/jpeg jpg; }}
  server {{ {listens} root {root}; }}
  server {{ listen {RATE_LIMITED_HOST}:{port}; location / {{ add_header Retry-After 1 always; return 429; }} }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(conf_dir)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nginx did not start")


class SlowHosts:
    """The trickling hosts (headers at once, then one byte a second) and the silent host, on one event loop in a thread.

    Every connection is hung up after ``HANG_UP_S``, so no run can wait on them for ever.
    """

    def __init__(self, corpus: Path, port: int) -> None:
        self.corpus = corpus
        self.loop = asyncio.new_event_loop()
        self.servers = [self.loop.run_until_complete(asyncio.start_server(self._trickle, host, port)) for host in TRICKLE_HOSTS]
        self.servers.append(self.loop.run_until_complete(asyncio.start_server(self._silent, SILENT_HOST, port)))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _request(self, reader: asyncio.StreamReader) -> str:
        path = (await reader.readline()).split()[1].decode()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        return path

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            data = (self.corpus / (await self._request(reader)).strip("/")).read_bytes()
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n".encode())
            for byte in data:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1)

        try:
            await asyncio.wait_for(send(), HANG_UP_S)
        except (OSError, IndexError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def _silent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.read(), HANG_UP_S)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def write_urls(corpus: Path, count: int, port: int, scenario: str) -> Path:
    """The scenario's URL list: ``count`` corpus images once each, a fixed random share of them on the bad hosts."""
    names = sorted(p.name for p in corpus.glob("*.jpg"))[:count]
    rng = random.Random(0)
    bad = set(rng.sample(range(len(names)), {"clean": 0, "a": 5, "b": 5, "c": 2, "d": 2}[scenario] * len(names) // 100))
    urls = []
    for i, name in enumerate(names):
        if scenario == "clean":
            host = "127.0.0.1"
        elif i not in bad:
            host = GOOD_HOSTS[i % len(GOOD_HOSTS)]
        else:
            host = {"a": TRICKLE_HOSTS[0], "b": TRICKLE_HOSTS[i % len(TRICKLE_HOSTS)], "c": RATE_LIMITED_HOST, "d": SILENT_HOST}[scenario]
        urls.append(f"http://{host}:{port}/{name}")
    path = WORK / f"urls-{scenario}.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"photo {n}" for n in names]}), path)
    return path


class RssMonitor:
    """Peak RSS of a process tree, polled from /proc: the largest single process and the whole tree."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_process = 0
        self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            sizes = [self._rss(p) for p in self._tree()]
            self.peak_process = max(self.peak_process, max(sizes, default=0))
            self.peak_tree = max(self.peak_tree, sum(sizes))
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def timed(cmd: list[str], limit: float, env: dict[str, str] | None = None) -> tuple[float, float, RssMonitor]:
    """Wall seconds, CPU seconds (user + system of the whole process tree) and peak RSS of ``cmd``; killed after ``limit`` s."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    monitor = RssMonitor(proc.pid)
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise RuntimeError(f"{cmd[0]} ran past {limit:.0f} s and was killed") from None
    finally:
        monitor.stop()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{err[-3000:]}")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    return seconds, cpu, monitor


def stored_images(folder: Path) -> tuple[int, float]:
    """Images in the tars under ``folder`` and their mean size in KiB (both tools should store alike)."""
    sizes = []
    for tar in folder.rglob("*.tar"):
        with tarfile.open(tar) as t:
            sizes += [m.size for m in t.getmembers() if m.name.endswith(".jpg")]
    return len(sizes), sum(sizes) / max(len(sizes), 1) / 1024


def ensure_img2dataset() -> Path:
    python = I2D_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "img2dataset==1.47.0"],
            check=True,
            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
        )
    return python


def run_img2dataset(python: Path, urls: Path, out: Path, limit: float) -> tuple[float, float, RssMonitor]:
    shutil.rmtree(out, ignore_errors=True)
    script = (
        "from img2dataset import download\n"
        f"download(url_list={str(urls)!r}, output_folder={str(out)!r}, input_format='parquet', url_col='url', caption_col='caption',"
        f" image_size=256, resize_mode='keep_ratio', encode_format='jpg', encode_quality=95, output_format='webdataset',"
        f" processes_count={PROCESSES}, thread_count=64, number_sample_per_shard={I2D_ROWS_PER_SHARD}, timeout=10, retries=0,"
        " enable_wandb=False, distributor='multiprocessing')\n"
    )
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    return timed([str(python), "-c", script], limit, env)


def run_mmcurate(urls: Path, out: Path, settings: list[str], limit: float) -> tuple[float, float, RssMonitor]:
    """``mmcurate run`` with default settings but for the image options both tools share."""
    shutil.rmtree(out, ignore_errors=True)
    pipeline = WORK / "pipeline.yaml"
    pipeline.write_text(
        f"input: {{path: {urls}, format: parquet}}\n"
        f"output: {{path: {out}, format: webdataset}}\n"
        "stages:\n"
        "  - download: {image_size: 256, resize_mode: keep_ratio, encode_format: jpg, encode_quality: 95, allow_private_networks: true}\n"
    )
    overrides = [arg for kv in settings for arg in ("--set", f"download.{kv}")]
    return timed([sys.executable, "-m", "mmcurate.cli", "run", str(pipeline), "--no-progress", *overrides], limit)


def ceiling(corpus: Path, count: int = 400) -> float:
    """Images/s of decode + resize + encode alone on one core (the stage's own image path)."""
    from mmcurate.download.config import DownloadConfig
    from mmcurate.download.images import process_image

    config = DownloadConfig()
    blobs = [p.read_bytes() for p in sorted(corpus.glob("*.jpg"))[:count]]
    process_image(blobs[0], config)
    start = time.process_time()  # CPU time: robust to other load on the machine
    for blob in blobs:
        process_image(blob, config)
    return len(blobs) / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(f"{k} ({v})" for k, v in SCENARIOS.items())
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--limit", type=float, default=300.0, help="seconds a tool may take on one scenario")
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="extra download option for mmcurate"
    )
    parser.add_argument("--autogroup-nice", type=int, help="scheduling weight of this session while the bench runs (root; -20..19)")
    args = parser.parse_args()
    autogroup = Path("/proc/self/autogroup")
    previous = None
    if args.autogroup_nice is not None:
        previous = autogroup.read_text().split()[-1]
        autogroup.write_text(str(args.autogroup_nice))
    try:
        bench(args)
    finally:
        if previous is not None:
            autogroup.write_text(previous)


def bench(args: argparse.Namespace) -> None:
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        sys.exit(f"unknown scenario {unknown[0]!r} (scenarios: {', '.join(SCENARIOS)})")
    WORK.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.images)
    python = ensure_img2dataset()
    port = free_port()
    nginx = start_nginx(corpus, port)
    slow = SlowHosts(corpus, port)
    mib = 1 << 20
    summary = []
    try:
        for scenario in scenarios:
            urls = write_urls(corpus, args.images, port, scenario)
            rates: dict[str, list[float]] = {"img2dataset": [], "mmcurate": []}
            cpu_ms: dict[str, list[float]] = {"img2dataset": [], "mmcurate": []}
            for round_ in range(args.repeat):
                for name in ("img2dataset", "mmcurate"):
                    out = WORK / f"out-{name}"
                    if name == "img2dataset":
                        seconds, cpu, rss = run_img2dataset(python, urls, out, args.limit)
                    else:
                        seconds, cpu, rss = run_mmcurate(urls, out, args.settings, args.limit)
                    ok, kib = stored_images(out)
                    rates[name].append(ok / seconds)
                    cpu_ms[name].append(1000 * cpu / max(ok, 1))
                    print(
                        f"{scenario:5s} [{round_ + 1}] {name:12s} {ok}/{args.images} images in {seconds:5.1f} s ="
                        f" {ok / seconds:6.1f} images/s,"
                        f" {cpu_ms[name][-1]:.2f} CPU ms/image, {kib:.1f} KiB/image;"
                        f" peak RSS {rss.peak_process / mib:4.0f} MiB largest process, {rss.peak_tree / mib:4.0f} MiB tree",
                        flush=True,
                    )
            best = {k: max(v) for k, v in rates.items()}
            least = {k: min(v) for k, v in cpu_ms.items()}
            summary.append(
                f"{scenario:5s} ({SCENARIOS[scenario]}): mmcurate {best['mmcurate']:.1f} / img2dataset {best['img2dataset']:.1f} images/s"
                f" = {best['mmcurate'] / best['img2dataset']:.2f}x (best of {args.repeat});"
                f" {least['img2dataset'] / least['mmcurate']:.2f}x less CPU per image"
            )
    finally:
        slow.close()
        nginx.terminate()
        nginx.wait(10)
    print(f"{os.cpu_count()} cores, {args.images} URLs; img2dataset {PROCESSES} processes x 64 threads,", end=" ")
    print(f"{I2D_ROWS_PER_SHARD}-row shards; mmcurate defaults")
    print("\n".join(summary))
    rate = ceiling(corpus)
    print(f"single-core decode+resize+encode ceiling (the stage's Pillow path, 256 px keep_ratio, q95): {rate:.0f} images/s of CPU time")


if __name__ == "__main__":
    main()
