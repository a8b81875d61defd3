"""Pipeline configuration: input, output, ordered stages with their options, engine.

```yaml
input:  {path: urls.parquet, format: parquet, url_col: URL, caption_col: TEXT}
output: {path: out, format: webdataset, rows_per_shard: 10000}
engine: local          # local | ray | spark
workers: 2             # local process pool size (at most 512; the local engine starts at most one per shard)
min_actors: 2          # Ray: the least actors of each actor pool (default: as many as the cluster fits at the start)
max_actors: 32         # Ray: the most (default: no limit, pools grow with the cluster)
stages:
  - download: {image_size: 256}
  - language: {keep: [en], min_score: 0.5}
```
Relative paths are resolved against the YAML file's folder; so are relative model paths (a
stage's captioner, detector, ``local-dir:`` CLIP...) that exist there (``org/name`` stays a hub id).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmcurate.errors import UsageError
from mmcurate.options import bounded, build_config, is_path_option
from mmcurate.pipelines.registry import STAGES, stage_class
from mmcurate.schemas import BY_NAME
from mmcurate.shards.readers import InputSpec
from mmcurate.shards.writers import OutputSpec
from mmcurate.stages.base import Stage

ENGINES = ("local", "ray", "spark")
MAX_WORKERS = 512  # local pool processes, Spark's local[N], a local Ray's CPUs: a larger count is refused as a mistake
ENGINE_KEYS = ("engine", "workers", "min_actors", "max_actors")  # how a pipeline runs, not what it outputs
PIPELINE_KEYS = ("input", "output", "stages", *ENGINE_KEYS)  # the top-level keys of a pipeline
PRESETS = Path(__file__).parent
# Columns every reader provides, and those only image-bearing inputs provide.
READER_COLUMNS = ("key", "url", "caption", "reject_stage", "reject_reason")
IMAGE_COLUMNS = ("image", "image_format", "width", "height", "original_width", "original_height", "sha256", "status")


@dataclass(frozen=True)
class StageSpec:
    """A stage by name with its options, as written in the pipeline."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Stage:
        return stage_class(self.name).from_params(self.params)


@dataclass
class Pipeline:
    input: InputSpec
    output: OutputSpec
    stages: list[StageSpec]
    engine: str = "local"
    workers: int = bounded(default_factory=lambda: min(os.cpu_count() or 1, MAX_WORKERS), ge=1, le=MAX_WORKERS)
    min_actors: int | None = bounded(None, ge=1)  # Ray actor pools: the least actors (None: the pool's planned size)
    max_actors: int | None = bounded(None, ge=1)  # Ray actor pools: the most (None: they grow with the cluster)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.min_actors is not None and self.max_actors is not None and self.min_actors > self.max_actors:
            raise UsageError(f"min_actors ({self.min_actors}) must not be above max_actors ({self.max_actors})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": dataclasses.asdict(self.input),
            "output": dataclasses.asdict(self.output),
            "engine": self.engine,
            "workers": self.workers,
            **{k: v for k, v in (("min_actors", self.min_actors), ("max_actors", self.max_actors)) if v is not None},
            "stages": [{s.name: dict(s.params)} for s in self.stages],
        }

    def build_stages(self) -> list[Stage]:
        """Instantiate every stage (unknown names and bad options raise UsageError), each with its label."""
        stages = [spec.build() for spec in self.stages]
        for stage, label in zip(stages, stage_labels([s.name for s in self.stages]), strict=True):
            stage.label = label
        return stages


def stage_labels(names: list[str]) -> list[str]:
    """Each stage's label, how reject_stage, stats and ``--set`` name it: its name, or ``name#k``
    for the k-th of several stages of one name (``language#1``, ``language#2``)."""
    counts, seen = Counter(names), Counter()
    labels = []
    for name in names:
        seen[name] += 1
        labels.append(name if counts[name] == 1 else f"{name}#{seen[name]}")
    return labels


