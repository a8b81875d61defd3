"""``mmcurate demo``: the demo pipeline end to end on the sample images shipped in examples/data.

The images are served by a loopback HTTP server so the real download stage fetches them (the
pipeline opts in to private addresses for this); the URL list is written into the output's own
``_input/`` (mmcurate writes nothing outside the output, and refuses a folder that is not an
mmcurate output before writing anything). A second demo into the same output serves on the port its
URL list names, so the list (the run's input) stays unchanged and the run resumes, or is left as it
is when it finished.
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
from mmcurate.engines.run import previous_run
from mmcurate.errors import UsageError
from mmcurate.pipelines.config import apply_overrides, load_pipeline
from mmcurate.shards.layout import INPUT, OutputDir

DATA = Path(__file__).parent / "data"
PIPELINE = Path(__file__).parent / "demo.yaml"
URLS = "urls.jsonl"  # the URL list's name in the output's _input/


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


def url_list(base_url: str) -> bytes:
    """The demo's URL list: one JSON line per row of captions.csv."""
    with open(DATA / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return "".join(json.dumps({"url": f"{base_url}/{r['file']}", "caption": r["caption"]}) + "\n" for r in rows).encode()


def _listed_port(urls: Path) -> int:
    """The port an earlier demo's URL list names (0 if there is none)."""
    try:
        return urllib.parse.urlsplit(json.loads(urls.read_text().partition("\n")[0])["url"]).port or 0
    except (OSError, ValueError, KeyError):
        return 0


def run_demo(output: str, progress: bool = True) -> dict:
    """Serve the sample images, run examples/demo.yaml into ``output`` and return the summary.

    ``output`` must be new, empty or an earlier demo's output: anything else is refused (UsageError)
    before a file is written. A demo that stops before its run starts leaves nothing behind.
    """
    out = OutputDir.open(str(Path(output).resolve()))
    urls = out.path(INPUT, URLS)
    record = previous_run(out)
    recorded_input = record["pipeline"].get("input") if record is not None else None
    if record is not None and (not isinstance(recorded_input, dict) or recorded_input.get("path") != urls):
        raise UsageError(f"{out.root} holds the output of another pipeline; use a new output folder")
    existed = out.exists(out.root)
    try:
        with serve(DATA, _listed_port(Path(urls))) as base_url:
            out.write_input(URLS, url_list(base_url))
            pipeline = apply_overrides(load_pipeline(PIPELINE), [f"input.path={urls}", f"output.path={out.root}"])
            return run_pipeline(pipeline, progress=progress)
    except BaseException:
        if not out.exists(out.run_json):  # the run never started: leave no trace
            out.remove_input()
            if not existed and out.exists(out.root) and not out.entries():
                out.fs.rmdir(out.root)
        raise
