"""storage.py against a real S3 API (moto server) and the local disk: round trips and, above all, "nothing partial"."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from flashportrait.infra import storage


SIX_MIB_PLUS = (6 << 20) + 123  # more than one 5 MiB part, so a part is uploaded before the block ends


def _s3(endpoint: str) -> Any:  # boto3 client classes are generated at runtime
    return boto3.client("s3", endpoint_url=endpoint)


def _keys(endpoint: str, bucket: str) -> list[str]:
    return [item["Key"] for item in _s3(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])]


def _pending_uploads(endpoint: str, bucket: str) -> list[dict]:
    return _s3(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])


# ---- URLs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base", "expected"),
    [
        ("in/ref.png", "s3://b/m/manifest.jsonl", "s3://b/m/in/ref.png"),
        ("../in/ref.png", "s3://b/m/manifest.jsonl", "s3://b/in/ref.png"),
        ("in/ref.png", "/x/y/m.jsonl", "/x/y/in/ref.png"),
        ("in/ref.png", "file:///x/y/m.jsonl", "file:///x/y/in/ref.png"),
        ("/abs/ref.png", "s3://b/m/manifest.jsonl", "/abs/ref.png"),
        ("s3://other/ref.png", "/x/y/m.jsonl", "s3://other/ref.png"),
        ("file:///abs/ref.png", "s3://b/m/manifest.jsonl", "file:///abs/ref.png"),
        ("in/ref.png", None, "in/ref.png"),
    ],
)
def test_resolve_url(url: str, base: str | None, expected: str) -> None:
    assert storage.resolve_url(url, base) == expected


def test_resolve_url_refuses_to_climb_out_of_the_bucket() -> None:
    with pytest.raises(ValueError, match="climbs above the root"):
        storage.resolve_url("../../x.png", "s3://b/manifest.jsonl")


def test_join_url() -> None:
    assert storage.join_url("s3://b/out/", "job-1", "/video.mp4") == "s3://b/out/job-1/video.mp4"
    assert storage.join_url("/tmp/out", "a") == "/tmp/out/a"


# ---- round trips --------------------------------------------------------------------------------------------------


def _round_trip(prefix: str, tmp_path: Path) -> None:
    url = storage.join_url(prefix, "sub", "a.bin")
    assert not storage.exists(url)
    storage.write_bytes_atomic(url, b"hello")
    assert storage.exists(url)
    assert storage.read_bytes(url) == b"hello"
    storage.write_bytes_atomic(url, b"overwritten")
    assert storage.read_bytes(url) == b"overwritten"

    local = tmp_path / "payload.bin"
    local.write_bytes(bytes(range(256)) * 1000)
    published = storage.join_url(prefix, "sub", "deeper", "b.bin")
    storage.publish_file(local, published)
    downloaded = storage.download(published, tmp_path / "dl" / "b.bin")
    assert downloaded.read_bytes() == local.read_bytes()

    assert storage.list_prefix(storage.join_url(prefix, "sub")) == [url, published]
    storage.remove(url)
    storage.remove(url)  # idempotent
    assert not storage.exists(url)


def test_round_trip_local(tmp_path: Path) -> None:
    _round_trip(str(tmp_path / "store"), tmp_path)


def test_round_trip_s3(s3_bucket: str, tmp_path: Path) -> None:
    _round_trip(f"s3://{s3_bucket}/prefix", tmp_path)


def test_read_missing_names_the_url(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/missing.json"
    with pytest.raises(FileNotFoundError, match=f"Cannot read {url}: .*check the URL"):
        storage.read_bytes(url)


def test_missing_bucket_errors_name_the_url(s3_endpoint: str) -> None:
    url = "s3://no-such-bucket/out/video.mp4"
    with pytest.raises(FileNotFoundError, match=f"Cannot write {url}: .*bucket exists"):
        storage.write_bytes_atomic(url, b"frames")
    with pytest.raises(FileNotFoundError, match="Cannot list s3://no-such-bucket/out"):
        storage.list_prefix("s3://no-such-bucket/out")


def test_filesystem_for_uses_the_endpoint_from_the_environment(s3_endpoint: str) -> None:
    fs, path = storage.filesystem_for("s3://bucket/key")
    assert path == "bucket/key"
    assert fs.endpoint_url == s3_endpoint


# ---- nothing partial on failure -----------------------------------------------------------------------------------


def test_failed_s3_write_leaves_no_object_and_no_pending_upload(s3_endpoint: str, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/out/video.mp4"
    with pytest.raises(RuntimeError, match="render crashed"):
        with storage.atomic_write(url) as file:
            file.write(b"x" * SIX_MIB_PLUS)
            # Proof that the stream really went out as it was written: a part is already on the server.
            assert len(_pending_uploads(s3_endpoint, s3_bucket)) == 1
            raise RuntimeError("render crashed")
    gc.collect()  # the writer's __del__ must not commit the partial data either
    assert _keys(s3_endpoint, s3_bucket) == []
    assert _pending_uploads(s3_endpoint, s3_bucket) == []


def test_failed_local_write_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out" / "video.mp4"
    with pytest.raises(RuntimeError, match="render crashed"):
        with storage.atomic_write(str(target)) as file:
            file.write(b"x" * SIX_MIB_PLUS)
            raise RuntimeError("render crashed")
    gc.collect()
    assert list(target.parent.iterdir()) == []


# ---- exclusive (conditional create) -------------------------------------------------------------------------------


def test_moto_enforces_if_none_match(s3_endpoint: str, s3_bucket: str) -> None:
    """The exclusive tests below mean something only if the test double refuses a second conditional PUT."""
    client = _s3(s3_endpoint)
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"second", IfNoneMatch="*")


@pytest.mark.parametrize("size", [0, 10, SIX_MIB_PLUS], ids=["empty", "small", "multipart"])
def test_exclusive_s3_write_refuses_an_existing_key(s3_endpoint: str, s3_bucket: str, size: int) -> None:
    url = f"s3://{s3_bucket}/out/result.bin"
    storage.write_bytes_atomic(url, b"a" * size, exclusive=True)
    with pytest.raises(FileExistsError, match=f"{url} already exists"):
        storage.write_bytes_atomic(url, b"b" * (size + 1), exclusive=True)
    assert storage.read_bytes(url) == b"a" * size
    assert _pending_uploads(s3_endpoint, s3_bucket) == []


def test_exclusive_local_write_refuses_an_existing_file(tmp_path: Path) -> None:
    url = str(tmp_path / "result.bin")
    storage.write_bytes_atomic(url, b"first", exclusive=True)
    with pytest.raises(FileExistsError, match="already exists"):
        storage.write_bytes_atomic(url, b"second", exclusive=True)
    assert Path(url).read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["result.bin"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_racing_exclusive_writers_one_wins(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Both writers start before either publishes, so only the publish itself can decide (no check-then-write)."""
    if where == "s3":
        url = f"s3://{request.getfixturevalue('s3_bucket')}/race.bin"
    else:
        url = str(tmp_path / "race.bin")
    with pytest.raises(FileExistsError, match="already exists"):
        with storage.atomic_write(url, exclusive=True) as loser:
            with storage.atomic_write(url, exclusive=True) as winner:
                winner.write(b"winner")
            loser.write(b"loser")
    assert storage.read_bytes(url) == b"winner"