def check_columns(stages: list[Stage], input_format: str, carried: tuple[str, ...] = ()) -> None:
    """Check that each stage finds the columns it needs in the input (``carried``: those an mmcurate
    input already holds, e.g. ``grounding`` of an earlier ``noun_phrases`` run) or an earlier stage's,
    and that the output's spans index its text: a stage that writes a text column (``adds`` it) after
    the spans into it were taken (by a stage that adds the span column and needs the text, or by an
    earlier run) is refused unless a later stage takes them again."""
    available = {*input_columns(input_format), *carried}
    spans = {c: BY_NAME[c].indexes for c in BY_NAME if BY_NAME[c].indexes}  # span column -> the text it indexes
    # span column -> the stage that took its spans (None: a run before, the input holds them)
    taken: dict[str, str | None] = dict.fromkeys(c for c in spans if c in carried)
    stale: dict[str, str] = {}  # span column -> the stage that rewrote its text since
    for stage in stages:
        missing = [c for c in stage.needs if c not in available]
        if missing:
            raise UsageError(
                f"stage {stage.name} needs column {missing[0]!r}, which neither an earlier stage nor the {input_format} input provides"
            )
        for column, text in spans.items():
            if column in stage.adds and text in stage.needs:
                taken[column] = stage.label
                stale.pop(column, None)
            elif text in stage.adds and column in taken:
                stale.setdefault(column, stage.label)
        available |= set(stage.adds)
    for column, rewriter in stale.items():
        text, origin = spans[column], taken[column]
        if origin is None:
            raise UsageError(
                f"stage {rewriter} rewrites {text!r}, which the {column!r} spans of the input (taken by an earlier run) index:"
                f" run {rewriter} before that run's stages, or take the spans again after it"
            )
        raise UsageError(
            f"stage {rewriter} rewrites {text!r} after {origin} took the {column!r} spans from it: run {rewriter} before {origin}"
        )


def input_columns(input_format: str) -> tuple[str, ...]:
    """Declared columns a reader of ``input_format`` provides."""
    return READER_COLUMNS + (IMAGE_COLUMNS if input_format in ("img2dataset", "mmcurate") else ())


def output_columns(stages: list[Stage], input_format: str, carried: tuple[str, ...] = ()) -> list[str]:
    """Declared columns of the output: the reader's, those the stages add, the ledger's, and
    ``carried``: those an mmcurate input already holds (an earlier run's scores)."""
    names = {*input_columns(input_format), "duplicate_of", *carried, *(c for s in stages for c in s.adds)}
    return [n for n in BY_NAME if n in names]


def parse_pipeline(data: Any, base: Path | None = None, paths: dict[str, str] | None = None) -> Pipeline:
    """Build a Pipeline from a parsed YAML mapping; relative paths are resolved against ``base``.

    ``paths`` (``{"input": ..., "output": ...}``, from ``--input``/``--output``) replace the YAML's
    paths, so a preset may leave them out.
    """
    if not isinstance(data, dict):
        raise UsageError("a pipeline is a mapping with input, output and stages")
    unknown = sorted(set(data) - {*PIPELINE_KEYS, "description"})
    if unknown:
        raise UsageError(f"pipeline: unknown key {unknown[0]!r} (keys: input, output, stages, {', '.join(ENGINE_KEYS)})")
    sections = {}
    for section in ("input", "output"):
        given = data.get(section) or {}
        if not isinstance(given, dict):
            raise UsageError(f"pipeline: {section} is a mapping with a path, not {given!r}")
        if paths and paths.get(section):
            sections[section] = {**given, "path": paths[section]}
        elif "path" in given:
            sections[section] = _resolve(given, base)
        else:
            raise UsageError(f"pipeline: {section} needs a path (in the YAML or with --{section})")
    inp = build_config(InputSpec, sections["input"], "pipeline input")
    out = build_config(OutputSpec, sections["output"], "pipeline output")
    listed = data.get("stages") or []
    if not isinstance(listed, list):
        given = "a mapping" if isinstance(listed, dict) else repr(listed)
        raise UsageError(f"pipeline: stages is a list, one '- name: {{options}}' item per stage in the order they run, not {given}")
    stages = [_stage_spec(item, base) for item in listed]
    extra = {k: data[k] for k in ENGINE_KEYS if k in data}
    return build_config(Pipeline, {"input": inp, "output": out, "stages": stages, **extra}, "pipeline")


