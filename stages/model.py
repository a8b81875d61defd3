"""Model stages: the one layer clip_score, nsfw, capfilt and grounding run on.

A model stage subclasses :class:`ModelStage`, its config :class:`ModelConfig` (``device``,
``batch_size``, ``precision``, ``workers``, ``prefetch``; a stage may redeclare a field to change
its default), and implements three methods::

    load()                         once per worker: the model(s) onto ``self.device`` in ``self.dtype``
                                   (:func:`hf_load` and :func:`open_clip_load` take ids, folders, revisions)
    prepare(row) -> item | Skip    CPU work for one row (decode, preprocess) in ``workers`` threads,
                                   up to ``prefetch`` batches ahead of the model; ``row`` is a dict
                                   of ``key`` and the ``needs`` columns; ``Skip(reason)`` rejects it
    infer(items) -> outputs        one model call on at most ``batch_size`` prepared items
    finish(batch, outputs, reasons) -> table   columns set; ``outputs[i]`` is None where ``reasons[i]`` is set

:meth:`ModelStage.process` does the rest: decode ahead, batching, ``torch.inference_mode`` with bf16
autocast on a GPU, and on ``torch.cuda.OutOfMemoryError`` it halves the batch and retries (the
worker keeps the smaller size; ``oom_halvings`` goes into the stage's line of the shard's stats, through
:meth:`Stage.events`).

Device: ``auto`` is CUDA when the machine (local engine) or the cluster (Ray) has a GPU, else CPU;
``cuda`` where there is none runs on CPU too. It is resolved where the stage is built and again by
the Ray driver for its cluster (:meth:`ModelStage.place`); ``resources`` follow it (1 GPU or none).
Engines: the local engine runs a model stage in its own process pool beside the CPU pool, one
worker per GPU, or on CPU one worker whose torch uses the run's ``workers`` threads (one model copy,
not one per CPU worker); Ray runs it as an actor pool (``num_gpus`` from ``resources``) fed
``batch_size`` rows per call; Spark refuses it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
from PIL import Image

from mmcurate.errors import UsageError
from mmcurate.stages.base import Resources, Stage


@dataclass
class ModelConfig:
    """Options every model stage has."""

    device: str = "auto"  # auto (cuda when the machine or cluster has a GPU), cpu, cuda, cuda:1 ...
    batch_size: int = 32  # rows per model call
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU, fp32 on the CPU
    workers: int = 4  # threads decoding and preprocessing rows ahead of the model
    prefetch: int = 2  # batches prepared ahead of the model

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")


@dataclass(frozen=True)
class Skip:
    """What :meth:`ModelStage.prepare` returns for a row the model cannot take: the rejection reason."""

    reason: str


def gpu_count() -> int:
    """GPUs this machine's torch sees (0 without torch or CUDA). Tests patch it to declare a GPU."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(wanted: str, gpus: int) -> str:
    """The device a stage asking for ``wanted`` runs on where ``gpus`` GPUs are: a GPU only where one is."""
    if wanted == "cpu" or gpus <= 0:
        return "cpu"
    return "cuda" if wanted == "auto" else wanted


