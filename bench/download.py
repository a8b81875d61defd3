"""Benchmark the download stage against img2dataset 1.47 on the same local corpus, in one run.

Builds a corpus of ~800 px JPEGs from the test photos, serves it with nginx on 127.0.0.1, then
downloads it with img2dataset (in its own venv) and with ``mmcurate run`` using the same settings:
256 px keep_ratio, JPEG q95, WebDataset, 2 processes, 500 rows per shard. Prints images/s (ok
images over wall-clock seconds, process start included), the ratio, the peak RSS of the largest
worker process and of the whole process tree, and the single-core decode+resize+encode ceiling.

    python bench/download.py [--images 4000] [--repeat 1] [--autogroup-nice -10] [--set KEY=VALUE]

Linux schedules sessions (autogroups) fairly against each other, so on a machine shared with other
sessions either tool gets only a share of the cores and the figures swing run to run;
``--autogroup-nice -10`` (root) raises this session's weight while the bench runs and restores it
after. CPU ms per image (user + system of each tool's whole process tree) is robust to that load.

Needs nginx (``apt-get install -y nginx-light``; installed here when missing). Everything it
writes lives under bench/out/download/ (gitignored).
"""

from __future__ import annotations

import argparse
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
ROWS_PER_SHARD = 500
PROCESSES = 2


def build_corpus(count: int) -> Path:
    """``count`` JPEGs of about 800 px (random crops, flips and scales of the test photos)."""
    corpus = WORK / "corpus"
    if corpus.exists() and len(list(corpus.glob("*.jpg"))) == count:
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
    if shutil.which("nginx") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True, stdout=subprocess.DEVNULL)
    conf_dir = WORK / "nginx"
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "nginx.conf"
    conf.write_text(f"""daemon off;
worker_processes 1;
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
events {{ worker_connections 1024; }}
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
  server {{ listen 127.0.0.1:{port}; root {root}; }}
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


def write_urls(corpus: Path, port: int) -> Path:
    names = sorted(p.name for p in corpus.glob("*.jpg"))
    path = WORK / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/{n}" for n in names], "caption": [f"photo {n}" for n in names]}), path)
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


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, RssMonitor]:
    """Wall seconds, CPU seconds (user + system of the whole process tree) and peak RSS of ``cmd``."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    monitor = RssMonitor(proc.pid)
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    monitor.stop()
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


def run_img2dataset(python: Path, urls: Path, out: Path) -> tuple[float, float, RssMonitor]:
    shutil.rmtree(out, ignore_errors=True)
    script = (
        "from img2dataset import download\n"
        f"download(url_list={str(urls)!r}, output_folder={str(out)!r}, input_format='parquet', url_col='url', caption_col='caption',"
        f" image_size=256, resize_mode='keep_ratio', encode_format='jpg', encode_quality=95, output_format='webdataset',"
        f" processes_count={PROCESSES}, thread_count=64, number_sample_per_shard={ROWS_PER_SHARD}, timeout=10, retries=0,"
        " enable_wandb=False, distributor='multiprocessing')\n"
    )
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    return timed([str(python), "-c", script], env)


def run_mmcurate(urls: Path, out: Path, settings: list[str]) -> tuple[float, float, RssMonitor]:
    shutil.rmtree(out, ignore_errors=True)
    pipeline = WORK / "pipeline.yaml"
    pipeline.write_text(
        f"input: {{path: {urls}, format: parquet}}\n"
        f"output: {{path: {out}, format: webdataset, rows_per_shard: {ROWS_PER_SHARD}}}\n"
        f"workers: {PROCESSES}\n"
        "stages:\n"
        "  - download: {image_size: 256, resize_mode: keep_ratio, encode_format: jpg, encode_quality: 95, timeout: 10, allow_private_networks: true}\n"
    )
    overrides = [arg for kv in settings for arg in ("--set", f"download.{kv}")]
    return timed([sys.executable, "-m", "mmcurate.cli", "run", str(pipeline), "--no-progress", *overrides])


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
    parser.add_argument("--repeat", type=int, default=1)
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
    WORK.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.images)
    python = ensure_img2dataset()
    port = free_port()
    nginx = start_nginx(corpus, port)
    try:
        urls = write_urls(corpus, port)
        mib = 1 << 20
        rates: dict[str, list[float]] = {"img2dataset": [], "mmcurate": []}
        cpu_ms: dict[str, list[float]] = {"img2dataset": [], "mmcurate": []}
        for round_ in range(args.repeat):
            for name, runner in (
                ("img2dataset", lambda: run_img2dataset(python, urls, WORK / "out-img2dataset")),
                ("mmcurate", lambda: run_mmcurate(urls, WORK / "out-mmcurate", args.settings)),
            ):
                seconds, cpu, rss = runner()
                ok, kib = stored_images(WORK / f"out-{name}")
                rates[name].append(ok / seconds)
                cpu_ms[name].append(1000 * cpu / max(ok, 1))
                print(
                    f"[{round_ + 1}] {name:12s} {ok}/{args.images} images in {seconds:5.1f} s = {ok / seconds:6.1f} images/s, {cpu_ms[name][-1]:.2f} CPU ms/image, {kib:.1f} KiB/image;"
                    f" peak RSS {rss.peak_process / mib:4.0f} MiB largest process, {rss.peak_tree / mib:4.0f} MiB tree",
                    flush=True,
                )
    finally:
        nginx.terminate()
        nginx.wait(10)
    best = {k: max(v) for k, v in rates.items()}
    least = {k: min(v) for k, v in cpu_ms.items()}
    print(
        f"mmcurate / img2dataset: {best['mmcurate'] / best['img2dataset']:.2f}x images/s (best of {args.repeat}; {os.cpu_count()} cores, {PROCESSES} processes each);"
        f" {least['img2dataset'] / least['mmcurate']:.2f}x less CPU per image"
    )
    print(
        f"single-core decode+resize+encode ceiling (the stage's Pillow path, 256 px keep_ratio, q95): {ceiling(corpus):.0f} images/s of CPU time"
    )


if __name__ == "__main__":
    main()
