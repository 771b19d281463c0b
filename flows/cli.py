"""The ``flashportrait`` command: ``render`` one job, or ``batch`` a manifest through the Prefect flow; ``deploy`` /
``serve`` the production deployments and ``watch`` an S3 prefix for new manifests (see docs/self-hosted.md).

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
import threading
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from tqdm import tqdm

from flashportrait.infra import storage
from flashportrait.infra.preflight import check_credentials, check_run, instance_metadata_allowed
from flashportrait.infra.redact import redact
from flashportrait.model.training import STAGES as TRAIN_STAGES

from . import deployments
from . import render as render_module
from .manifest import Job
from .publishing import JobOutputs
from .settings import add_settings_options, settings_error_message, settings_from_args
from .watcher import MODES, STATE_NAME, ManifestVersion, ManifestWatcher


EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_STOPPED = 128 + signal.SIGTERM  # the shell convention for "terminated by SIGTERM"


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a Prefect cancellation or an orchestrator's stop) asks the run to stop at its next safe point: the
    in-flight encode or upload is aborted, the report still written, and the command exits 143."""
    render_module.request_stop(signum, frame)


def _common(parser: argparse.ArgumentParser, default_workers: int) -> None:
    """The run settings' options (generated from :class:`RenderSettings`) and the display switches."""
    add_settings_options(parser, defaults={"workers": default_workers})
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
    _add_deployment_commands(sub)
    _add_train_command(sub)
    return parser


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train a model preset from a recipe (the demo model: model/training/demo.toml)",
        description="Run a training recipe's stages in order (data, vae, dit, export, evaluate). Every stage "
        "resumes: finished clips and checkpoints are kept, so re-running the same command continues where it stopped.",
    )
    train.add_argument("config", help="training recipe (TOML), e.g. model/training/demo.toml")
    train.add_argument(
        "--stage",
        action="append",
        choices=TRAIN_STAGES,
        help="run only this stage (repeatable; default: all, in order)",
    )
    train.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="stop each training stage at step N (resume later with the same command)",
    )
    train.add_argument("--out", default=None, help="override the recipe's output folder")


