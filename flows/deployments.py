"""Production entry points: the ``bulk-render`` cron deployment, the event-triggered ``render-manifest`` deployment,
and what ``flashportrait deploy`` / ``flashportrait serve`` register with a self-hosted Prefect server.

Two ways a manifest gets rendered, one rule for where its outputs go:

- ``bulk-render`` (flow ``bulk-render``, a timezone-aware cron schedule) lists every manifest under an input prefix
  and renders each one not rendered yet;
- ``render-manifest`` (flow ``render-manifest-version``) starts when a ``flashportrait.manifest.created`` event
  names a manifest URL and its ETag (emitted by ``flows.watcher``: Prefect's webhooks are Cloud-only).

Both land a manifest at ``manifest_output_prefix(output_root, url)`` and skip it when ``is_manifest_rendered`` says
its current version is finished there, so either path skips what the other already did. The event path needs a
flow of its own, not a bare ``render-manifest`` deployment, because a trigger can only template strings into
parameters: deriving the output prefix, checking the manifest still has the announced ETag and the skip are Python,
and they must be the same Python bulk-render runs.

Credentials are never parameters (parameters are stored in the Prefect database and shown in the UI): S3 and Ray
settings come from the environment of the worker or ``serve`` process (``AWS_*``, ``RAY_ADDRESS``, ``RAY_AUTH_MODE``).
"""

from __future__ import annotations

import logging
import posixpath
from collections import defaultdict
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, tags
from prefect import serve as prefect_serve
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run as current_flow_run
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL
from prefect.types.entrypoint import EntrypointType
from prefect.workers.process import ProcessWorker
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flashportrait.infra import storage
from flashportrait.infra.redact import redact
from flashportrait.infra.tables import SUPPORTED_MANIFEST_FORMATS

from .render import is_manifest_rendered, manifest_output_prefix, render_manifest
from .settings import RenderSettings


logger = logging.getLogger(__name__)

MANIFEST_EVENT = "flashportrait.manifest.created"
ETAG_LABEL = "flashportrait.manifest.etag"  # resource label of the event: the manifest version it announces
BULK_FLOW, BULK_DEPLOYMENT = "bulk-render", "bulk-render"
RENDER_FLOW, RENDER_DEPLOYMENT = "render-manifest-version", "render-manifest"
DEFAULT_WORK_POOL = "render-pool"
DEFAULT_CRON, DEFAULT_TIMEZONE = "0 2 * * *", "UTC"
RUN_TAG = "flashportrait"  # on every run of both deployments; infra/deploy/zombie-runs-automation.yaml selects by it


def deployment_path(flow_name: str, deployment_name: str) -> str:
    """The ``<flow>/<deployment>`` name ``prefect deployment run`` and ``run_deployment`` take."""
    return f"{flow_name}/{deployment_name}"


# Manifests ------------------------------------------------------------------------------------------------------
def is_manifest_url(url: str) -> bool:
    """A manifest by extension; names starting with ``.`` or ``_`` are markers and temp files, never manifests."""
    name = posixpath.basename(url.rstrip("/"))
    return name.lower().endswith(SUPPORTED_MANIFEST_FORMATS) and not name.startswith((".", "_"))


def list_manifests(input_prefix: str) -> list[str]:
    """Every manifest below ``input_prefix`` (recursively), sorted, as full URLs."""
    return [url for url in storage.list_prefix(input_prefix) if is_manifest_url(url)]


def manifest_version(url: str) -> str:
    """The manifest's version: its ETag on object stores (``size:…:mtime:…`` elsewhere), as ``fingerprint`` sees it."""
    return storage.fingerprint(url).removeprefix("etag:")


def _normalise_prefix(url: str) -> str:
    return url.rstrip("/") + "/"


