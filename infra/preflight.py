"""Checks that stop a run before any work when it cannot succeed: no credentials, an output prefix that is not there.

Without them a batch starts Ray, decodes inputs and renders for minutes before its first upload fails, and a
machine without credentials silently asks the cloud's instance-metadata service (169.254.169.254) for a role —
a network call nobody asked for, which on a laptop or a foreign cloud hangs for a second per attempt and on a
shared host may hand out someone else's role. So credentials are resolved here from the explicit sources only
(environment, shared credentials/config files, profile, SSO, credential process, web identity); the instance
and container metadata endpoints are consulted only when the operator opts in with
``FLASHPORTRAIT_ALLOW_INSTANCE_METADATA=1``. The flow turns a :class:`PreflightError` into exit code 2.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .redact import redact
from .storage import filesystem_for, join_url


logger = logging.getLogger(__name__)

ALLOW_INSTANCE_METADATA_ENV = "FLASHPORTRAIT_ALLOW_INSTANCE_METADATA"
# botocore's credential providers that reach a metadata endpoint over the network (EC2 IMDS; ECS/EKS container).
METADATA_PROVIDERS = ("container-role", "iam-role")
S3_PROTOCOLS = ("s3", "s3a")
PROBE_NAME = ".flashportrait-preflight-"


class PreflightError(ValueError):
    """The run cannot succeed as configured; the message names what is wrong and how to fix it."""


def instance_metadata_allowed() -> bool:
    """Whether the operator opted in to credentials from the instance/container metadata service."""
    return os.environ.get(ALLOW_INSTANCE_METADATA_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_credentials(urls: Iterable[str]) -> str | None:
    """Fail unless AWS credentials resolve for the S3 URLs among ``urls``; no network call unless opted in.

    Returns the botocore credential source that answered (e.g. ``"env"``, ``"shared-credentials-file"``) for the
    log, or ``None`` when no URL is on S3 (local runs need no credentials). The secret itself never leaves here.
    """
    s3_urls = [url for url in urls if fsspec.core.split_protocol(url)[0] in S3_PROTOCOLS]
    if not s3_urls:
        return None
    import botocore.exceptions
    import botocore.session

    example = redact(s3_urls[0])
    allow_metadata = instance_metadata_allowed()
    try:
        session = botocore.session.Session()
        resolver = session.get_component("credential_provider")
        if not allow_metadata:
            for name in METADATA_PROVIDERS:
                if resolver.get_provider(name) is not None:
                    resolver.remove(name)
        credentials = resolver.load_credentials()
    except botocore.exceptions.ProfileNotFound as error:
        raise PreflightError(
            f"AWS profile {error.kwargs.get('profile')!r} (AWS_PROFILE) is not in the shared config or credentials "
            f"file, needed for {example}; fix AWS_PROFILE or add the profile."
        ) from None
    except botocore.exceptions.BotoCoreError as error:
        # e.g. PartialCredentialsError (a key id without its secret), a broken credential_process
        raise PreflightError(
            f"AWS credentials for {example} are unusable: {redact(str(error))}; fix the environment or the "
            "shared credentials file."
        ) from None
    if credentials is None or not credentials.access_key or not credentials.secret_key:
        sources = "environment, shared credentials file, profile"
        if allow_metadata:
            sources += ", instance/container metadata"
        opt_in = ""
        if not allow_metadata:
            opt_in = f", or set {ALLOW_INSTANCE_METADATA_ENV}=1 on EC2/ECS/EKS to use the instance/container role"
        raise PreflightError(
            f"no AWS credentials found ({sources}) for {example}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"or AWS_PROFILE naming a profile in ~/.aws/credentials (AWS_SHARED_CREDENTIALS_FILE){opt_in}."
        )
    method = str(getattr(credentials, "method", "unknown"))
    logger.debug("AWS credentials for %s come from %s", example, method)
    return method


def check_output_prefix(url: str, *, probe_write: bool = True) -> None:
    """Fail unless the output location exists and this process may write there; nothing is left behind.

    S3: a one-key ``ListObjectsV2`` under the prefix proves the bucket exists and is listable (a missing bucket is
    ``NoSuchBucket`` here, not a failed upload after the first render); with ``probe_write`` a multipart upload is
    created under the prefix and aborted at once, which proves ``s3:PutObject`` and ``s3:AbortMultipartUpload``
    (every failed publish needs the latter) without ever creating an object. Local: the folder is created and a
    temp file written and removed. Other fsspec stores: the bucket/root must exist.
    """
    shown = redact(url)
    check_credentials([url])
    try:
        fs, path = filesystem_for(url)
    except ValueError as error:  # e.g. a bad FLASHPORTRAIT_S3_* value
        raise PreflightError(f"cannot use the output location {shown}: {error}") from None
    protocol = fsspec.core.split_protocol(url)[0]
    if isinstance(fs, LocalFileSystem):
        _check_local_folder(Path(path), shown)
    elif protocol in S3_PROTOCOLS:
        _check_s3_prefix(fs, path, url, shown, probe_write=probe_write)
    else:
        root = path.split("/", 1)[0]
        try:
            found = fs.exists(root)
        except Exception as error:
            raise PreflightError(f"cannot reach the output location {shown}: {redact(str(error))}") from None
        if not found:
            raise PreflightError(f"the output bucket {root!r} of {shown} does not exist; create it or fix --out.")


def check_run(urls: Iterable[str], output_prefix: str) -> None:
    """Both checks for one run: credentials for every S3 URL involved, then the output prefix."""
    check_credentials([*urls, output_prefix])
    check_output_prefix(output_prefix)


def _check_local_folder(folder: Path, shown: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=PROBE_NAME):
            pass
    except OSError as error:
        raise PreflightError(
            f"cannot write to the output folder {shown}: {error.strerror or error}; choose a writable --out or fix "
            "the folder's permissions."
        ) from None


def _check_s3_prefix(fs: fsspec.AbstractFileSystem, path: str, url: str, shown: str, *, probe_write: bool) -> None:
    bucket, _, prefix = path.partition("/")
    if not bucket:
        raise PreflightError(f"the output URL {shown} names no bucket; use --out s3://BUCKET/PREFIX.")
    listing_prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=listing_prefix, MaxKeys=1)
    except FileNotFoundError:
        raise PreflightError(
            f"the output bucket {bucket!r} does not exist (NoSuchBucket) for {shown}; create it or fix --out."
        ) from None
    except PermissionError:
        raise PreflightError(
            f"access to the output bucket {bucket!r} is denied (AccessDenied listing {shown}); grant these "
            "credentials s3:ListBucket on it or choose another --out."
        ) from None
    except Exception as error:
        raise PreflightError(
            f"cannot reach the output bucket {bucket!r} for {shown}: {redact(str(error))}; check AWS_ENDPOINT_URL "
            "and the network."
        ) from None
    if not probe_write:
        return
    probe = fs.split_path(join_url(url, f"{PROBE_NAME}{uuid.uuid4().hex}"))[1]
    try:
        upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=probe)
    except Exception as error:
        raise PreflightError(
            f"cannot write to the output bucket {bucket!r} under {shown}: {redact(str(error))}; grant these "
            "credentials s3:PutObject there or choose another --out."
        ) from None
    try:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=probe, UploadId=upload["UploadId"])
    except Exception as error:
        raise PreflightError(
            f"cannot abort uploads in the output bucket {bucket!r} ({redact(str(error))}); a failed publish must "
            f"abort its upload, so grant s3:AbortMultipartUpload on {shown} (a pending probe upload {probe!r} is "
            "left for the bucket's AbortIncompleteMultipartUpload lifecycle rule)."
        ) from None