def load_pipeline(path: str | Path, paths: dict[str, str] | None = None) -> Pipeline:
    """Read a pipeline YAML file, or a preset by name (``mmcurate run datacomp_basic``).

    ``paths`` override the YAML's input and output paths (see :func:`parse_pipeline`).
    """
    path = Path(path)
    if not path.exists() and (PRESETS / f"{path}.yaml").exists():
        path = PRESETS / f"{path}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read pipeline {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text, so not a pipeline YAML") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_pipeline(data, path.parent, paths)


def _stage_spec(item: Any, base: Path | None) -> StageSpec:
    if isinstance(item, str):
        return StageSpec(item)
    if isinstance(item, dict) and len(item) == 1:
        name, params = next(iter(item.items()))
        if params is None or isinstance(params, dict):
            params = dict(params or {})
            return StageSpec(name, {k: _model_path(name, k, v, base) for k, v in params.items()} if base else params)
    raise UsageError(f"pipeline: a stage is a name or a mapping {{name: {{options}}}}, not {item!r}")


def _resolve(section: dict[str, Any], base: Path | None) -> dict[str, Any]:
    section = dict(section)
    path = str(section["path"])
    if base is not None and path.strip() and "://" not in path and not os.path.isabs(path):  # a blank path stays blank, to be refused
        section["path"] = str((base / path).resolve())
    return section


def _model_path(stage: str, option: str, value: Any, base: Path) -> Any:
    """``value`` of a :func:`~mmcurate.options.path_option` resolved against ``base`` where it is a
    relative path (``local-dir:PATH`` too) that exists there; any other value as it is."""
    if not isinstance(value, str) or stage not in STAGES:
        return value
    fields = {f.name: f for f in dataclasses.fields(stage_class(stage).Config)}
    if option not in fields or not is_path_option(fields[option]):
        return value
    prefix = "local-dir:" if value.startswith("local-dir:") else ""
    path = value.removeprefix(prefix)
    if not path or os.path.isabs(path) or not (base / path).exists():
        return value
    return prefix + str((base / path).resolve())


def apply_overrides(pipeline: Pipeline, settings: list[str]) -> Pipeline:
    """Apply ``--set`` overrides: ``input.KEY=V``, ``output.KEY=V``, ``engine=V``, ``STAGE.KEY=V`` (every
    stage of that name) or ``STAGE#K.KEY=V`` (the k-th of several, by its label)."""
    for item in settings:
        target, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set wants KEY=VALUE, not {item!r}")
        section, _, key = target.rpartition(".")
        if section == "" and key in ("input", "output"):
            raise UsageError(f"--set {item}: set the {key} path with --{key} PATH or --set {key}.path=PATH")
        if section == "" and key == "stages":
            raise UsageError(f"--set {item}: the stages are listed in the pipeline YAML; --set STAGE.KEY=VALUE sets a stage's option")
        if section in ("input", "output"):
            spec = getattr(pipeline, section)
            setattr(pipeline, section, build_config(type(spec), {**dataclasses.asdict(spec), key: value}, f"pipeline {section}"))
        elif section == "":
            pipeline = build_config(
                Pipeline, {**{f.name: getattr(pipeline, f.name) for f in dataclasses.fields(Pipeline)}, key: value}, "pipeline"
            )
        else:
            labels = stage_labels([s.name for s in pipeline.stages])
            matches = [s for s, label in zip(pipeline.stages, labels, strict=True) if section in (s.name, label)]
            if not matches:
                raise UsageError(f"--set {item}: the pipeline has no stage {section!r}")
            for spec in matches:
                spec.params[key] = _model_path(spec.name, key, value, Path.cwd())
    return pipeline
