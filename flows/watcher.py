"""The bridge self-hosted Prefect needs from "a manifest appeared in the bucket" to a render (webhooks are Cloud-only).

A bounded polling loop lists the input prefix; every manifest version (URL + ETag) not dispatched before is
dispatched exactly once, in one of two modes:

- ``event`` (default): one ``flashportrait.manifest.created`` event, resource id = the manifest URL, label
  ``flashportrait.manifest.etag`` = its ETag; the ``render-manifest`` deployment's trigger turns it into a run.
  Other automations (notifications, audits) can react to the same event.
- ``run``: ``run_deployment("render-manifest-version/render-manifest", idempotency_key=f"{url}@{etag}")``.

Why two modes: the run a deployment trigger creates carries an idempotency key Prefect derives from the automation
firing (automation id, action index, invocation id); Prefect 3.9.1 offers no way to template it. So in ``event`` mode
"one run per manifest version" rests on three layers: this watcher's ledger (a version is dispatched once, across
restarts), the event id ``uuid5(url@etag)`` (the server's trigger service drops an event id it has processed in the
last 30 minutes, so a re-sent event starts nothing), and the flow itself (a run for a version already rendered
renders nothing). ``run`` mode gets the hard guarantee from the API instead: one flow run per idempotency key per
deployment, however late a duplicate comes, but emits no event for anything else to react to.

The ledger is a small JSON object (default ``<prefix>/.flashportrait-watcher.json``), rewritten atomically after
every dispatch, so a watcher killed at any point re-dispatches at most the one version it was sending. Run one
watcher per prefix; two would each dispatch every version (harmless in ``run`` mode, deduplicated for 30 minutes in
``event`` mode).
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import NAMESPACE_URL, UUID, uuid5

from prefect.deployments import run_deployment
from prefect.events import Event
from prefect.events.clients import get_events_client
from prefect.utilities.asyncutils import run_coro_as_sync

from flashportrait.infra import storage

from .deployments import (
    ETAG_LABEL,
    MANIFEST_EVENT,
    RENDER_DEPLOYMENT,
    RENDER_FLOW,
    deployment_path,
    list_manifests,
    manifest_version,
    require_api,
)


logger = logging.getLogger(__name__)

STATE_NAME = ".flashportrait-watcher.json"
STATE_FORMAT = "flashportrait-watcher/1"
MODES = ("event", "run")


@dataclass(frozen=True)
class ManifestVersion:
    url: str
    etag: str

    @property
    def key(self) -> str:
        """``url@etag``: the idempotency key of the run for this version."""
        return f"{self.url}@{self.etag}"

    @property
    def event_id(self) -> UUID:
        """Deterministic, so re-sending the same version's event is recognised by the server as a duplicate."""
        return uuid5(NAMESPACE_URL, self.key)


def manifest_event(version: ManifestVersion) -> Event:
    """The ``flashportrait.manifest.created`` event for ``version`` (what the deployment trigger matches)."""
    return Event(
        id=version.event_id,
        event=MANIFEST_EVENT,
        resource={
            "prefect.resource.id": version.url,
            "prefect.resource.name": posixpath.basename(version.url),
            ETAG_LABEL: version.etag,
        },
        payload={"url": version.url, "etag": version.etag},
    )


