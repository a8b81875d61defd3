"""The ``mmcurate`` command. Exit codes: 0 the run finished (rejections are results), 1 the run
itself failed, 2 a usage error (one clear line, no traceback)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence

from mmcurate import __version__
from mmcurate.errors import UsageError


def _add_io(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--input", required=required, help="input file, folder, glob or URL (fsspec)")
    p.add_argument("--output", required=required, help="output folder (fsspec)")
    p.add_argument("--input-format", help="parquet, csv, tsv, jsonl, txt, img2dataset or mmcurate (default: detected)")
    p.add_argument("--url-col", help="URL column of a URL list (default: url)")
    p.add_argument("--caption-col", help="caption column of a URL list (default: caption)")
    p.add_argument("--output-format", help="webdataset or parquet (default: webdataset when the rows carry images, else parquet)")
    p.add_argument("--rows-per-shard", type=int)
    p.add_argument("--workers", type=int, help="local worker processes (default: CPU count)")
    p.add_argument("--engine", choices=("local", "ray", "spark"))
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="override an option (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="fetch again only the failed downloads of the finished run in the output folder and merge them in",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcurate", description="Curate web image-text pairs into clean training shards.")
    parser.add_argument("--version", action="version", version=f"mmcurate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline YAML (or a preset name from pipelines/)")
    run.add_argument("pipeline")
    _add_io(run, required=False)

    stage = sub.add_parser("stage", help="run one stage alone")
    stage.add_argument("name")
    _add_io(stage, required=True)

    submit = sub.add_parser("submit", help="submit a pipeline to a Ray cluster as a Ray job (Ray Jobs API)")
    submit.add_argument("pipeline")
    submit.add_argument("--address", help="Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    submit.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQ",
        help="pip requirement Ray installs for the job, e.g. 'mmcurate[ray]' (repeatable)",
    )
    submit.add_argument(
        "--python",
        default="python",
        help="the job's interpreter on the head, one with mmcurate (default: python on the head's PATH, or the --pip environment)",
    )
    submit.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job and its workers (repeatable)"
    )
    submit.add_argument(
        "--working-dir", metavar="DIR", help="a folder uploaded with the job (your own stages' modules); the pipeline is added to it"
    )
    submit.add_argument("--job-id", help="submission id (default: generated); one that exists on the cluster is refused")
    submit.add_argument("--wait", action="store_true", help="print the job's logs as they come until it ends; exit 1 unless it succeeded")
    _add_io(submit, required=False)

    jobs = sub.add_parser("jobs", help="status, logs or stop of a submitted Ray job")
    jobs.add_argument("action", choices=("status", "logs", "stop"))
    jobs.add_argument("job_id")
    jobs.add_argument("--address", help="Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="logs: print them as they come until the job ends")

    for name, text in (
        ("inspect", "schema, rows, samples and null counts of a dataset"),
        ("validate", "check every shard against the schema"),
        ("stats", "rows kept and rejected by stage and reason"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("path")
        if name == "inspect":
            p.add_argument("--samples", type=int, default=3)
        if name == "stats":
            p.add_argument("--json", action="store_true", help="print JSON")
            p.add_argument("--plot", metavar="PNG", help="also draw the filter funnel to this PNG")

    report = sub.add_parser("report", help="a self-contained HTML page of an output (funnel, histograms, samples) and its figures as JSON")
    report.add_argument("path", metavar="OUT")
    report.add_argument("-o", "--output", default="report.html", help="the page (default: report.html); X.html puts its figures in X.json")
    report.add_argument("--samples", type=int, default=24, help="samples shown in the grid (default 24)")
    report.add_argument("--seed", type=int, default=0, help="seed of the stratified sample")

    diff = sub.add_parser("diff", help="compare two outputs: exit 0 when they agree, 1 when they differ")
    diff.add_argument("a", metavar="A")
    diff.add_argument("b", metavar="B")
    diff.add_argument("--tolerance", type=float, default=1e-6, help="relative tolerance of float values (default 1e-6)")

    stages = sub.add_parser("stages", help="list the stages with their options (--markdown: the docs/stages.md reference)")
    stages.add_argument("--markdown", action="store_true")

    schema = sub.add_parser("schema", help="print the declared sample schema")
    schema.add_argument("--markdown", action="store_true")

    export = sub.add_parser("export", help="write an mmcurate output in the format a grounded model trains on")
    export.add_argument("format", metavar="FORMAT", help="kosmos2, qwen-vl, qwen2-vl, cogvlm, florence2, grit or llava")
    export.add_argument("source", metavar="OUT", help="an mmcurate output folder")
    export.add_argument("dest", metavar="DEST", help="a new or empty folder")
    export.add_argument("--min-boxes", type=int, help="skip rows with fewer boxes (default: 1; llava: 0)")
    export.add_argument("--instructions", metavar="FILE", help="instructions, one per line (default: LLaVA's brief ones)")
    export.add_argument("--seed", type=int, default=0, help="seed of the per-key instruction draw")

    demo = sub.add_parser("demo", help="run the demo pipeline on the sample images shipped with mmcurate")
    demo.add_argument("output", nargs="?", default="mmcurate-demo")
    demo.add_argument("--no-progress", action="store_true")
    return parser


def _pipeline_from_args(args: argparse.Namespace):
    from mmcurate.pipelines.config import StageSpec, apply_overrides, load_pipeline, parse_pipeline

    if args.command in ("run", "submit"):
        pipeline = load_pipeline(args.pipeline, {"input": args.input, "output": args.output})
    else:
        pipeline = parse_pipeline({"input": {"path": args.input}, "output": {"path": args.output}, "stages": []})
        pipeline.stages = [StageSpec(args.name)]
    settings = [_stage_setting(args.name, s) for s in args.settings] if args.command == "stage" else list(args.settings)
    for flag, key in (
        ("input", "input.path"),
        ("input_format", "input.format"),
        ("url_col", "input.url_col"),
        ("caption_col", "input.caption_col"),
        ("output", "output.path"),
        ("output_format", "output.format"),
        ("rows_per_shard", "output.rows_per_shard"),
        ("workers", "workers"),
        ("engine", "engine"),
    ):
        value = getattr(args, flag)
        if value is not None:
            settings.insert(0, f"{key}={value}")
    return apply_overrides(pipeline, settings)


def _stage_setting(stage: str, item: str) -> str:
    """A ``--set`` of ``mmcurate stage NAME``: a bare ``key=value`` sets the stage's option of that name, or
    the pipeline's (``workers``, ``engine``, ...) where the stage has none."""
    import dataclasses

    from mmcurate.pipelines.config import PIPELINE_KEYS
    from mmcurate.pipelines.registry import stage_class

    key = item.partition("=")[0]
    if "." in key or (key in PIPELINE_KEYS and key not in {f.name for f in dataclasses.fields(stage_class(stage).Config)}):
        return item
    return f"{stage}.{item}"


