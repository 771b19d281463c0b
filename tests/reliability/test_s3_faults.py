"""S3 faults through a real loopback fault proxy in front of moto: bounded retries, bounded waits, nothing partial.

Every test talks to the proxy through ``AWS_ENDPOINT_URL`` (exactly as a flow subprocess or a Ray worker would)
and checks the store itself through a client that bypasses the proxy: no object at a failed key and no pending
multipart upload. Retry settings are tightened (3 attempts per request x 2 tries, 2 s read timeout) so a give-up
takes seconds; the arithmetic of the bounds is the same at the defaults (see ``S3Settings``).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from flashportrait.infra import storage
from flashportrait.infra.preflight import PreflightError, check_credentials, check_output_prefix, check_run

from .s3_fault_proxy import FaultProxy, Rule, s3_operation


MAX_ATTEMPTS = 3
OPERATION_ATTEMPTS = 2
BUDGET = MAX_ATTEMPTS * OPERATION_ATTEMPTS
READ_TIMEOUT_S = 2.0
# standard-mode backoff sleeps at most 1 + 2 s between 3 attempts; s3fs adds 0.1 s between its tries
BACKOFF_S = OPERATION_ATTEMPTS * (1 + 2) + 0.2
# publish_file copies in 8 MiB chunks, so this streams as two parts: 8 MiB sent mid-write, the rest at close
TWO_PARTS = (13 << 20) + 321
REPO = Path(__file__).resolve().parents[2]
PART_2 = r"(^|&)partNumber=2(&|$)"


@pytest.fixture
def proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault proxy every S3 client of this process (and its children) goes through, with tight retry bounds."""
    monkeypatch.setenv("FLASHPORTRAIT_S3_CONNECT_TIMEOUT_S", "2")
    monkeypatch.setenv("FLASHPORTRAIT_S3_READ_TIMEOUT_S", str(READ_TIMEOUT_S))
    monkeypatch.setenv("FLASHPORTRAIT_S3_MAX_ATTEMPTS", str(MAX_ATTEMPTS))
    monkeypatch.setenv("FLASHPORTRAIT_S3_OPERATION_ATTEMPTS", str(OPERATION_ATTEMPTS))
    with FaultProxy(s3_endpoint, seed=9) as running:
        for name, value in running.env().items():
            monkeypatch.setenv(name, value)
        yield running


@pytest.fixture
def direct(s3_endpoint: str) -> Any:
    """A client straight to moto (no proxy, no faults) for checking what the store really holds."""
    return boto3.client("s3", endpoint_url=s3_endpoint)