# One manifest ---------------------------------------------------------------------------------------------------
class ManifestOutcome(BaseModel):
    """What happened to one manifest: ``rendered`` (every row done/skipped/failed), ``incomplete`` (rows left for a
    re-run), ``already-rendered``, ``superseded`` (replaced since the event announced it) or ``failed``."""

    manifest: str
    output_prefix: str
    status: str
    reason: str = ""
    done: int = 0
    skipped: int = 0
    failed: int = 0
    report_html: str = ""


def render_manifest_if_new(
    manifest_url: str, output_root: str, settings: RenderSettings, expected_version: str | None = None
) -> ManifestOutcome:
    """Render ``manifest_url`` under ``output_root`` unless its current version is already rendered there.

    With ``expected_version`` (the ETag an event announced) a manifest replaced since is not rendered here: the
    newer version has an event (and a run) of its own, so rendering it twice at once would only waste GPUs.
    """
    log = get_run_logger()
    output_prefix = manifest_output_prefix(output_root, manifest_url)
    current = manifest_version(manifest_url)
    if expected_version is not None and current != expected_version:
        reason = f"the manifest was replaced since (ETag {expected_version} → {current}); its own event renders it"
        log.warning("%s: %s", manifest_url, reason)
        return ManifestOutcome(manifest=manifest_url, output_prefix=output_prefix, status="superseded", reason=reason)
    if not settings.force and is_manifest_rendered(manifest_url, output_prefix):
        log.info("%s (version %s) is already rendered at %s", manifest_url, current, output_prefix)
        return ManifestOutcome(
            manifest=manifest_url,
            output_prefix=output_prefix,
            status="already-rendered",
            reason=f"version {current} finished at {output_prefix}",
        )
    with tags(RUN_TAG):  # the subflow run carries the tag too, so the zombie-run automation watches it
        summary = render_manifest(manifest_url=manifest_url, output_prefix=output_prefix, settings=settings)
    return ManifestOutcome(
        manifest=manifest_url,
        output_prefix=output_prefix,
        status="rendered" if summary.complete else "incomplete",
        reason="" if summary.complete else f"{summary.unfinished + summary.cancelled} row(s) left for a re-run",
        done=summary.done,
        skipped=summary.skipped,
        failed=summary.failed,
        report_html=summary.report_html,
    )


def _version_run_name() -> str:
    """``<manifest file>@<etag>`` in the UI, so a run names the manifest version it was started for."""
    parameters = current_flow_run.parameters
    name = posixpath.basename(str(parameters.get("manifest_url", "")).rstrip("/"))
    etag = parameters.get("manifest_etag")
    return f"{name}@{str(etag)[:16]}" if etag else name


@flow(name=RENDER_FLOW, flow_run_name=_version_run_name)
def render_manifest_version(
    manifest_url: str,
    output_root: str,
    manifest_etag: str | None = None,
    settings: RenderSettings | None = None,
) -> ManifestOutcome:
    """Render one manifest (the version ``manifest_etag``, when given) to ``<output_root>/<manifest name>``.

    The flow behind the event-triggered ``render-manifest`` deployment; run it by hand with just ``manifest_url``.
    ``settings`` unset = the defaults with the worker's ``FLASHPORTRAIT_*`` environment.
    """
    settings = settings or RenderSettings()
    # An event without the ETag label templates an empty string: render whatever version is there now.
    outcome = render_manifest_if_new(manifest_url, output_root, settings, expected_version=manifest_etag or None)
    get_run_logger().info("%s: %s %s", manifest_url, outcome.status, outcome.reason)
    return outcome


# Many manifests -------------------------------------------------------------------------------------------------
class BulkRenderSummary(BaseModel):
    input_prefix: str
    output_root: str
    manifests: list[ManifestOutcome]

    def count(self, status: str) -> int:
        return sum(outcome.status == status for outcome in self.manifests)


def check_prefixes(input_prefix: str, output_root: str) -> None:
    """Outputs inside the input prefix would be listed as manifests (``report.parquet``) on the next run."""
    if _normalise_prefix(output_root).startswith(_normalise_prefix(input_prefix)):
        raise ValueError(
            f"output root {output_root} lies inside the input prefix {input_prefix}, so its reports would be "
            "read back as manifests; choose an output root outside the input prefix"
        )