class WatcherLedger:
    """Which version of each manifest URL was dispatched, kept in a JSON object on the store."""

    def __init__(self, url: str):
        self.url = url
        self.dispatched: dict[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        if not storage.exists(self.url):
            return {}
        try:
            data = json.loads(storage.read_bytes(self.url))
            if data.get("format") != STATE_FORMAT or not isinstance(data.get("dispatched"), dict):
                raise ValueError(f"format is {data.get('format')!r}, expected {STATE_FORMAT!r}")
        except (ValueError, AttributeError) as exc:
            raise ValueError(
                f"watcher state {self.url} is unreadable ({exc}); delete it to dispatch every manifest version "
                "under the prefix again (rendered manifests are skipped), or pass another --state URL"
            ) from exc
        return {str(url): str(etag) for url, etag in data["dispatched"].items()}

    def is_dispatched(self, version: ManifestVersion) -> bool:
        return self.dispatched.get(version.url) == version.etag

    def record(self, version: ManifestVersion) -> None:
        self.dispatched[version.url] = version.etag
        self._save()

    def keep_only(self, urls: set[str]) -> None:
        """Forget manifests that are gone, so the ledger does not grow without bound."""
        gone = set(self.dispatched) - urls
        if gone:
            for url in gone:
                del self.dispatched[url]
            self._save()

    def _save(self) -> None:
        state = {"format": STATE_FORMAT, "updated_at": datetime.now(UTC).isoformat(), "dispatched": self.dispatched}
        storage.write_bytes_atomic(self.url, json.dumps(state, indent=1, sort_keys=True).encode())


class ManifestWatcher:
    """Dispatch every new manifest version under ``input_prefix`` once (see the module docstring for the modes)."""

    def __init__(
        self,
        input_prefix: str,
        *,
        mode: str = "event",
        deployment: str = deployment_path(RENDER_FLOW, RENDER_DEPLOYMENT),
        state_url: str | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"watcher mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        require_api()
        self.input_prefix = input_prefix
        self.mode = mode
        self.deployment = deployment
        self.ledger = WatcherLedger(state_url or storage.join_url(input_prefix, STATE_NAME))

    def pending(self) -> list[ManifestVersion]:
        """The manifest versions under the prefix that were not dispatched yet, in name order."""
        urls = list_manifests(self.input_prefix)
        self.ledger.keep_only(set(urls))
        versions = []
        for url in urls:
            try:
                versions.append(ManifestVersion(url, manifest_version(url)))
            except FileNotFoundError:
                logger.info("%s disappeared while listing; skipping it", url)
        return [v for v in versions if not self.ledger.is_dispatched(v)]

    def poll(self) -> list[ManifestVersion]:
        """One listing; dispatch what is new; return what was dispatched (each recorded right after it went out)."""
        versions = self.pending()
        if versions:
            if self.mode == "event":
                run_coro_as_sync(self._emit(versions))
            else:
                for version in versions:
                    self._run(version)
        return versions

    async def _emit(self, versions: list[ManifestVersion]) -> None:
        # checkpoint_every=1: each emit waits for the server's pong, so a recorded version was received;
        # prefect.events.emit_event would queue it on a background thread and swallow a failure.
        async with get_events_client(reconnection_attempts=3, checkpoint_every=1) as client:
            for version in versions:
                await client.emit(manifest_event(version))
                self.ledger.record(version)
                logger.info("emitted %s for %s (ETag %s)", MANIFEST_EVENT, version.url, version.etag)

    def _run(self, version: ManifestVersion) -> None:
        flow_run = run_deployment(
            self.deployment,
            parameters={"manifest_url": version.url, "manifest_etag": version.etag},
            idempotency_key=version.key,
            timeout=0,  # create the run and return; a worker executes it
        )
        self.ledger.record(version)
        logger.info("flow run %s (%s) for %s", flow_run.name, flow_run.id, version.key)

    def watch(
        self,
        interval: float = 30.0,
        max_polls: int | None = None,
        stop: threading.Event | None = None,
        on_dispatch: Callable[[ManifestVersion], None] | None = None,
    ) -> int:
        """Poll every ``interval`` seconds until ``max_polls`` polls or ``stop`` is set; return how many versions
        were dispatched. The first poll's errors propagate (a wrong URL or server is configuration); later ones are
        logged and retried at the next interval (a store or API outage must not end a long-running watcher)."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        if max_polls is not None and max_polls < 1:
            raise ValueError(f"max polls must be ≥ 1 (or unset to run until stopped), got {max_polls}")
        stop = stop or threading.Event()
        polls = dispatched = 0
        while max_polls is None or polls < max_polls:
            try:
                versions = self.poll()
            except Exception as exc:
                if polls == 0:
                    raise
                logger.warning(
                    "poll of %s failed (%s: %s); retrying in %g s",
                    self.input_prefix,
                    type(exc).__name__,
                    exc,
                    interval,
                )
                versions = []
            polls += 1
            dispatched += len(versions)
            for version in versions:
                if on_dispatch is not None:
                    on_dispatch(version)
            if (max_polls is not None and polls >= max_polls) or stop.wait(interval):
                break
        return dispatched
