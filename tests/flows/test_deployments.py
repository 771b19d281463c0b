"""Deployments, triggers and the watcher against a real Prefect API and moto's S3.

The API is the session harness (a temporary Prefect server subprocess; it runs the event, trigger and action
services, so a deployment trigger fires as on `prefect server start`, but not the scheduler, so no cron run starts
by the clock). Runs are executed the two ways users run them: `flashportrait deploy` + a `prefect worker` of a
process pool, and `flashportrait serve`. Every run renders in-process (workers=0) with one denoising step and the
pixel extractor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)
from prefect.deployments import run_deployment
from prefect.events.clients import get_events_client
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync
from released_files import flashportrait_folder, official_transformer, original_layout_base

from flashportrait.flows import deployments as dep
from flashportrait.flows.cli import main
from flashportrait.flows.render import render_manifest
from flashportrait.flows.settings import RenderSettings
from flashportrait.flows.watcher import ManifestVersion, ManifestWatcher, WatcherLedger, manifest_event
from flashportrait.infra import storage


ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
FAST = {"workers": 0, "steps": 1, "extractor": "pixel"}  # in-process, one step, the coarse extractor meant for tests
WAIT_S = 240  # one run here: ~10 s of process start and imports, a few s of rendering; generous for a shared CPU


# Without a server ------------------------------------------------------------------------------------------------
def test_only_manifests_are_listed(tmp_path):
    for name in ("a.jsonl", "b.CSV", "c.parquet", "d.ndjson", "notes.txt", "_manifest.json", ".hidden.jsonl"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.jsonl").write_text("{}\n")
    names = [Path(url).name for url in dep.list_manifests(str(tmp_path))]
    assert names == ["a.jsonl", "b.CSV", "c.parquet", "d.ndjson", "e.jsonl"]


def test_settings_refuse_bad_schedules_and_overlapping_prefixes():
    good = {"input_prefix": "s3://b/manifests/", "output_root": "s3://b/out"}
    with pytest.raises(ValueError, match="timezone='Mars/Olympus' is invalid.*IANA"):
        dep.DeploymentSettings(**good, timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="cron='0 2 \\* \\*' timezone='UTC' is invalid.*five cron fields"):
        dep.DeploymentSettings(**good, cron="0 2 * *")
    with pytest.raises(ValueError, match="lies inside the input prefix"):
        dep.DeploymentSettings(input_prefix="s3://b/in", output_root="s3://b/in/out")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        dep.DeploymentSettings(**good, render={"preset": "huge"})
    with pytest.raises(ValueError, match="workers"):
        dep.DeploymentSettings(**good, render={"workers": -1})


def test_deployments_carry_cron_timezone_trigger_and_parameters():
    settings = dep.DeploymentSettings(
        input_prefix="s3://b/manifests",
        output_root="s3://b/out",
        render=RenderSettings(workers=4, ray_address="head:6379", steps=8, alp="balanced", force=True),
        cron="30 1 * * 1-5",
        timezone="Europe/Berlin",
    )
    bulk, on_event = dep.build_deployments(settings)
    assert (bulk.flow_name, bulk.name) == ("bulk-render", "bulk-render")
    assert bulk.entrypoint == "flashportrait.flows.deployments.bulk_render"  # module path: nothing to pull
    (schedule,) = bulk.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 1 * * 1-5", "Europe/Berlin")
    assert bulk.parameters == {
        "input_prefix": "s3://b/manifests",
        "output_root": "s3://b/out",
        # Only what differs from the defaults (the rest follows the worker's environment); force is per run.
        "settings": {"alp": "balanced", "workers": 4, "ray_address": "head:6379", "steps": 8},
    }
    assert (on_event.flow_name, on_event.name) == ("render-manifest-version", "render-manifest")
    assert not on_event.schedules and "input_prefix" not in on_event.parameters
    (trigger,) = on_event.triggers
    assert trigger.expect == {"flashportrait.manifest.created"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "s3://b/manifests/*"}  # the prefix, slash added
    assert trigger.parameters == {
        "manifest_url": "{{ event.resource['prefect.resource.id'] }}",
        "manifest_etag": "{{ event.resource['flashportrait.manifest.etag'] }}",
    }


def test_event_names_the_manifest_version_and_its_id_is_stable():
    version = ManifestVersion("s3://b/manifests/a.jsonl", "0123abcd")
    event = manifest_event(version)
    assert event.event == "flashportrait.manifest.created"
    assert event.resource.id == "s3://b/manifests/a.jsonl"
    assert event.resource["flashportrait.manifest.etag"] == "0123abcd"
    assert event.id == manifest_event(ManifestVersion(version.url, version.etag)).id  # re-sent → same id
    assert event.id != manifest_event(ManifestVersion(version.url, "ffff")).id  # new version → new id
    assert version.key == "s3://b/manifests/a.jsonl@0123abcd"


def test_ledger_survives_a_restart_and_names_a_corrupt_state(tmp_path):
    url = str(tmp_path / "state.json")
    ledger = WatcherLedger(url)
    ledger.record(ManifestVersion("s3://b/m/a.jsonl", "e1"))
    ledger.record(ManifestVersion("s3://b/m/b.jsonl", "e2"))
    reloaded = WatcherLedger(url)
    assert reloaded.is_dispatched(ManifestVersion("s3://b/m/a.jsonl", "e1"))
    assert not reloaded.is_dispatched(ManifestVersion("s3://b/m/a.jsonl", "e1-new"))  # a new version is new
    reloaded.keep_only({"s3://b/m/b.jsonl"})  # a.jsonl was deleted
    assert WatcherLedger(url).dispatched == {"s3://b/m/b.jsonl": "e2"}
    Path(url).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"watcher state {re.escape(url)} is unreadable.*delete it"):
        WatcherLedger(url)


def test_cli_refuses_bad_settings_and_a_missing_server(capsys):
    prefixes = ["--input-prefix", "s3://b/in/", "--output-root", "s3://b/out"]
    assert main(["deploy", *prefixes, "--timezone", "Mars/Olympus"]) == 2
    assert "timezone='Mars/Olympus' is invalid" in capsys.readouterr().err
    assert main(["serve", "--input-prefix", "s3://b/in/", "--output-root", "s3://b/in/out"]) == 2
    assert "lies inside the input prefix" in capsys.readouterr().err
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["watch", "s3://b/in/", "--once"]) == 2
    assert "PREFECT_API_URL is not set; start a server (`prefect server start`)" in capsys.readouterr().err


# A real API, S3 and workers ---------------------------------------------------------------------------------------
def upload_manifest(bucket: str, key: str, *job_ids: str) -> str:
    """A manifest of rows that render the 17-frame sample clip (16 output frames) from absolute S3 URLs."""
    rows = [
        {
            "id": job_id,
            "reference": f"s3://{bucket}/in/reference.png",
            "driving": f"s3://{bucket}/in/driving_short.mp4",
            "seed": 3,
        }
        for job_id in job_ids
    ]
    if key.endswith(".csv"):
        body = "id,reference,driving,seed\n" + "".join(",".join(map(str, row.values())) + "\n" for row in rows)
    else:
        body = "".join(json.dumps(row) + "\n" for row in rows)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body.encode())
    return f"s3://{bucket}/{key}"


def keys(bucket: str, prefix: str) -> set[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for item in listing.get("Contents", [])}


def wait_until(what: str, probe: Callable[[], Any], timeout_s: float, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")


def flow_runs(deployment_id) -> list:

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def finished_runs(deployment_id, count: int, log: Path) -> list:
    """Wait until ``count`` runs of the deployment exist and all are in a final state; return them."""

    def probe() -> list | None:
        runs = flow_runs(deployment_id)
        return runs if len(runs) >= count and all(r.state and r.state.is_final() for r in runs) else None

    return wait_until(f"{count} finished run(s) of deployment {deployment_id}", probe, WAIT_S, log)


def read_deployment(name: str):

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def deployment_automations(deployment_id) -> list:

    with get_client(sync_client=True) as client:
        return client.read_resource_related_automations(f"prefect.deployment.{deployment_id}")


def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def stop(process: subprocess.Popen) -> None:
    """SIGINT, as Ctrl-C would (a process worker ignored SIGTERM for ~10 s in pipeline.md §2.5), then kill."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def local_manifest(folder: Path, name: str, body: str) -> str:
    """A manifest beside copies of the samples (local inputs must live in the manifest's folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for sample in ("reference.png", "driving_short.mp4"):
        if not (folder / sample).exists():
            (folder / sample).write_bytes((EXAMPLES / sample).read_bytes())
    (folder / name).write_text(body)
    return str(folder / name)


ROW = '{"id": "clip", "reference": "reference.png", "driving": "driving_short.mp4", "seed": 5}\n'


@pytest.mark.slow
def test_one_manifest_version_renders_once_and_a_replaced_one_not_at_all(prefect_harness, tmp_path):
    url = local_manifest(tmp_path / "in", "m.jsonl", ROW)
    out = tmp_path / "out"
    stale = dep.render_manifest_version(url, str(out), manifest_etag="stale-etag", settings=RenderSettings(**FAST))
    assert stale.status == "superseded" and "stale-etag →" in stale.reason and not out.exists()
    # An event without the ETag label templates "": the current version renders.
    first = dep.render_manifest_version(url, str(out), manifest_etag="", settings=RenderSettings(**FAST))
    assert (first.status, first.done, first.output_prefix) == ("rendered", 1, str(out / "m"))
    assert (out / "m" / "clip.mp4").exists()
    again = dep.render_manifest_version(
        url, str(out), manifest_etag=dep.manifest_version(url), settings=RenderSettings(**FAST)
    )
    assert again.status == "already-rendered" and again.done == 0


@pytest.mark.slow
def test_bulk_render_isolates_bad_and_colliding_manifests(prefect_harness, tmp_path):
    inputs = tmp_path / "in"
    local_manifest(inputs, "ok.jsonl", ROW)
    local_manifest(inputs, "twin.jsonl", ROW)
    local_manifest(inputs / "x", "twin.csv", "id,reference,driving\nclip,reference.png,driving_short.mp4\n")
    local_manifest(inputs, "empty.jsonl", "")
    summary = dep.bulk_render(str(inputs), str(tmp_path / "out"), RenderSettings(**FAST))
    status = {Path(o.manifest).relative_to(inputs).as_posix(): o.status for o in summary.manifests}
    assert status == {"empty.jsonl": "failed", "ok.jsonl": "rendered", "twin.jsonl": "failed", "x/twin.csv": "failed"}
    reasons = {Path(o.manifest).name: o.reason for o in summary.manifests}
    assert "empty.jsonl" in reasons["empty.jsonl"]  # the error names the manifest
    assert "shares the output prefix" in reasons["twin.csv"] and "rename one of them" in reasons["twin.jsonl"]
    assert (tmp_path / "out" / "ok" / "clip.mp4").exists() and not (tmp_path / "out" / "twin").exists()
    with pytest.raises(ValueError, match="lies inside the input prefix"):
        dep.bulk_render(str(inputs), str(inputs / "out"), RenderSettings(workers=0))


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    name = f"fp-deploy-{os.getpid()}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=name)
    for sample in ("reference.png", "driving_short.mp4"):
        s3.upload_file(str(EXAMPLES / sample), name, f"in/{sample}")
    return name


@pytest.fixture(scope="module")
def child_env(prefect_harness, s3_endpoint: str, tmp_path_factory) -> dict[str, str]:
    """What every subprocess gets: the harness API, moto's endpoint (already in os.environ), Ray's auth mode, and a
    private PREFECT_HOME; 1-second polling so a run starts within a second of being created."""

    return {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "RAY_AUTH_MODE": "disabled",
        "FLASHPORTRAIT_LOG_LEVEL": "INFO",
    }


@pytest.fixture(scope="module")
def deployed(bucket: str, child_env: dict[str, str], tmp_path_factory) -> Iterator[dict[str, Any]]:
    """`flashportrait deploy` to a process pool, and `prefect worker start` on it, as docs/self-hosted.md says."""
    pool = f"fp-pool-{os.getpid()}"
    settings = dep.DeploymentSettings(
        input_prefix=f"s3://{bucket}/manifests/",
        output_root=f"s3://{bucket}/out",
        render=RenderSettings(**FAST),
        cron="0 3 * * *",
        timezone="Europe/Berlin",
    )
    registered = dep.deploy(settings, work_pool=pool)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"], log, child_env)
    try:
        yield {"pool": pool, "ids": registered, "log": log, "settings": settings}
    finally:
        stop(worker)


@pytest.mark.slow
def test_deploy_registers_schedule_trigger_and_pool(deployed, bucket):
    bulk = read_deployment("bulk-render/bulk-render")
    render = read_deployment("render-manifest-version/render-manifest")
    assert {bulk.id, render.id} == set(deployed["ids"].values())
    assert bulk.work_pool_name == render.work_pool_name == deployed["pool"]
    (schedule,) = bulk.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "Europe/Berlin")
    assert (
        bulk.parameters["input_prefix"] == f"s3://{bucket}/manifests/" and bulk.parameters["settings"]["workers"] == 0
    )
    (automation,) = deployment_automations(render.id)
    assert automation.trigger.expect == {"flashportrait.manifest.created"}
    assert automation.trigger.match.model_dump() == {"prefect.resource.id": f"s3://{bucket}/manifests/*"}


@pytest.mark.slow
def test_manifest_event_starts_exactly_one_run_and_the_same_event_again_none(deployed, bucket):
    render = read_deployment("render-manifest-version/render-manifest")
    a_url = upload_manifest(bucket, "manifests/a.jsonl", "alpha")
    watcher = ManifestWatcher(f"s3://{bucket}/manifests/")
    (a,) = watcher.poll()
    assert (a.url, a.etag) == (a_url, dep.manifest_version(a_url))

    (run,) = finished_runs(render.id, 1, deployed["log"])
    assert run.state.is_completed(), run.state
    assert run.parameters["manifest_url"] == a_url and run.parameters["manifest_etag"] == a.etag
    assert {"out/a/alpha.mp4", "out/a/alpha.json", "out/a/_manifest.json"} <= keys(bucket, "out/a/")
    marker = json.loads(storage.read_bytes(f"s3://{bucket}/out/a/_manifest.json"))
    assert marker["fingerprint"] == f"etag:{a.etag}" and marker["counts"]["done"] == 1

    # The same event again: the watcher does not send it (in process, nor after a restart from its state object),
    # and the identical event sent anyway (same id) starts no run.
    assert watcher.poll() == []
    assert ManifestWatcher(f"s3://{bucket}/manifests/").poll() == []

    async def resend() -> None:
        async with get_events_client(checkpoint_every=1) as client:
            await client.emit(manifest_event(a))

    run_coro_as_sync(resend())
    # Barrier: a later event (a new manifest) is processed after the duplicate; once its run exists, the duplicate
    # has had its chance to start one.
    b_url = upload_manifest(bucket, "manifests/b.jsonl", "beta")
    assert [v.url for v in watcher.poll()] == [b_url]
    runs = finished_runs(render.id, 2, deployed["log"])
    assert sorted(r.parameters["manifest_url"] for r in runs) == [a_url, b_url]
    assert all(r.state.is_completed() for r in runs)


@pytest.mark.slow
def test_scheduled_bulk_run_renders_only_new_manifests(deployed, bucket):
    old = upload_manifest(bucket, "bulk/old.jsonl", "one")
    summary = render_manifest(old, f"s3://{bucket}/bulk-out/old", RenderSettings(**FAST))  # rendered before, by hand
    assert summary.done == 1
    old_marker = boto3.client("s3").head_object(Bucket=bucket, Key="bulk-out/old/_manifest.json")["ETag"]
    new = upload_manifest(bucket, "bulk/nested/new.csv", "two")  # a CSV manifest, one folder down

    # One run of the cron deployment, started through the API rather than by the clock.
    run = run_deployment(
        "bulk-render/bulk-render",
        parameters={"input_prefix": f"s3://{bucket}/bulk/", "output_root": f"s3://{bucket}/bulk-out"},
        timeout=WAIT_S,
        poll_interval=1,
    )
    assert run.state.is_completed(), f"{run.state}\n{deployed['log'].read_text()[-4000:]}"
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
        )
    assert [child.parameters["manifest_url"] for child in children] == [new]  # no render-manifest run for old
    assert boto3.client("s3").head_object(Bucket=bucket, Key="bulk-out/old/_manifest.json")["ETag"] == old_marker
    assert {"bulk-out/new/two.mp4", "bulk-out/new/_manifest.json"} <= keys(bucket, "bulk-out/new/")


@pytest.mark.slow
def test_a_deployment_run_renders_the_released_model(deployed, bucket, tmp_path):
    """The released model's settings (--base/--flashportrait/--dtype) travel as a deployment run's parameters and
    the worker renders with them: tiny files in the official layouts stand in for the 14B ones."""
    official = official_transformer()
    base = original_layout_base(tmp_path / "Wan2.1-I2V-14B-720P", official)
    files = flashportrait_folder(tmp_path / "FlashPortrait", official)
    row = {
        "id": "released",
        "reference": f"s3://{bucket}/in/reference.png",
        "driving": f"s3://{bucket}/in/driving_short.mp4",
    }
    boto3.client("s3").put_object(
        Bucket=bucket, Key="released/m.jsonl", Body=(json.dumps({**row, "width": 64, "height": 64}) + "\n").encode()
    )
    settings = RenderSettings(
        base=str(base), flashportrait=str(files), dtype="float32", workers=0, steps=1, extractor="landmark"
    )
    run = run_deployment(
        "render-manifest-version/render-manifest",
        parameters={
            "manifest_url": f"s3://{bucket}/released/m.jsonl",
            "output_root": f"s3://{bucket}/released-out",
            "settings": settings.deployment_parameters(),
        },
        timeout=WAIT_S,
        poll_interval=1,
    )
    assert run.state.is_completed(), f"{run.state}\n{deployed['log'].read_text()[-4000:]}"
    sidecar = json.loads(storage.read_bytes(f"s3://{bucket}/released-out/m/released.json"))
    assert sidecar["model"]["base"] == str(base) and sidecar["model"]["dtype"] == "float32"
    assert sidecar["model_preset"] == "flashportrait-14b" and len(sidecar["weights_sha256"]["transformer.pt"]) == 64


@pytest.fixture(scope="module")
def served(bucket: str, child_env: dict[str, str], tmp_path_factory) -> Iterator[dict[str, Any]]:
    """`flashportrait serve` for another prefix, under other deployment names, beside the worker-run pair."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [str(BIN / "flashportrait"), "serve", "--input-prefix", f"s3://{bucket}/served/"]
    command += ["--output-root", f"s3://{bucket}/served-out", "--workers", "0", "--steps", "1", "--extractor", "pixel"]
    command += ["--timezone", "America/New_York", "--bulk-name", "bulk-served", "--render-name", "render-served"]
    process = start(command, log, child_env)

    def registered() -> Any:
        if process.poll() is not None:
            raise AssertionError(f"flashportrait serve exited with {process.returncode}\n{log.read_text()[-4000:]}")
        render = read_deployment("render-manifest-version/render-served")
        return render if render is not None and deployment_automations(render.id) else None

    try:
        yield {"render": wait_until("served deployments", registered, 120, log), "log": log}
    finally:
        stop(process)


