"""``mmcurate demo``: the demo pipeline end to end on the sample images shipped in examples/data.

The images are served by a loopback HTTP server so the real download stage fetches them (the
pipeline opts in to private addresses for this); the URL list is written next to the output. A
second demo into the same output serves on the port its URL list names, so the list (the run's
input) stays unchanged and the run resumes, or is left as it is when it finished.
"""

from __future__ import annotations

import csv
import functools
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmcurate.engines import run_pipeline
from mmcurate.pipelines.config import apply_overrides, load_pipeline

DATA = Path(__file__).parent / "data"
PIPELINE = Path(__file__).parent / "demo.yaml"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(folder: Path, port: int = 0) -> Iterator[str]:
    """Serve ``folder`` on loopback ``port`` (a free one if 0 or taken); yield its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_url_list(base_url: str, target: Path) -> Path:
    """The demo's URL list: one JSON line per row of captions.csv (an identical list is left as it is)."""
    with open(DATA / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    text = "".join(json.dumps({"url": f"{base_url}/{r['file']}", "caption": r["caption"]}) + "\n" for r in rows)
    if not target.exists() or target.read_text() != text:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return target


def _listed_port(urls: Path) -> int:
    """The port an earlier demo's URL list names (0 if there is none)."""
    try:
        return urllib.parse.urlsplit(json.loads(urls.read_text().partition("\n")[0])["url"]).port or 0
    except (OSError, ValueError, KeyError):
        return 0


def run_demo(output: str, progress: bool = True) -> dict:
    """Serve the sample images, run examples/demo.yaml into ``output`` and return the summary."""
    out = Path(output).resolve()
    urls = out.parent / f"{out.name}-urls" / "urls.jsonl"
    with serve(DATA, _listed_port(urls)) as base_url:
        write_url_list(base_url, urls)
        pipeline = apply_overrides(load_pipeline(PIPELINE), [f"input.path={urls}", f"output.path={out}"])
        return run_pipeline(pipeline, progress=progress)