def keys(client: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def pending_uploads(client: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def payload(tmp_path: Path, size: int = TWO_PARTS) -> Path:
    path = tmp_path / "video.mp4"
    path.write_bytes(os.urandom(size))
    return path


def assert_nothing_partial(client: Any, bucket: str, key: str) -> None:
    gc.collect()  # a writer's __del__ must not commit anything either
    assert key not in keys(client, bucket)
    assert pending_uploads(client, bucket) == []


# ---- the proxy itself -----------------------------------------------------------------------------------------------


def test_operation_names_cover_the_requests_s3fs_sends() -> None:
    assert s3_operation("PUT", "/b/k", "partNumber=2&uploadId=x") == "UploadPart"
    assert s3_operation("POST", "/b/k", "uploads") == "CreateMultipartUpload"
    assert s3_operation("POST", "/b/k", "uploadId=x") == "CompleteMultipartUpload"
    assert s3_operation("DELETE", "/b/k", "uploadId=x") == "AbortMultipartUpload"
    assert s3_operation("GET", "/b", "list-type=2&prefix=a") == "ListObjectsV2"
    assert s3_operation("HEAD", "/b/k", "") == "HeadObject"


def test_schedules_replay_from_their_seed(s3_endpoint: str) -> None:
    def fired(seed: int) -> list[bool]:
        proxy = FaultProxy(s3_endpoint, [Rule(probability=0.5)], seed=seed)
        return [proxy._decide("GET", "/b/k", "") is not None for _ in range(40)]

    assert fired(1) == fired(1) != fired(2)
    every_third = FaultProxy(s3_endpoint, [Rule(every=3, skip=1, count=2)])
    fired_at = [n for n in range(1, 13) if every_third._decide("GET", "/b/k", "") is not None]
    assert fired_at == [4, 7]  # skip 1, then every 3rd match, at most twice


# ---- E6: 5xx bursts within the budget -------------------------------------------------------------------------------


def test_503_every_third_request_still_publishes_and_reads(proxy, direct, s3_bucket, tmp_path) -> None:
    source = payload(tmp_path)
    url = f"s3://{s3_bucket}/out/a.mp4"
    proxy.set_rules([Rule(every=3, status=503, code="SlowDown")])
    storage.publish_file(source, url, exclusive=True, metadata={"job": "a"})
    assert storage.download(url, tmp_path / "back.mp4").read_bytes() == source.read_bytes()
    assert storage.read_bytes(url) == source.read_bytes()
    assert proxy.injected() >= 3
    assert pending_uploads(direct, s3_bucket) == []


def test_a_503_burst_of_one_less_than_the_budget_on_one_part_is_absorbed(proxy, direct, s3_bucket, tmp_path) -> None:
    """botocore's attempts run out after 3, s3fs's second try of the operation absorbs the rest."""
    source = payload(tmp_path)
    url = f"s3://{s3_bucket}/out/b.mp4"
    proxy.set_rules([Rule(operation="UploadPart", query=PART_2, count=BUDGET - 1)])
    storage.publish_file(source, url, exclusive=True)
    assert direct.get_object(Bucket=s3_bucket, Key="out/b.mp4")["Body"].read() == source.read_bytes()
    assert proxy.injected("UploadPart") == BUDGET - 1


def test_complete_answered_500_after_it_succeeded_leaves_one_complete_object(proxy, direct, s3_bucket, tmp_path):
    """The response is lost, not the write: the retried complete must not turn into a failure or a second object."""
    source = payload(tmp_path)
    url = f"s3://{s3_bucket}/out/lost.mp4"
    lose = Rule(action="lose_response", operation="CompleteMultipartUpload", status=500, code="InternalError", count=1)
    proxy.set_rules([lose])
    storage.publish_file(source, url, exclusive=True)
    assert proxy.injected("CompleteMultipartUpload") == 1
    assert direct.get_object(Bucket=s3_bucket, Key="out/lost.mp4")["Body"].read() == source.read_bytes()
    assert pending_uploads(direct, s3_bucket) == []


# ---- E7: 5xx beyond the budget --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_503_on_every_part_of_one_key_fails_bounded_named_and_aborted(proxy, direct, s3_bucket, tmp_path) -> None:
    source = payload(tmp_path)
    bad, good = f"s3://{s3_bucket}/out/bad.mp4", f"s3://{s3_bucket}/out/good.mp4"
    # part 1 is on the server when part 2 starts failing, so only a real abort leaves nothing pending
    proxy.set_rules([Rule(operation="UploadPart", path=r"/out/bad\.mp4$", query=PART_2, code="SlowDown")])
    started = time.monotonic()
    with pytest.raises(OSError, match=rf"Cannot write {bad}: .*503 SlowDown; failed after {BUDGET} attempts") as info:
        storage.publish_file(source, bad, exclusive=True)
    elapsed = time.monotonic() - started
    assert not isinstance(info.value, FileExistsError)  # "already exists" would count as done: it must not
    assert proxy.injected("UploadPart") == BUDGET  # bounded: not s3fs's unbounded 50 attempts / 93 s
    assert elapsed < BACKOFF_S + 5, elapsed
    assert any("partNumber=1" in r.query and r.action == "pass" for r in proxy.requests("UploadPart"))
    assert len(proxy.requests("AbortMultipartUpload")) == 1
    assert_nothing_partial(direct, s3_bucket, "out/bad.mp4")
    storage.publish_file(source, good, exclusive=True)  # the store, and other keys, are fine
    assert keys(direct, s3_bucket) == ["out/good.mp4"]


def test_500_on_complete_beyond_the_budget_fails_and_aborts(proxy, direct, s3_bucket, tmp_path) -> None:
    url = f"s3://{s3_bucket}/out/c.mp4"
    proxy.set_rules([Rule(operation="CompleteMultipartUpload", status=500, code="InternalError")])
    with pytest.raises(OSError, match=rf"Cannot write {url}: .*S3 500 InternalError; failed after {MAX_ATTEMPTS}"):
        storage.publish_file(payload(tmp_path), url, exclusive=True)
    assert proxy.injected("CompleteMultipartUpload") == MAX_ATTEMPTS  # s3fs repeats only throttling answers
    assert_nothing_partial(direct, s3_bucket, "out/c.mp4")


def test_409_conflict_on_complete_names_the_url_and_the_code_publishing_handles(proxy, direct, s3_bucket, tmp_path):
    """S3 answers 409 when another conditional write to the key is in flight; flows.publishing waits and compares
    hashes when it sees "ConditionalRequestConflict" in the error, so the code must survive the renaming."""
    url = f"s3://{s3_bucket}/out/race.mp4"
    proxy.set_rules([Rule(operation="CompleteMultipartUpload", status=409, code="ConditionalRequestConflict")])
    with pytest.raises(OSError, match=rf"Cannot write {url}: .*S3 409 ConditionalRequestConflict") as info:
        storage.publish_file(payload(tmp_path), url, exclusive=True)
    assert not isinstance(info.value, FileExistsError)
    assert proxy.injected("CompleteMultipartUpload") == 1  # a conflict is an answer, not retried blindly
    assert_nothing_partial(direct, s3_bucket, "out/race.mp4")


# ---- E8: latency and stalled bodies ---------------------------------------------------------------------------------


def test_one_slow_response_is_retried_after_the_read_timeout(proxy, s3_bucket, direct) -> None:
    direct.put_object(Bucket=s3_bucket, Key="in/ref.png", Body=b"png" * 1000)
    proxy.set_rules([Rule(action="delay", operation="GetObject", delay_s=60, count=1)])
    started = time.monotonic()
    assert storage.read_bytes(f"s3://{s3_bucket}/in/ref.png") == b"png" * 1000
    assert READ_TIMEOUT_S <= time.monotonic() - started < READ_TIMEOUT_S + 5
    assert proxy.injected("GetObject") == 1


@pytest.mark.slow
def test_a_part_that_never_gets_an_answer_fails_within_the_timeout_budget(
    proxy, direct, s3_bucket, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("FLASHPORTRAIT_S3_MAX_ATTEMPTS", "2")  # 2 x 2 attempts of 2 s: the test stays short
    budget, backoff = 2 * OPERATION_ATTEMPTS, OPERATION_ATTEMPTS * 1 + 0.2
    url = f"s3://{s3_bucket}/out/slow.mp4"
    proxy.set_rules([Rule(action="delay", operation="UploadPart", delay_s=60)])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"Cannot write {url}: timed out \(Read timeout on endpoint URL"):
        storage.publish_file(payload(tmp_path), url, exclusive=True)
    elapsed = time.monotonic() - started
    assert proxy.injected("UploadPart") == budget
    assert elapsed < budget * READ_TIMEOUT_S + backoff + 5, elapsed  # ~10 s worst case, never the 60 s delay
    assert_nothing_partial(direct, s3_bucket, "out/slow.mp4")


@pytest.mark.slow
def test_a_body_that_stalls_mid_download_fails_within_the_read_timeout(proxy, direct, s3_bucket, tmp_path) -> None:
    direct.put_object(Bucket=s3_bucket, Key="in/drive.mp4", Body=b"v" * (1 << 20))
    url = f"s3://{s3_bucket}/in/drive.mp4"
    proxy.set_rules([Rule(action="stall_response", operation="GetObject", after_bytes=1000, delay_s=60)])
    dest = tmp_path / "scratch" / "drive.mp4"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"Cannot download {url}: timed out \(no data for 2 s"):
        storage.download(url, dest)
    elapsed = time.monotonic() - started
    assert proxy.injected("GetObject") == OPERATION_ATTEMPTS  # botocore never sees a body; s3fs re-reads once
    assert elapsed < OPERATION_ATTEMPTS * READ_TIMEOUT_S + 3, elapsed
    assert list(dest.parent.iterdir()) == []  # no partial download, no temp file


def test_a_truncated_body_is_read_again(proxy, direct, s3_bucket, tmp_path) -> None:
    body = os.urandom(3 << 20)
    direct.put_object(Bucket=s3_bucket, Key="in/drive.mp4", Body=body)
    proxy.set_rules([Rule(action="close_response", operation="GetObject", after_bytes=4096, count=1)])
    assert storage.download(f"s3://{s3_bucket}/in/drive.mp4", tmp_path / "d.mp4").read_bytes() == body
    assert proxy.injected("GetObject") == 1


# ---- E9: connection reset mid-upload --------------------------------------------------------------------------------


def test_a_reset_mid_part_is_retried(proxy, direct, s3_bucket, tmp_path) -> None:
    source = payload(tmp_path)
    proxy.set_rules([Rule(action="close_request", operation="UploadPart", after_bytes=1 << 20, count=1)])
    storage.publish_file(source, f"s3://{s3_bucket}/out/r.mp4", exclusive=True)
    assert direct.get_object(Bucket=s3_bucket, Key="out/r.mp4")["Body"].read() == source.read_bytes()
    assert proxy.injected("UploadPart") == 1


def test_resets_on_every_part_give_up_with_nothing_partial(proxy, direct, s3_bucket, tmp_path) -> None:
    url = f"s3://{s3_bucket}/out/reset.mp4"
    proxy.set_rules([Rule(action="close_request", operation="UploadPart", after_bytes=1 << 20)])
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"Cannot write {url}: connection failed or was reset"):
        storage.publish_file(payload(tmp_path), url, exclusive=True)
    # aiohttp itself re-sends an idempotent PUT once on a reset, so each counted attempt may be two requests
    assert BUDGET <= proxy.injected("UploadPart") <= 2 * BUDGET
    assert time.monotonic() - started < BACKOFF_S + 10
    assert_nothing_partial(direct, s3_bucket, "out/reset.mp4")