class ModelStage(Stage):
    """Base class of the stages that run a model over batches of rows (see the module docstring)."""

    Config: ClassVar[type] = ModelConfig
    resources: Resources = Resources(cpus=1, gpus=1, memory_gb=2)  # the class default, on a GPU; place() sets the instance's
    uses_torch: ClassVar[bool] = True  # False: the model is not torch (ONNX): no inference mode, no bf16

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        wanted = getattr(self.config, "device", "cpu")
        self.place(gpu_count() if wanted != "cpu" else 0)
        self.threads: int | None = None
        self._limit: int | None = None  # batch size after out-of-memory halvings
        self._halvings = 0  # out-of-memory halvings since the last events() call

    def place(self, gpus: int) -> None:
        """Resolve the device for a machine or cluster with ``gpus`` GPUs; ``resources`` follow it."""
        self.device = resolve_device(getattr(self.config, "device", "cpu"), gpus)
        on_gpu = self.device.startswith("cuda")
        base = type(self).resources
        self.resources = Resources(cpus=base.cpus, gpus=base.gpus if on_gpu else 0.0, memory_gb=base.memory_gb)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def setup(self) -> None:
        if self.uses_torch:
            torch = require("torch", self.name)
            if self.threads and not self.on_gpu:
                torch.set_num_threads(self.threads)
            precision = getattr(self.config, "precision", "auto")
            self.bf16 = precision == "bf16" or (precision == "auto" and self.on_gpu)
            self.dtype = torch.bfloat16 if self.bf16 and self.on_gpu else torch.float32
        self.load()

    # -- what a stage implements -----------------------------------------------------------------

    def load(self) -> None:
        raise NotImplementedError

    def prepare(self, row: dict[str, Any]) -> Any:
        raise NotImplementedError

    def infer(self, items: list[Any]) -> list[Any]:
        raise NotImplementedError

    def finish(self, batch: pa.Table, outputs: list[Any], reasons: list[str | None]) -> pa.Table:
        raise NotImplementedError

    # -- the layer -------------------------------------------------------------------------------

    def process(self, batch: pa.Table) -> pa.Table:
        outputs, reasons = self.run(batch)
        return self.finish(batch, outputs, reasons)

    def run(self, batch: pa.Table) -> tuple[list[Any], list[str | None]]:
        """``prepare`` then ``infer`` over the rows of ``batch``: each row's output, or its reason."""
        columns = [c for c in ("key", *self.needs) if c in batch.column_names]
        rows = batch.select(columns).to_pylist()
        outputs: list[Any] = [None] * len(rows)
        reasons: list[str | None] = [None] * len(rows)
        c = self.config
        with ThreadPoolExecutor(c.workers) as pool:
            for chunk in prepared_batches(pool, self.prepare, rows, c.batch_size, getattr(c, "prefetch", 2)):
                ready = []
                for i, item in chunk:
                    if isinstance(item, Skip):
                        reasons[i] = item.reason
                    else:
                        ready.append((i, item))
                for (i, _), output in zip(ready, self.infer_batches([item for _, item in ready]), strict=True):
                    outputs[i] = output
        return outputs, reasons

    def infer_batches(self, items: list[Any]) -> list[Any]:
        """``infer`` over ``items`` in slices, halving the slice on CUDA out-of-memory."""
        results: list[Any] = []
        start = 0
        while start < len(items):
            size = min(self._limit or len(items), len(items) - start)
            try:
                with self.inference():
                    part = self.infer(items[start : start + size])
            except Exception as e:
                if not is_out_of_memory(e) or size == 1:
                    raise
                _empty_cache()
                self._limit = size // 2
                self._halvings += 1
                continue
            results.extend(part)
            start += size
        return results

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """``torch.inference_mode``, with bf16 autocast where the stage runs in bf16 on a GPU."""
        if not self.uses_torch:
            yield
            return
        import torch

        device_type = "cuda" if self.on_gpu else "cpu"
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            yield

    def provenance(self) -> dict[str, Any]:
        """What ``run.json`` records of this stage's models (ids, revisions, decoding settings)."""
        return {"device": self.device}

    def events(self) -> dict[str, int]:
        """Out-of-memory halvings since the last call."""
        count, self._halvings = self._halvings, 0
        return {"oom_halvings": count}  # zeros too: every batch of the stage carries the same ledger columns


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def _empty_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# CPU work ahead of the model.

T = TypeVar("T")
R = TypeVar("R")


def decode_image(data: bytes | None, draft: tuple[int, int] | None = None) -> Image.Image | None:
    """The image as RGB, or None when ``data`` is missing or not a decodable image.

    ``draft`` lets JPEG decoding skip detail below that size (a free speed-up before a downscale).
    """
    if data is None:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        if draft is not None:
            image.draft("RGB", draft)
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def row_image(row: dict[str, Any], draft: tuple[int, int] | None = None) -> Image.Image | Skip:
    """A row's image for a model (:func:`decode_image`), or why there is none: ``image_missing``, ``decode_error``."""
    if row["image"] is None:
        return Skip("image_missing")
    image = decode_image(row["image"], draft)
    return Skip("decode_error") if image is None else image


