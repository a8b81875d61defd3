"""Whether a machine sees a run's storage: the input, and the same output folder as the driver.

The driver writes a probe file into the output folder (:func:`place`); each node then, in
:func:`look`, reads the input (a file's first byte, or a folder's listing, which must match the
driver's), reads the driver's probe (a node writing to a disk of its own does not find it), and
writes, reads back and deletes a probe of its own. Probe files have mmcurate's temporary names
(``.tmp-HEX-storage-probe``): readers skip them and a resumed run removes a killed probe's leftover.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from dataclasses import dataclass

from mmcurate.errors import UsageError
from mmcurate.shards.layout import temporary_path
from mmcurate.shards.storage import url_to_fs

PROBE = "storage-probe"


@dataclass(frozen=True)
class Probe:
    """What every node must see: the input as the driver sees it, and the driver's probe file in the output."""

    input: str
    output: str
    path: str  # the driver's probe file, in the output folder (a path of the output's filesystem)
    token: str  # its content
    view: str | None  # the driver's view of the input (:func:`_view`); None if the driver cannot read it (planning says why)


def place(input_url: str, output_url: str) -> Probe:
    """Write the driver's probe file into the output folder (which exists: the run's lease is in it)."""
    fs, root = url_to_fs(output_url)
    ifs, ipath = url_to_fs(input_url)
    try:
        view = _view(ifs, ipath)
    except OSError:
        view = None
    probe = Probe(input_url, output_url, temporary_path(f"{root.rstrip('/')}/{PROBE}"), uuid.uuid4().hex, view)
    try:
        fs.pipe_file(probe.path, probe.token.encode())
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {output_url}: {e}") from None
    return probe


def remove(probe: Probe) -> None:
    """Delete the driver's probe file."""
    fs, _ = url_to_fs(probe.output)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(probe.path)


def look(probe: Probe) -> str | None:
    """Run on a node: what it cannot see of the run's storage, in words (None: it sees everything)."""
    try:
        ifs, ipath = url_to_fs(probe.input)
        if probe.view is not None and _view(ifs, ipath) != probe.view:
            return f"sees a different input at {probe.input} than the driver (a disk of its own?)"
    except Exception as e:  # noqa: BLE001 -- whatever the failure, it is what the node cannot see
        return f"cannot read the input {probe.input}: {_said(e)}"
    try:
        fs, root = url_to_fs(probe.output)
        if fs.cat_file(probe.path) != probe.token.encode():
            return f"sees a different output folder at {probe.output} than the driver (a disk of its own?)"
    except FileNotFoundError:
        return f"does not see the driver's files in the output folder {probe.output} (a disk of its own?)"
    except Exception as e:  # noqa: BLE001 -- as above
        return f"cannot read the output folder {probe.output}: {_said(e)}"
    own, token = temporary_path(f"{root.rstrip('/')}/{PROBE}"), uuid.uuid4().hex.encode()
    try:
        fs.pipe_file(own, token)
        try:
            if fs.cat_file(own) != token:
                return f"reads back something else than it wrote in the output folder {probe.output}"
        finally:
            fs.rm(own)
    except Exception as e:  # noqa: BLE001 -- as above
        return f"cannot write to the output folder {probe.output}: {_said(e)}"
    return None


def _view(fs, path: str) -> str:
    """What a machine sees at the input path: a file's size (after reading its first byte), or a
    digest of a folder's listing; OSError if it cannot read it."""
    if fs.isdir(path):
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        return "folder " + hashlib.sha256("\n".join(names).encode()).hexdigest()
    with fs.open(path, "rb") as f:
        f.read(1)
    return f"file of {fs.size(path)} bytes"


def _said(error: BaseException) -> str:
    """An exception in one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
