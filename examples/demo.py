"""``mmcurate demo``: the demo pipeline end to end on the sample images shipped in examples/data.

The images are served by a loopback HTTP server so the real download stage fetches them (the
pipeline opts in to private addresses for this); the URL list is written next to the output.
"""

from __future__ import annotations

import csv
import functools
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmcurate.engines import run_pipeline
from mmcurate.pipelines.config import apply_overrides, load_pipeline

DATA = Path(__file__).parent / "data"
PIPELINE = Path(__file__).parent / "demo.yaml"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on a free loopback port; yield its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_url_list(base_url: str, target: Path) -> Path:
    """The demo's URL list: one JSON line per row of captions.csv."""
    with open(DATA / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps({"url": f"{base_url}/{r['file']}", "caption": r["caption"]}) + "\n" for r in rows))
    return target


def run_demo(output: str, progress: bool = True) -> dict:
    """Serve the sample images, run examples/demo.yaml into ``output`` and return the summary."""
    out = Path(output).resolve()
    with serve(DATA) as base_url:
        urls = write_url_list(base_url, out.parent / f"{out.name}-urls" / "urls.jsonl")
        pipeline = apply_overrides(load_pipeline(PIPELINE), [f"input.path={urls}", f"output.path={out}"])
        return run_pipeline(pipeline, progress=progress)