def prefetched(executor: Executor, fn: Callable[[T], R], items: Iterable[T], depth: int) -> Iterator[R]:
    """``map(fn, items)`` run in ``executor``, in order, with at most ``depth`` results pending.

    The caller's work on one result overlaps with the preparation of the next ones, without holding
    more than ``depth`` prepared results in memory.
    """
    pending: deque = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def prepared_batches(executor: Executor, prepare: Callable[[T], R], items: list[T], size: int, ahead: int) -> Iterator[list[tuple[int, R]]]:
    """``prepare`` every item in ``executor``, up to ``ahead`` batches in advance of the consumer;
    yield ``(index, result)`` pairs in batches of ``size``, in order."""
    results = prefetched(executor, prepare, items, depth=size * ahead)
    for start in range(0, len(items), size):
        yield [(i, next(results)) for i in range(start, min(start + size, len(items)))]


# ---------------------------------------------------------------------------------------------
# Models as configuration: a local folder, a Hugging Face id (revision pinnable), open_clip names.


def require(module: str, stage: str, extra: str = "models") -> Any:
    """Import ``module``; a :class:`UsageError` naming the extra to install when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"{stage} needs {e.name or module}: pip install 'mmcurate[{extra}]'") from None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def hub_status(repo_id: str, filename: str, revision: str | None = None) -> Literal["cached", "online"]:
    """Whether ``filename`` of hub repo ``repo_id`` is in the local cache, or the hub can be asked for
    it; a :class:`UsageError` at once when neither (offline, or the hub does not answer in 3 s)."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # huggingface_hub's HFValidationError: not ORG/NAME
        raise UsageError(f"model {repo_id!r} is neither a folder nor a Hugging Face model id") from None
    if isinstance(cached, str):
        return "cached"
    if _offline():
        raise UsageError(
            f"model {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it first or give a local folder"
        )
    if not _reachable(constants.ENDPOINT):
        raise UsageError(
            f"model {repo_id!r} is not in the Hugging Face cache and {constants.ENDPOINT} cannot be reached: give a local folder"
        )
    return "online"


def hf_load(
    cls: Any, name: str, revision: str | None = None, stage: str = "", *, option: str = "model", kind: str = "", **kwargs: Any
) -> Any:
    """``cls.from_pretrained`` (a transformers model, processor or config class) on a local folder or a hub id.

    A hub id is checked first (:func:`hub_status`), so a missing model is one clear line within
    seconds; one in the local cache loads from it without a round trip to the hub. A model class
    gets only a checkpoint it can use, or a :class:`UsageError` naming ``option`` and ``kind`` (what
    the stage wants, "a captioning model"): one whose ``model_type`` the class cannot load is
    refused before loading, one lacking weights the class needs (transformers' ``missing_keys``,
    which it would initialise at random) after.
    """
    where = f"{stage}: " if stage else ""
    local = Path(name).expanduser()
    if local.is_dir():
        source, options = str(local), {}
    else:
        if local.is_absolute() or name.startswith("."):
            raise UsageError(f"{where}{option} folder {name} does not exist")
        try:
            status = hub_status(name, "config.json", revision)
        except UsageError as e:
            raise UsageError(f"{where}{e}") from None
        source, options = name, {"revision": revision, "local_files_only": status == "cached"}  # no hub round trip when cached
    bars = sys.modules["transformers"].utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # transformers' weight-loading bar would cut through the run's progress lines
    try:
        if not _is_model_class(cls):
            return cls.from_pretrained(source, **options, **kwargs)
        wanted = kind or f"one {cls.__name__} loads"
        config = sys.modules["transformers"].AutoConfig.from_pretrained(source, **options)
        if not _loads(cls, config):
            raise UsageError(f"{where}{option} {name!r} is a model of type {config.model_type}, not {wanted}")
        report = logging.getLogger("transformers.modeling_utils")  # its load report lists the keys refused below
        report.addFilter(_quiet)
        try:
            model, info = cls.from_pretrained(source, config=config, output_loading_info=True, **options, **kwargs)
        finally:
            report.removeFilter(_quiet)
        random = {*info["missing_keys"], *(m[0] for m in info["mismatched_keys"])}
        missing = sorted({key.split(".")[0] for key in random})
        if missing:
            raise UsageError(f"{where}{option} {name!r} has no weights for {', '.join(missing)} (they would be random): is it {wanted}?")
        return model
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{where}cannot load {option} {name!r}: {str(e).splitlines()[0]}") from None
    finally:
        if shown:
            bars.enable_progress_bar()


