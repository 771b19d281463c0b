"""The ``flashportrait`` command: ``render`` one job, or ``batch`` a manifest through the Prefect flow.

Exit codes: 0 every row rendered or already published, 1 some rows failed or were left unfinished (see the
report), 2 unusable arguments or inputs that stop the whole run (unreadable manifest, unknown preset, unreachable
Ray cluster), 143 stopped by SIGTERM (in-flight uploads aborted, report written).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from tqdm import tqdm

from flashportrait.infra import storage
from flashportrait.model.expression import available_extractors
from flashportrait.model.presets import PRESETS

from . import render as render_module
from .manifest import Job
from .publishing import JobOutputs


EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_STOPPED = 128 + signal.SIGTERM  # the shell convention for "terminated by SIGTERM"


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM (a Prefect cancellation or an orchestrator's stop) into an exception in the main thread, so the
    in-flight upload is aborted by its context manager and the report is still written."""
    raise render_module.RunCancelled(f"received signal {signum}")


def _common(parser: argparse.ArgumentParser, default_workers: int) -> None:
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="model preset (default: tiny — random weights, renders noise; see README)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers,
        help=f"Ray worker actors that share each video's windows; 0 = run in this process without "
        f"Ray (default: {default_workers})",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="connect to a running Ray cluster (host:port or 'auto'; default: $RAY_ADDRESS, else "
        "start a local cluster)",
    )
    parser.add_argument(
        "--extractor",
        default="pixel",
        choices=available_extractors(),
        help="expression feature extractor (default: pixel)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: the preset's; a manifest row's 'steps' wins)",
    )
    parser.add_argument("--crf", type=int, default=18, help="H.264 constant rate factor, 0–51 (default: 18)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-render and replace outputs already published (default: skip rows published with the same job hash)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashportrait",
        description="Render identity-preserving portrait animations (reference portrait + driving video → MP4).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    one = sub.add_parser("render", help="render one job", description="Render one reference + driving video pair.")
    one.add_argument("--reference", required=True, help="reference portrait image URL (path, file://, s3://, …)")
    one.add_argument("--driving", required=True, help="driving video URL")
    one.add_argument("--out", required=True, help="output MP4 URL; the JSON sidecar is written beside it")
    one.add_argument("--id", default="render", help="job id recorded in the sidecar (default: render)")
    one.add_argument("--prompt", default="", help="text prompt (default: empty)")
    one.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    one.add_argument("--width", type=int, default=None, help="output width, multiple of 16 (default: preset's)")
    one.add_argument("--height", type=int, default=None, help="output height, multiple of 16 (default: preset's)")
    one.add_argument("--fps", type=float, default=None, help="output fps (default: the driving video's)")
    _common(one, default_workers=0)

    many = sub.add_parser(
        "batch",
        help="render a manifest through the Prefect flow",
        description="Render every row of a JSONL/CSV/Parquet manifest; write <out>/<id>.mp4, "
        "<out>/<id>.json and <out>/report.{parquet,html}.",
    )
    many.add_argument("manifest", help="manifest URL (.jsonl, .csv or .parquet)")
    many.add_argument("--out", required=True, help="output prefix URL")
    _common(many, default_workers=2)
    return parser


class _ProgressBars:
    """One tqdm bar per job, fed by the renderer's progress sink."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, job_id: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(job_id)
        if bar is None:
            bar = self.bars[job_id] = tqdm(total=total, desc=f"{job_id}", unit="step", leave=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()


def _settings(args: argparse.Namespace) -> render_module.RenderSettings:
    if args.workers < 0:
        raise ValueError(f"--workers must be ≥ 0, got {args.workers}")
    if not 0 <= args.crf <= 51:
        raise ValueError(f"--crf must be between 0 and 51, got {args.crf}")
    return render_module.RenderSettings(
        preset=args.preset,
        extractor=args.extractor,
        workers=args.workers,
        ray_address=args.ray_address,
        steps=args.steps,
        crf=args.crf,
    )


def _run_render(args: argparse.Namespace) -> int:
    settings = _settings(args)
    job = Job(
        id=args.id,
        reference=args.reference,
        driving=args.driving,
        prompt=args.prompt,
        seed=args.seed,
        steps=args.steps,
        width=args.width,
        height=args.height,
        fps=args.fps,
        line=1,
    )
    sidecar = args.out[: -len(".mp4")] + ".json" if args.out.endswith(".mp4") else args.out + ".json"
    with render_module.open_backend(settings) as backend:
        try:
            result = render_module.render_job(job, JobOutputs(args.out, sidecar), backend, settings)
        except Exception as exc:  # the job failed (bad media, storage error): not a usage error
            print(f"flashportrait: render failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_ROWS_FAILED
    if result.status == "skipped":
        print(f"skipped: {result.output} is already published with the same job hash (use --force to re-render)")
        return EXIT_OK
    print(f"rendered {result.frames} frames at {result.fps:g} fps in {result.seconds_total:.1f} s")
    print(f"video:   {result.output}")
    print(f"sidecar: {result.sidecar}")
    return EXIT_OK


def _run_batch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not storage.exists(args.manifest):
        raise ValueError(f"manifest {args.manifest} does not exist")
    summary = render_module.render_manifest(
        manifest_url=args.manifest,
        output_prefix=args.out,
        preset=settings.preset,
        workers=settings.workers,
        ray_address=settings.ray_address,
        extractor=settings.extractor,
        steps=settings.steps,
        force=settings.force,
    )
    total = len(summary.results)
    print(
        f"{summary.done} rendered, {summary.skipped} skipped, {summary.failed} failed, {summary.unfinished} "
        f"unfinished, {summary.cancelled} cancelled of {total} row(s) from {summary.manifest}"
    )
    for row in summary.results:
        where = row["output"] if row["status"] in ("done", "skipped") and not row["reason"] else row["reason"]
        print(f"  [{row['status']:>10}] {row['id'] or '(line ' + str(row['line']) + ')'}: {where}")
    print(f"report:  {summary.report_html}")
    print(f"         {summary.report_parquet}")
    ok = summary.failed == 0 and summary.complete
    return EXIT_OK if ok else EXIT_ROWS_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("FLASHPORTRAIT_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.preset == "tiny":
        print(
            "note: preset 'tiny' has random weights — it exercises the whole system but renders noise, not a portrait",
            file=sys.stderr,
        )
    render_module.progress_sink = _ProgressBars(enabled=not args.quiet and sys.stderr.isatty())
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return _run_render(args) if args.command == "render" else _run_batch(args)
    except (ValueError, FileNotFoundError, ConnectionError, TimeoutError) as exc:
        print(f"flashportrait: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (render_module.RunCancelled, KeyboardInterrupt):
        print(
            "flashportrait: stopped; in-flight uploads were aborted and the report lists the cancelled rows",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    finally:
        render_module.progress_sink = None


if __name__ == "__main__":
    sys.exit(main())