def _print_summary(summary: dict, out: str) -> None:
    from mmcurate.tooling.summary import summary_lines

    print("\n".join(summary_lines(summary, out)))


def _export_options(args: argparse.Namespace):
    from mmcurate.exports import ExportOptions

    if args.min_boxes is not None and args.min_boxes < 0:
        raise UsageError(f"--min-boxes must not be negative, not {args.min_boxes}")
    if args.instructions is None:
        return ExportOptions(min_boxes=args.min_boxes, seed=args.seed)
    try:
        with open(args.instructions, encoding="utf-8") as f:
            instructions = tuple(line.strip() for line in f if line.strip())
    except OSError as e:
        raise UsageError(f"cannot read --instructions {args.instructions}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--instructions {args.instructions}: not UTF-8 text (one instruction per line)") from None
    return ExportOptions(min_boxes=args.min_boxes, instructions=instructions, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UsageError as e:
        print(f"mmcurate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmcurate: interrupted; run the same command again to resume", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 -- the run itself failed: show where
        traceback.print_exc()
        if args.command in ("run", "stage", "demo"):
            resumes = _resumable(getattr(args, "output_path", None) or getattr(args, "output", None))
            print("mmcurate: the run failed" + ("; finished shards are kept and a re-run resumes" if resumes else ""), file=sys.stderr)
        return 1


def _resumable(output: str | None) -> bool:
    """Whether ``output`` holds a started, unfinished run (which the same command resumes)."""
    if not output:
        return False
    from mmcurate.shards.layout import OutputDir

    try:
        out = OutputDir.open(output)
        return out.read_json(out.run_json).get("finished") is None
    except (OSError, ValueError, AttributeError):
        return False


def _check_destinations(args: argparse.Namespace) -> None:
    """Every path a command writes to (export DEST, report -o and the figures beside it, stats --plot) checked
    before any work: one that cannot be written is a usage error, and nothing is written."""
    from mmcurate.shards.storage import check_destination

    if args.command == "export":
        check_destination(args.dest, "DEST", folder=True)
    elif args.command == "report":
        from mmcurate.tooling.report import figures_path

        check_destination(args.output, "-o", folder=False)
        check_destination(figures_path(args.output), "the figures file of -o", folder=False)
    elif args.command == "stats" and args.plot:
        check_destination(args.plot, "--plot", folder=False)


def _dispatch(args: argparse.Namespace) -> int:
    _check_destinations(args)
    if args.command in ("run", "stage"):
        pipeline = _pipeline_from_args(args)
        args.output_path = pipeline.output.path
        if args.retry_failed:
            from mmcurate.engines.retry import retry_failed

            summary = retry_failed(pipeline)
        else:
            from mmcurate.engines import run_pipeline

            summary = run_pipeline(pipeline, progress=not args.no_progress)
        _print_summary(summary, pipeline.output.path)
        return 0
    if args.command in ("submit", "jobs"):
        from mmcurate.jobs.submit import command, refuse_ignored

        if args.command == "submit":
            refuse_ignored(args)
        return command(args, _pipeline_from_args(args) if args.command == "submit" else None)
    if args.command == "demo":
        from mmcurate.examples.demo import run_demo

        _print_summary(run_demo(args.output, progress=not args.no_progress), args.output)
        return 0
    if args.command == "export":
        from mmcurate.exports import export

        record = export(args.format, args.source, args.dest, _export_options(args))
        skipped = ", ".join(f"{reason} {n}" for reason, n in record["skipped"].items()) or "none"
        mean_iou = record["quantisation"]["mean_iou"]
        iou = f", mean IoU after quantisation {mean_iou:.4f}" if mean_iou is not None else ""
        print(f"{record['rows']} rows, {record['boxes']} boxes exported as {args.format} (skipped: {skipped}{iou}) -> {args.dest}")
        return 0
    if args.command == "stages":
        from mmcurate.pipelines.reference import markdown
        from mmcurate.pipelines.registry import STAGES

        if args.markdown:
            print(markdown(), end="")
        else:
            from mmcurate.pipelines.reference import stage_doc
            from mmcurate.pipelines.registry import stage_class

            for name in STAGES:
                doc = stage_doc(stage_class(name)).partition("\n")[0]
                print(f"{name:16} {doc}")
        return 0
    if args.command == "schema":
        from mmcurate import schemas

        print(
            schemas.markdown() if args.markdown else schemas.arrow_schema().to_string(show_schema_metadata=False),
            end="" if args.markdown else "\n",
        )
        return 0
    if args.command == "inspect":
        from mmcurate.tooling.inspect import inspect_dataset

        print(inspect_dataset(args.path, samples=args.samples))
        return 0
    if args.command == "validate":
        from mmcurate.tooling.validate import validate

        problems = validate(args.path)
        for p in problems:
            print(p)
        print(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}" if problems else "valid")
        return 1 if problems else 0
    if args.command == "report":
        from mmcurate.shards.layout import is_unfinished
        from mmcurate.tooling.report import Options, build_report, figures_path

        for flag in ("samples", "seed"):
            if getattr(args, flag) < 0:
                raise UsageError(f"--{flag} must not be negative, not {getattr(args, flag)}")
        figures = build_report(args.path, args.output, Options(samples=args.samples, seed=args.seed))
        shown = f"{figures['summary']['rows_in']} rows ({len(figures['samples'])} samples shown)"
        unfinished = " (an unfinished run)" if is_unfinished(figures["run"]) else ""
        print(f"report of {shown}{unfinished} -> {args.output}, figures -> {figures_path(args.output)}")
        return 0
    if args.command == "diff":
        from mmcurate.shards.diff import diff_outputs

        differences = diff_outputs(args.a, args.b, tolerance=args.tolerance)
        for line in differences:
            print(line)
        print(f"{args.a} and {args.b} differ" if differences else f"{args.a} and {args.b} agree")
        return 1 if differences else 0
    if args.command == "stats":
        from mmcurate.shards.layout import open_output
        from mmcurate.shards.summary import output_summary

        out = open_output(args.path)
        summary = output_summary(out)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            _print_summary(summary, args.path)
        if args.plot:
            from mmcurate.tooling.plots import plot_funnel, score_table

            plot_funnel(summary, args.plot, score_table(out))
            print(f"funnel drawn to {args.plot}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
