"""URL policy: scheme allow-list, metadata/link-local hosts, manifest root (symlinks too), prefix allow-list."""

from __future__ import annotations

import os

import pytest

from flashportrait.infra.urls import UrlPolicy, UrlRefused, check_input_url


def check(url: str, manifest: str | None = "/data/batch/m.jsonl", policy: UrlPolicy | None = None) -> str:
    return check_input_url(url, field_name="driving", manifest_url=manifest, policy=policy or UrlPolicy())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com/a.mp4", "scheme 'http' of http://example.com/a.mp4 is not allowed"),
        ("ftp://example.com/a.mp4", "scheme 'ftp'"),
        ("gs://bucket/a.mp4", "scheme 'gs'"),
        ("memory://a.mp4", "scheme 'memory'"),
    ],
)
def test_schemes_outside_the_allow_list_are_refused(url, message):
    with pytest.raises(UrlRefused, match=message.replace(".", r"\.").replace("(", r"\(")):
        check(url)


def test_http_needs_an_allowed_host_and_never_reaches_metadata():
    policy = UrlPolicy(allowed_schemes=frozenset({"s3", "https", "http"}), http_hosts=frozenset({"media.example"}))
    with pytest.raises(UrlRefused, match="host 'other.example'.*not in the allowed HTTP hosts"):
        check("https://other.example/a.mp4", policy=policy)
    with pytest.raises(UrlRefused, match="cloud metadata service"):
        check("http://169.254.169.254/latest/meta-data/", policy=policy)
    # even if an operator lists a link-local address as a host, it is refused
    risky = UrlPolicy(allowed_schemes=frozenset({"http"}), http_hosts=frozenset({"169.254.10.10"}))
    with pytest.raises(UrlRefused, match="link-local or metadata address"):
        check("http://169.254.10.10/x.mp4", policy=risky)
    loopback = UrlPolicy(allowed_schemes=frozenset({"http"}), http_hosts=frozenset({"127.0.0.1"}))
    assert check("http://127.0.0.1:9/x.mp4", policy=loopback)


def test_credentials_in_urls_are_refused_and_never_echoed():
    with pytest.raises(UrlRefused) as info:
        check("s3://AKIAABCDEFGHIJKLMNOP:supersecretvalue@bucket/a.mp4")
    assert "supersecretvalue" not in str(info.value) and "embeds credentials" in str(info.value)


def test_local_files_stay_inside_the_manifest_folder(tmp_path):
    root = tmp_path / "batch"
    root.mkdir()
    (root / "ok.mp4").write_bytes(b"x")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, root / "link.mp4")
    manifest = str(root / "m.jsonl")
    assert check(str(root / "ok.mp4"), manifest)
    with pytest.raises(UrlRefused, match="outside the manifest's folder"):
        check(str(root / ".." / "secret.txt"), manifest)
    with pytest.raises(UrlRefused, match="outside the manifest's folder"):
        check(str(root / "link.mp4"), manifest)  # a symlink pointing out of the root
    with pytest.raises(UrlRefused, match="outside the manifest's folder"):
        check("/etc/passwd", manifest)
    assert check(str(outside), manifest, UrlPolicy(local_roots=(str(tmp_path),)))


def test_remote_manifests_cannot_name_local_files():
    with pytest.raises(UrlRefused, match="local file /etc/passwd in a remote manifest"):
        check("/etc/passwd", "s3://bucket/m.jsonl")


def test_prefix_allow_list():
    policy = UrlPolicy(allowed_prefixes=("s3://tenant-a/",))
    assert check("s3://tenant-a/in/x.mp4", policy=policy)
    with pytest.raises(UrlRefused, match="outside the allowed prefixes"):
        check("s3://tenant-b/in/x.mp4", policy=policy)