# ---- E3, E5: access denied, missing bucket --------------------------------------------------------------------------


def test_access_denied_on_one_input_names_that_url(proxy, direct, s3_bucket, tmp_path) -> None:
    for name in ("a.png", "b.png"):
        direct.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=b"img")
    denied = f"s3://{s3_bucket}/in/a.png"
    proxy.set_rules([Rule(operation="GetObject", path=r"/in/a\.png$", status=403, code="AccessDenied")])
    with pytest.raises(PermissionError, match=rf"Cannot read {denied}: Access Denied \(S3 403 AccessDenied"):
        storage.read_bytes(denied)
    # a denied HEAD (as S3 answers a HEAD without s3:GetObject) has no body, so only the status names it
    proxy.set_rules([Rule(operation="HeadObject", path=r"/in/a\.png$", status=403, code="AccessDenied")])
    with pytest.raises(PermissionError, match=rf"Cannot download {denied}: Forbidden \(S3 403;"):
        storage.download(denied, tmp_path / "a.png")
    assert storage.read_bytes(f"s3://{s3_bucket}/in/b.png") == b"img"
    assert proxy.injected() == 2  # 403 is final: never retried


def test_missing_input_bucket_names_the_bucket(proxy, tmp_path) -> None:
    url = "s3://no-such-bucket-fp/in/a.mp4"
    with pytest.raises(FileNotFoundError, match=rf"Cannot download {url}: .*NoSuchBucket"):
        storage.download(url, tmp_path / "never-written")
    with pytest.raises(FileNotFoundError, match=rf"Cannot read {url}: The specified bucket does not exist"):
        storage.read_bytes(url)