@pytest.mark.slow
def test_serve_registers_both_and_run_mode_makes_one_run_per_manifest_version(served, bucket):
    bulk = read_deployment("bulk-render/bulk-served")
    (schedule,) = bulk.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "America/New_York")
    assert bulk.work_pool_name is None  # served: the serve process itself executes the runs

    # Two watchers with separate state objects both dispatch the same version in run mode: the idempotency key
    # URL@ETag makes the API hand the first run to the second, so one manifest version is one run.
    url = upload_manifest(bucket, "served/gamma.jsonl", "gamma")
    for state in ("state-1.json", "state-2.json"):
        watcher = ManifestWatcher(
            f"s3://{bucket}/served/",
            mode="run",
            deployment="render-manifest-version/render-served",
            state_url=f"s3://{bucket}/watch/{state}",
        )
        assert [v.url for v in watcher.poll()] == [url]
    (run,) = finished_runs(served["render"].id, 1, served["log"])
    assert run.state.is_completed(), run.state
    assert run.idempotency_key == f"{url}@{dep.manifest_version(url)}"
    assert "served-out/gamma/gamma.mp4" in keys(bucket, "served-out/gamma/")


@pytest.mark.slow
def test_prefect_yaml_registers_the_same_deployments(child_env, bucket, tmp_path):
    """`prefect deploy --all` of infra/deploy/prefect.yaml, from a directory outside the repository. (Last in this
    module: it re-registers bulk-render/bulk-render and render-manifest, which the worker tests above use.)"""

    dep.ensure_work_pool("render-pool")
    env = {
        **child_env,
        "FLASHPORTRAIT_INPUT_PREFIX": f"s3://{bucket}/yaml-in/",
        "FLASHPORTRAIT_OUTPUT_ROOT": f"s3://{bucket}/yaml-out",
    }
    command = [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file"]
    proc = subprocess.run(
        [*command, str(ROOT / "infra/deploy/prefect.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    bulk = read_deployment("bulk-render/bulk-render")
    render = read_deployment("render-manifest-version/render-manifest")
    expected_bulk, expected_render = dep.build_deployments(
        dep.DeploymentSettings(input_prefix=f"s3://{bucket}/yaml-in/", output_root=f"s3://{bucket}/yaml-out")
    )
    for registered, expected in ((bulk, expected_bulk), (render, expected_render)):
        assert registered.entrypoint == expected.entrypoint and not registered.pull_steps
        assert registered.parameters == expected.parameters  # the file and the code register the same defaults
    (schedule,) = bulk.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    (automation,) = deployment_automations(render.id)
    assert automation.trigger.match.model_dump() == {"prefect.resource.id": f"s3://{bucket}/yaml-in/*"}
    (action,) = automation.actions
    assert action.parameters == expected_render.triggers[0].parameters
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("render-pool").type == "process"


@pytest.mark.slow
def test_kubernetes_files_are_accepted_and_agree_on_ray_auth(prefect_harness):
    """Not a cluster test: the server validates the pool's template (every placeholder declared), and every Ray
    process (head, GPU workers, flow-run pods) reads the same auth mode and token."""

    k8s = ROOT / "infra/deploy/k8s"
    template = json.loads((k8s / "work-pool-base-job-template.json").read_text())
    name = f"render-k8s-{os.getpid()}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=name, type="kubernetes", base_job_template=template))
        assert client.read_work_pool(name).base_job_template == template
    cluster = yaml.safe_load((k8s / "raycluster.yaml").read_text())
    containers = [cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [group["template"]["spec"]["containers"][0] for group in cluster["spec"]["workerGroupSpecs"]]
    job = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    for container in [*containers, job]:
        env = {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "ray-auth", "key": "token"}}
    assert containers[1]["resources"]["limits"]["nvidia.com/gpu"] == 1
    zombie = AutomationCore.model_validate(
        yaml.safe_load((ROOT / "infra/deploy/zombie-runs-automation.yaml").read_text())
    )
    assert zombie.trigger.within.total_seconds() >= 3 * 180  # above 3 × the default heartbeat frequency


@pytest.mark.slow
def test_cli_watch_once_dispatches_each_version_once(prefect_harness, bucket, capsys):

    url = upload_manifest(bucket, "cli/epsilon.jsonl", "epsilon")  # no deployment watches cli/: no run starts
    assert main(["watch", f"s3://{bucket}/cli/", "--once"]) == 0
    out = capsys.readouterr().out
    assert f"emitted an event for {url} (ETag {dep.manifest_version(url)})" in out and "dispatched 1 " in out
    assert main(["watch", f"s3://{bucket}/cli", "--max-polls", "2", "--interval", "0.1"]) == 0
    assert "dispatched 0 " in capsys.readouterr().out
    state = json.loads(storage.read_bytes(f"s3://{bucket}/cli/.flashportrait-watcher.json"))
    assert state["dispatched"] == {url: dep.manifest_version(url)}