def _deployment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-prefix", required=True, help="URL of the folder holding manifests (s3://bucket/in/)")
    parser.add_argument(
        "--output-root",
        required=True,
        help="URL under which each manifest renders to <root>/<manifest name>; must lie outside the input prefix",
    )
    add_settings_options(parser)
    parser.add_argument(
        "--cron",
        default=deployments.DEFAULT_CRON,
        help=f"bulk-render schedule, five cron fields (default: '{deployments.DEFAULT_CRON}')",
    )
    parser.add_argument(
        "--timezone",
        default=deployments.DEFAULT_TIMEZONE,
        help=f"IANA time zone of --cron, e.g. Europe/Berlin (default: {deployments.DEFAULT_TIMEZONE})",
    )
    names = "; give each input prefix its own names to run several from one Prefect server"
    parser.add_argument(
        "--bulk-name",
        default=deployments.BULK_DEPLOYMENT,
        help=f"name of the cron deployment (default: %(default)s{names})",
    )
    parser.add_argument(
        "--render-name",
        default=deployments.RENDER_DEPLOYMENT,
        help=f"name of the event-triggered deployment (default: %(default)s{names})",
    )


def _add_deployment_commands(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser(
        "deploy",
        help="register the bulk-render and render-manifest deployments with a Prefect server",
        description="Register bulk-render (cron) and render-manifest (event trigger) on $PREFECT_API_URL for the "
        "workers of a work pool (a missing pool is created as a process pool).",
    )
    _deployment_options(deploy)
    deploy.add_argument(
        "--pool", default=deployments.DEFAULT_WORK_POOL, help=f"work pool (default: {deployments.DEFAULT_WORK_POOL})"
    )
    deploy.add_argument(
        "--image", default=None, help="container image with flashportrait installed, for Kubernetes/Docker pools"
    )

    serve = sub.add_parser(
        "serve",
        help="register both deployments and run their flow runs from this process",
        description="Register bulk-render and render-manifest on $PREFECT_API_URL and execute their runs in "
        "subprocesses of this long-running process (no work pool or worker needed).",
    )
    _deployment_options(serve)
    serve.add_argument("--limit", type=int, default=None, help="most flow runs at once (default: no limit)")

    watch = sub.add_parser(
        "watch",
        help="dispatch one Prefect event (or run) per new manifest version under a prefix",
        description="Poll a prefix; for each manifest version (URL + ETag) not seen before, emit "
        f"{deployments.MANIFEST_EVENT} (mode event) or create a render-manifest run with idempotency key URL@ETag "
        "(mode run). Seen versions are kept in a state object, so a restart re-dispatches nothing.",
    )
    watch.add_argument("prefix", help="URL of the folder holding manifests (s3://bucket/manifests/)")
    watch.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default: 30)")
    watch.add_argument("--once", action="store_true", help="poll once and exit")
    watch.add_argument("--max-polls", type=int, default=None, help="exit after this many polls (default: never)")
    watch.add_argument("--mode", choices=MODES, default="event", help="dispatch by event or by run (default: event)")
    watch.add_argument(
        "--deployment",
        default=deployments.deployment_path(deployments.RENDER_FLOW, deployments.RENDER_DEPLOYMENT),
        help="deployment run in mode run (default: %(default)s)",
    )
    watch.add_argument("--state", default=None, help=f"state object URL (default: <prefix>/{STATE_NAME})")


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


def _run_render(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
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
    check_credentials([args.reference, args.driving, args.out])
    with render_module.open_backend(settings) as backend:
        try:
            result = render_module.render_job(job, JobOutputs(args.out, sidecar), backend, settings)
        except render_module.RunCancelled:
            raise
        except Exception as exc:  # the job failed (bad media, storage error): not a usage error
            print(f"flashportrait: render failed: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
            return EXIT_ROWS_FAILED
    if result.status == "skipped":
        print(f"skipped: {result.output} is already published with the same job hash (use --force to re-render)")
        return EXIT_OK
    print(f"rendered {result.frames} frames at {result.fps:g} fps in {result.seconds_total:.1f} s")
    print(f"video:   {result.output}")
    print(f"sidecar: {result.sidecar}")
    return EXIT_OK


def _run_batch(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    check_run([args.manifest], args.out)  # credentials and a writable output before anything starts (exit 2)
    if not storage.exists(args.manifest):
        raise ValueError(f"manifest {args.manifest} does not exist")
    settings.resource_limits()  # bad limit values and model sources are usage errors: exit 2 before anything starts
    settings.model_source()
    summary = render_module.render_manifest(manifest_url=args.manifest, output_prefix=args.out, settings=settings)
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


def _deployment_settings(args: argparse.Namespace) -> deployments.DeploymentSettings:
    try:
        return deployments.DeploymentSettings(
            input_prefix=args.input_prefix,
            output_root=args.output_root,
            render=settings_from_args(args),
            cron=args.cron,
            timezone=args.timezone,
            bulk_name=args.bulk_name,
            render_name=args.render_name,
        )
    except ValidationError as exc:  # one line per problem, without pydantic's links
        raise ValueError(settings_error_message(exc)) from None


def _run_deploy(args: argparse.Namespace) -> int:
    registered = deployments.deploy(_deployment_settings(args), work_pool=args.pool, image=args.image)
    for name, deployment_id in registered.items():
        print(f"registered {name} ({deployment_id}) for work pool {args.pool}")
    print(f"next: start a worker with `prefect worker start --pool {args.pool}`; run one by hand with")
    print(f"      prefect deployment run '{next(iter(registered))}'")
    return EXIT_OK


def _run_serve(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
    deployments.serve(_deployment_settings(args), limit=args.limit)
    return EXIT_OK


def _run_watch(args: argparse.Namespace) -> int:
    watcher = ManifestWatcher(args.prefix, mode=args.mode, deployment=args.deployment, state_url=args.state)
    verb = "emitted an event for" if args.mode == "event" else "started a run for"

    def report(version: ManifestVersion) -> None:
        print(f"{verb} {version.url} (ETag {version.etag})", flush=True)

    stop = threading.Event()
    stop_signals = (signal.SIGTERM, signal.SIGINT)  # finish the current poll, then exit
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in stop_signals}
    try:
        max_polls = 1 if args.once else args.max_polls
        count = watcher.watch(args.interval, max_polls=max_polls, stop=stop, on_dispatch=report)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"dispatched {count} new manifest version(s) from {args.prefix}")
    return EXIT_OK


def _run_train(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from flashportrait.model.training.recipe import load_config, run_stages

    logging.getLogger("flashportrait.model.training").setLevel(logging.INFO)
    config = load_config(args.config)
    if args.out:
        config = dataclasses.replace(config, out=args.out)
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1 (got {args.max_steps})")
    stages = tuple(s for s in TRAIN_STAGES if s in (args.stage or TRAIN_STAGES))
    summary = run_stages(config, stages, max_steps=args.max_steps)
    print(json.dumps(summary, indent=2))
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "render": _run_render,
    "batch": _run_batch,
    "deploy": _run_deploy,
    "serve": _run_serve,
    "watch": _run_watch,
    "train": _run_train,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not instance_metadata_allowed():
        # No credential lookup may reach the cloud metadata service unless the operator opted in
        # (FLASHPORTRAIT_ALLOW_INSTANCE_METADATA=1 on EC2/ECS/EKS).
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    logging.basicConfig(
        level=os.environ.get("FLASHPORTRAIT_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "preset", None) == "tiny" and not getattr(args, "flashportrait", None):
        print(
            "note: preset 'tiny' has random weights — it exercises the whole system but renders noise, not a portrait",
            file=sys.stderr,
        )
    render_module.progress_sink = _ProgressBars(enabled=not getattr(args, "quiet", True) and sys.stderr.isatty())
    if args.command in ("render", "batch"):  # serve installs Prefect's own handler, watch its own
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ConnectionError, TimeoutError) as exc:
        print(f"flashportrait: error: {redact(str(exc))}", file=sys.stderr)
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