def _colliding_names(manifests: list[str], output_root: str) -> dict[str, list[str]]:
    """Manifests that would share one output prefix (``a.jsonl`` and ``x/a.csv`` both map to ``<root>/a``)."""
    by_prefix: dict[str, list[str]] = defaultdict(list)
    for url in manifests:
        by_prefix[manifest_output_prefix(output_root, url)].append(url)
    return {prefix: urls for prefix, urls in by_prefix.items() if len(urls) > 1}


@flow(name=BULK_FLOW)
def bulk_render(
    input_prefix: str,
    output_root: str,
    settings: RenderSettings | None = None,
) -> BulkRenderSummary:
    """Render every manifest under ``input_prefix`` that is not rendered yet, each to ``<output_root>/<name>``.

    One ``render-manifest`` subflow per manifest, in name order; a manifest that fails (unreadable, cluster gone)
    is reported and the others still render; the next scheduled run picks up whatever is left.
    """
    log = get_run_logger()
    check_prefixes(input_prefix, output_root)
    settings = settings or RenderSettings()
    manifests = list_manifests(input_prefix)
    if not manifests:
        log.warning("no manifests (%s) under %s", ", ".join(SUPPORTED_MANIFEST_FORMATS), input_prefix)
    collisions = _colliding_names(manifests, output_root)
    outcomes: list[ManifestOutcome] = []
    for url in manifests:
        prefix = manifest_output_prefix(output_root, url)
        if prefix in collisions:
            others = ", ".join(u for u in collisions[prefix] if u != url)
            reason = f"shares the output prefix {prefix} with {others}; rename one of them"
            outcomes.append(ManifestOutcome(manifest=url, output_prefix=prefix, status="failed", reason=reason))
            continue
        try:
            outcomes.append(render_manifest_if_new(url, output_root, settings))
        except Exception as exc:  # one bad manifest never sinks the others; the next run retries it
            reason = redact(f"{type(exc).__name__}: {exc}")
            log.error("manifest %s failed: %s", url, reason)
            outcomes.append(ManifestOutcome(manifest=url, output_prefix=prefix, status="failed", reason=reason))
    summary = BulkRenderSummary(input_prefix=input_prefix, output_root=output_root, manifests=outcomes)
    if outcomes:
        create_table_artifact(
            key="bulk-render-manifests",
            table=[
                o.model_dump(include={"manifest", "status", "reason", "done", "skipped", "failed"}) for o in outcomes
            ],
            description=f"bulk-render of {input_prefix} → {output_root}",
        )
    statuses = sorted({o.status for o in outcomes})
    log.info("%d manifest(s): %s", len(outcomes), ", ".join(f"{summary.count(s)} {s}" for s in statuses) or "none")
    return summary


# Deployments ----------------------------------------------------------------------------------------------------
class DeploymentSettings(BaseModel):
    """What ``flashportrait deploy`` / ``serve`` register: where manifests and outputs live, how to render them, and
    when the bulk render runs (a cron expression in an IANA time zone, so "02:00" stays 02:00 across DST)."""

    model_config = ConfigDict(frozen=True)

    input_prefix: str
    output_root: str
    render: RenderSettings = Field(default_factory=RenderSettings)
    cron: str = DEFAULT_CRON
    timezone: str = DEFAULT_TIMEZONE
    # One server can hold several pairs (one per input prefix, e.g. per environment) under different names.
    bulk_name: str = BULK_DEPLOYMENT
    render_name: str = RENDER_DEPLOYMENT

    @model_validator(mode="after")
    def _check(self) -> DeploymentSettings:
        check_prefixes(self.input_prefix, self.output_root)
        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(
                f"schedule cron={self.cron!r} timezone={self.timezone!r} is invalid ({problem}); "
                "use five cron fields, e.g. '0 2 * * *', and an IANA zone such as Europe/Berlin"
            ) from None
        return self

    def parameters(self) -> dict[str, Any]:
        """Deployment default parameters shared by both deployments: the settings set away from their defaults
        (``force`` stays a per-run choice; unset ones follow the worker's ``FLASHPORTRAIT_*`` environment)."""
        return {"output_root": self.output_root, "settings": self.render.deployment_parameters()}