def _quiet(record: logging.LogRecord) -> bool:
    """A logging filter that drops every record (not its level: transformers reads that level for other warnings)."""
    return False


def _is_model_class(cls: Any) -> bool:
    """Whether ``cls`` is a transformers model class (an ``AutoModel...`` or a concrete one), not a processor or config."""
    return isinstance(cls, type) and (hasattr(cls, "_model_mapping") or issubclass(cls, sys.modules["transformers"].PreTrainedModel))


def _loads(cls: Any, config: Any) -> bool:
    """Whether model class ``cls`` takes a checkpoint of ``config``: an ``AutoModel...`` class by its
    mapping, a concrete class by its config's ``model_type``."""
    mapping = getattr(cls, "_model_mapping", None)
    return type(config) in mapping if mapping is not None else config.model_type == cls.config_class.model_type


RANDOM = "random"  # the pretrained tag that asks open_clip for a randomly initialised model


def open_clip_load(model: str, pretrained: str | None, device: str, stage: str = "") -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)`` from open_clip: a built-in name + pretrained tag (or
    checkpoint file), ``hf-hub:ORG/REPO`` or ``local-dir:/path``. Weights that are neither cached
    nor reachable are one clear line before anything is built; so is a built-in name without a tag
    (random weights), unless the tag is ``random``, which asks for them."""
    open_clip = require("open_clip", stage)
    where = f"{stage}: " if stage else ""
    schema = model.startswith(("hf-hub:", "local-dir:"))
    try:
        if pretrained == RANDOM and not schema:
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None, device=device)
        else:
            if model.startswith("hf-hub:"):
                hub_status(model.removeprefix("hf-hub:"), "open_clip_config.json")
            elif not schema and not pretrained and model in open_clip.list_models():
                tags = [*open_clip.list_pretrained_tags_by_model(model), RANDOM]
                raise UsageError(f"no pretrained tag, so its weights would be random: give one of {', '.join(tags)}")
            elif pretrained and not schema and not Path(pretrained).is_file():
                _check_open_clip_weights(open_clip, model, pretrained)
            net, preprocess = open_clip.create_model_from_pretrained(model, pretrained=pretrained, device=device)  # no weights: an error
        tokenizer = open_clip.get_tokenizer(model)
    except UsageError as e:
        raise UsageError(f"{where}cannot load open_clip model {model!r} (pretrained {pretrained!r}): {e}") from None
    except (RuntimeError, ValueError, OSError) as e:
        raise UsageError(f"{where}cannot load open_clip model {model!r} (pretrained {pretrained!r}): {str(e).splitlines()[0]}") from None
    return net.eval(), preprocess, tokenizer


def _check_open_clip_weights(open_clip: Any, model: str, tag: str) -> None:
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        return  # open_clip itself names the unknown tag
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        for name in (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            try:
                hub_status(repo, name)
                return
            except UsageError as e:
                error = e
        raise error
    url = cfg.get("url", "")
    cached = (Path.home() / ".cache" / "clip" / os.path.basename(url)).exists()
    if url and not cached and (_offline() or not _reachable(url)):
        raise UsageError(f"weights {url} are not cached and cannot be downloaded here")