def test_a_child_process_goes_through_the_proxy_too(proxy, direct, s3_bucket) -> None:
    """What the flow subprocess and Ray workers get: the proxy's URL in AWS_ENDPOINT_URL, the faults included."""
    direct.put_object(Bucket=s3_bucket, Key="in/m.jsonl", Body=b'{"id": "a"}')
    proxy.set_rules([Rule(operation="GetObject", count=2)])
    code = (
        f"from flashportrait.infra import storage; print(storage.read_bytes('s3://{s3_bucket}/in/m.jsonl').decode())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **proxy.env()}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == '{"id": "a"}'
    assert proxy.injected("GetObject") == 2


# ---- settings -------------------------------------------------------------------------------------------------------


def test_settings_come_from_the_environment_and_reach_s3fs(proxy, monkeypatch) -> None:
    fs, _ = storage.filesystem_for("s3://bucket/key")
    assert fs.retries == OPERATION_ATTEMPTS
    assert fs.config_kwargs["retries"] == {"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"}
    assert fs.config_kwargs["read_timeout"] == READ_TIMEOUT_S
    monkeypatch.setenv("FLASHPORTRAIT_S3_READ_TIMEOUT_S", "7")
    changed, _ = storage.filesystem_for("s3://bucket/key")
    assert changed is not fs and changed.config_kwargs["read_timeout"] == 7.0  # fsspec's cache keys on the settings
    monkeypatch.setenv("FLASHPORTRAIT_S3_MAX_ATTEMPTS", "many")
    with pytest.raises(
        ValueError, match="FLASHPORTRAIT_S3_MAX_ATTEMPTS='many' is not a whole number between 1 and 20"
    ):
        storage.filesystem_for("s3://bucket/key")


def test_defaults_are_bounded() -> None:
    defaults = storage.S3Settings.from_env({})
    assert defaults == storage.S3Settings(
        connect_timeout_s=5.0, read_timeout_s=30.0, max_attempts=4, operation_attempts=2
    )
    assert defaults.attempts_budget == 8


# ---- E1, E4: preflight ----------------------------------------------------------------------------------------------


def test_output_prefix_that_exists_passes_and_leaves_nothing(proxy, direct, s3_bucket) -> None:
    check_run([f"s3://{s3_bucket}/in/m.jsonl"], f"s3://{s3_bucket}/out/run1")
    ops = [s.operation for s in proxy.requests()]
    assert ops == ["ListObjectsV2", "CreateMultipartUpload", "AbortMultipartUpload"]
    assert keys(direct, s3_bucket) == [] and pending_uploads(direct, s3_bucket) == []


def test_missing_output_bucket_stops_the_run(proxy) -> None:
    with pytest.raises(PreflightError, match=r"output bucket 'no-such-out-bucket' does not exist \(NoSuchBucket\)"):
        check_output_prefix("s3://no-such-out-bucket/renders/x")


def test_output_prefix_denied_stops_the_run(proxy, s3_bucket) -> None:
    proxy.set_rules([Rule(operation="ListObjectsV2", status=403, code="AccessDenied")])
    with pytest.raises(PreflightError, match=rf"access to the output bucket '{s3_bucket}' is denied"):
        check_output_prefix(f"s3://{s3_bucket}/out")
    proxy.set_rules([Rule(operation="CreateMultipartUpload", status=403, code="AccessDenied")])
    with pytest.raises(PreflightError, match=rf"cannot write to the output bucket '{s3_bucket}'.*s3:PutObject"):
        check_output_prefix(f"s3://{s3_bucket}/out")


def test_unreachable_endpoint_stops_the_run_within_the_budget(s3_endpoint, monkeypatch) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("FLASHPORTRAIT_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("FLASHPORTRAIT_S3_OPERATION_ATTEMPTS", "1")
    started = time.monotonic()
    with pytest.raises(PreflightError, match=rf"cannot reach the output bucket 'b-x'.*127\.0\.0\.1:{port}"):
        check_output_prefix("s3://b-x/out")
    assert time.monotonic() - started < 10


def test_local_output_folder_is_created_or_refused(tmp_path) -> None:
    check_output_prefix(str(tmp_path / "new" / "out"))
    assert (tmp_path / "new" / "out").is_dir() and list((tmp_path / "new" / "out").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match=r"cannot write to the output folder .*/file/out"):
        check_output_prefix(str(tmp_path / "file" / "out"))


def test_credentials_from_env_or_shared_file(monkeypatch, tmp_path) -> None:
    assert check_credentials(["/local/only.jsonl"]) is None  # nothing on S3: nothing to check
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-example")
    assert check_credentials(["s3://b/m.jsonl"]) == "env"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    shared = tmp_path / "credentials"
    shared.write_text("[default]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = secret-example\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    assert check_credentials(["s3://b/m.jsonl"]) == "shared-credentials-file"
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(PreflightError, match="AWS profile 'nobody' .*not in the shared config"):
        check_credentials(["s3://b/m.jsonl"])
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    with pytest.raises(PreflightError, match="AWS credentials for s3://b/m.jsonl are unusable: Partial credentials"):
        check_credentials(["s3://b/m.jsonl"])


PROBE = """
import json, sys
calls = []
sys.addaudithook(lambda event, args: calls.append(repr(args[1])) if event == "socket.connect" else None)
from flashportrait.infra.preflight import PreflightError, check_credentials, check_output_prefix
errors = []
for check in (lambda: check_credentials(["s3://in-bucket/m.jsonl"]), lambda: check_output_prefix("s3://out/x")):
    try:
        check()
        errors.append(None)
    except PreflightError as error:
        errors.append(str(error))
print(json.dumps({"errors": errors, "connects": calls}))
"""


class MetadataListener:
    """A stand-in for 169.254.169.254 on loopback: counts connections, answers nothing."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def run_without_credentials(tmp_path: Path, metadata_port: int, **extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLASHPORTRAIT_"))}
    env.update(
        HOME=str(tmp_path),  # no ~/.aws of whoever runs the tests
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_CONFIG_FILE="/dev/null",
        # both metadata endpoints point at the listener, so any attempt to use them is seen
        AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://127.0.0.1:{metadata_port}/",
        AWS_CONTAINER_CREDENTIALS_FULL_URI=f"http://127.0.0.1:{metadata_port}/creds",
        AWS_METADATA_SERVICE_TIMEOUT="1",
        AWS_METADATA_SERVICE_NUM_ATTEMPTS="1",
        **extra,
    )
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_missing_credentials_stop_the_run_without_asking_the_metadata_service(tmp_path) -> None:
    listener = MetadataListener()
    try:
        result = run_without_credentials(tmp_path, listener.port)
        assert listener.connections == 0
        assert result["connects"] == []  # not the metadata service, not S3, nothing
        for error in result["errors"]:
            assert error.startswith("no AWS credentials found (environment, shared credentials file, profile)")
            assert "AWS_ACCESS_KEY_ID" in error and "FLASHPORTRAIT_ALLOW_INSTANCE_METADATA=1" in error
        assert "s3://in-bucket/m.jsonl" in result["errors"][0] and "s3://out/x" in result["errors"][1]

        # The control: with the opt-in the same probe does reach the listener, so the zero above means something.
        opted_in = run_without_credentials(tmp_path, listener.port, FLASHPORTRAIT_ALLOW_INSTANCE_METADATA="1")
        assert listener.connections >= 1 and opted_in["connects"]
        assert all(opted_in["errors"])  # still no credentials there, only now it asked
    finally:
        listener.close()