def manifest_trigger(input_prefix: str) -> DeploymentEventTrigger:
    """Start a run per ``flashportrait.manifest.created`` event for a manifest below ``input_prefix``; the event's
    resource id (the manifest URL) and ETag label become the run's ``manifest_url`` / ``manifest_etag``."""
    return DeploymentEventTrigger(
        name="render new manifests",
        expect={MANIFEST_EVENT},
        match={"prefect.resource.id": f"{_normalise_prefix(input_prefix)}*"},
        parameters={
            "manifest_url": "{{ event.resource['prefect.resource.id'] }}",
            "manifest_etag": "{{ event.resource['" + ETAG_LABEL + "'] }}",
        },
    )


def build_deployments(settings: DeploymentSettings) -> list[RunnerDeployment]:
    """Both deployments, with module-path entrypoints: a worker imports them from the installed package, so there is
    no flow code to pull."""
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": [RUN_TAG]}
    bulk = bulk_render.to_deployment(
        name=settings.bulk_name,
        schedules=[Cron(settings.cron, timezone=settings.timezone)],
        parameters={"input_prefix": settings.input_prefix, **settings.parameters()},
        description=f"Render every new manifest under {settings.input_prefix} ({settings.cron}, {settings.timezone})",
        **common,
    )
    on_event = render_manifest_version.to_deployment(
        name=settings.render_name,
        triggers=[manifest_trigger(settings.input_prefix)],
        parameters=settings.parameters(),
        description=f"Render a manifest when {MANIFEST_EVENT} names one under {settings.input_prefix}",
        **common,
    )
    return [bulk, on_event]


def require_api() -> str:
    """The configured Prefect API URL, checked reachable: deployments, triggers and events need a real server."""
    url = PREFECT_API_URL.value()
    if not url:
        raise ValueError(
            "PREFECT_API_URL is not set; start a server (`prefect server start`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise ConnectionError(
            f"the Prefect API at {url} is not reachable ({error}); is `prefect server start` running?"
        )
    return url


def ensure_work_pool(name: str) -> None:
    """Create ``name`` as a ``process`` pool if it does not exist (other types are created with ``prefect work-pool
    create``, see docs/self-hosted.md, because their job templates are site-specific)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
    logger.info("created the process work pool %r; start a worker with: prefect worker start --pool %s", name, name)


def deploy(
    settings: DeploymentSettings, work_pool: str = DEFAULT_WORK_POOL, image: str | None = None
) -> dict[str, UUID]:
    """Register both deployments (and the trigger's automation) on the server; a worker of ``work_pool`` runs them.

    ``image`` is for container pools (Kubernetes, Docker): an image with flashportrait installed.
    """
    require_api()
    ensure_work_pool(work_pool)
    registered: dict[str, UUID] = {}
    for deployment in build_deployments(settings):
        deployment_id = deployment.apply(work_pool_name=work_pool, image=image)
        registered[deployment_path(deployment.flow_name, deployment.name)] = deployment_id
        logger.info("registered deployment %s/%s (%s)", deployment.flow_name, deployment.name, deployment_id)
    return registered


def serve(settings: DeploymentSettings, limit: int | None = None) -> None:
    """Register both deployments and run their flow runs from this process (no work pool, no worker) until stopped.

    ``limit`` caps concurrent runs. Stopping pauses the cron schedule until the next ``serve``.
    """
    require_api()
    prefect_serve(*build_deployments(settings), limit=limit)
