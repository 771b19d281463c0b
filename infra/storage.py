"""Every byte the batch reads or writes goes through here, addressed by URL (path, file://, s3://, any fsspec URL).

The one rule this module exists to keep: nothing half-written is ever visible at a final key. fsspec's buffered
writers commit whatever they hold when their ``with`` block exits on an exception and again when they are garbage
collected (fsspec/s3fs#154), so :func:`atomic_write` opens them with ``autocommit=False`` and calls ``commit()`` only
after the caller's block succeeded, ``discard()`` (which aborts the multipart upload) otherwise. ``fs.transaction``
would do the same, but it lives on the filesystem *instance*, and s3fs shares one instance between all threads of a
process, so two concurrent jobs would share (and commit or abort) each other's transaction.

``exclusive=True`` is a real conditional create: on S3, s3fs mode ``"xb"`` sends ``If-None-Match: *`` on PutObject and
on CompleteMultipartUpload (checked against moto in the tests, which first prove moto enforces the header); locally
the finished temp file is hard-linked to the final name, which fails atomically if the name exists.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, cast

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile


logger = logging.getLogger(__name__)

# S3's minimum multipart part size: a streamed upload sends a part every 5 MiB, so memory stays bounded by it.
PART_SIZE = 5 << 20
# Read/copy chunk: big enough to keep S3 throughput up, small enough that nothing holds a whole video in memory.
COPY_CHUNK = 8 << 20


def filesystem_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the filesystem-specific path for ``url``.

    For S3 the endpoint is taken from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and passed explicitly: botocore
    would read the variable itself, but fsspec caches filesystem instances by their arguments, so an explicit argument
    makes a changed endpoint (a test server, a different MinIO) yield a new instance instead of a stale one. Region is
    deliberately left to the environment (``region_name`` in ``client_kwargs`` makes bucket creation send a bad
    ``LocationConstraint``). Listings are not cached, so an object another process just wrote is seen at once.
    """
    protocol, _ = fsspec.core.split_protocol(url)
    options: dict[str, object] = {}
    if protocol in ("s3", "s3a"):
        options["use_listings_cache"] = False
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    return fsspec.core.url_to_fs(url, **options)


def resolve_url(url: str, base_url: str | None) -> str:
    """Resolve a relative ``url`` against the folder holding ``base_url`` (e.g. a manifest next to its inputs).

    Absolute paths and URLs with a scheme are returned unchanged, so a manifest can mix both forms.
    """
    protocol, _ = fsspec.core.split_protocol(url)
    if base_url is None or protocol is not None or os.path.isabs(url):
        return url
    base_protocol, base_path = fsspec.core.split_protocol(base_url)
    if base_protocol is None:
        return os.path.normpath(os.path.join(os.path.dirname(base_url), url))
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(base_path), url))
    if resolved in (".", "..") or resolved.startswith("../"):
        raise ValueError(f"Relative URL {url!r} climbs above the root of {base_url!r}; use an absolute URL instead.")
    return f"{base_protocol}://{resolved}"


def join_url(prefix: str, *parts: str) -> str:
    """``prefix`` and ``parts`` joined by single slashes (URLs are not OS paths, so never ``os.path.join``)."""
    pieces = [prefix.rstrip("/")] + [part.strip("/") for part in parts if part.strip("/")]
    return "/".join(pieces)


def exists(url: str) -> bool:
    """Whether an object or file exists at ``url``."""
    fs, path = filesystem_for(url)
    return bool(fs.exists(path))


def read_bytes(url: str) -> bytes:
    """The whole content of ``url``; for small objects (manifests, sidecars), never for videos."""
    fs, path = filesystem_for(url)
    with _errors_name(url, "read"):
        return cast(bytes, fs.cat_file(path))


def download(url: str, dest: str | Path) -> Path:
    """Copy ``url`` to the local file ``dest`` in chunks; ``dest`` appears only once complete."""
    fs, path = filesystem_for(url)
    dest = Path(dest)
    with _errors_name(url, "download"):
        source = fs.open(path, "rb", block_size=COPY_CHUNK)  # looks the object up: "not found" / "denied" arise here
    with source, _local_atomic_write(dest, exclusive=False) as target:
        shutil.copyfileobj(source, target, COPY_CHUNK)
    logger.debug("downloaded %s to %s", url, dest)
    return dest


@contextmanager
def atomic_write(url: str, *, exclusive: bool = False, metadata: dict[str, str] | None = None) -> Iterator[BinaryIO]:
    """A writable binary file whose content appears at ``url`` only if the ``with`` block completes.

    On an exception nothing appears (no partial object, no pending multipart upload, no temp file). With
    ``exclusive=True`` a :class:`FileExistsError` naming ``url`` is raised if something already exists there, decided
    by the storage itself at publish time, so of two racing writers exactly one wins. ``metadata`` becomes the
    object's user metadata on object stores (read back with :func:`object_metadata`); local files have none.
    """
    fs, path = filesystem_for(url)
    if isinstance(fs, LocalFileSystem):
        writer = _local_atomic_write(Path(path), exclusive=exclusive, url=url)
    else:
        writer = _remote_atomic_write(fs, path, url, exclusive=exclusive, metadata=metadata)
    with _errors_name(url, "write"), writer as file:
        yield file


def publish_file(
    local_path: str | Path, url: str, *, exclusive: bool = False, metadata: dict[str, str] | None = None
) -> None:
    """Copy a finished local file to ``url`` through :func:`atomic_write`, streaming in chunks."""
    with open(local_path, "rb") as source, atomic_write(url, exclusive=exclusive, metadata=metadata) as target:
        shutil.copyfileobj(source, target, COPY_CHUNK)
    logger.info("published %s to %s", local_path, url)


def write_bytes_atomic(
    url: str, data: bytes, *, exclusive: bool = False, metadata: dict[str, str] | None = None
) -> None:
    """Write ``data`` to ``url`` all-or-nothing (see :func:`atomic_write`)."""
    with atomic_write(url, exclusive=exclusive, metadata=metadata) as target:
        target.write(data)


def is_local(url: str) -> bool:
    """Whether ``url`` names a file on this machine (local files carry no object metadata)."""
    return isinstance(filesystem_for(url)[0], LocalFileSystem)


def object_metadata(url: str) -> dict[str, str]:
    """The user metadata stored with the object at ``url`` (empty for local files, which carry none)."""
    fs, path = filesystem_for(url)
    if isinstance(fs, LocalFileSystem):
        return {}
    with _errors_name(url, "read metadata of"):
        return {str(k).lower(): str(v) for k, v in fs.metadata(path, refresh=True).items()}


def size(url: str) -> int:
    """Size in bytes of the object or file at ``url``."""
    fs, path = filesystem_for(url)
    with _errors_name(url, "stat"):
        return int(fs.size(path))


def fingerprint(url: str) -> str:
    """A cheap identity of the content at ``url``: the object store's ETag, else size and modification time.

    Part of each job's hash, so a re-run notices when an input object was replaced under the same URL.
    """
    fs, path = filesystem_for(url)
    with _errors_name(url, "stat"):
        info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"size:{info.get('size')}:mtime:{mtime}"


def list_prefix(url: str) -> list[str]:
    """Every file below the folder ``url`` (recursively), as full URLs in the same form as ``url``, sorted."""
    fs, path = filesystem_for(url)
    protocol, _ = fsspec.core.split_protocol(url)
    with _errors_name(url, "list"):
        found = sorted(fs.find(path))
    if protocol is None:
        return found
    return [fs.unstrip_protocol(item) for item in found]


def remove(url: str) -> None:
    """Delete the file at ``url``; a missing file is not an error (removal is idempotent)."""
    fs, path = filesystem_for(url)
    try:
        with _errors_name(url, "remove"):
            fs.rm_file(path)
    except FileNotFoundError:
        logger.debug("remove: nothing at %s", url)


_HINTS = {
    FileNotFoundError: "check the URL (for S3: that the bucket exists and the key is spelled right)",
    PermissionError: "check that this process (its credentials, or file permissions) may access it",
}


@contextmanager
def _errors_name(url: str, action: str) -> Iterator[None]:
    """Re-raise "not found" / "access denied" naming the URL: s3fs's own messages ("The specified bucket does not
    exist", "Access Denied") do not say which of a batch's many URLs was meant."""
    try:
        yield
    except (FileNotFoundError, PermissionError) as error:
        if url in str(error):
            raise
        kind = FileNotFoundError if isinstance(error, FileNotFoundError) else PermissionError
        raise kind(f"Cannot {action} {url}: {error}; {_HINTS[kind]}.") from error


@contextmanager
def _local_atomic_write(final: Path, *, exclusive: bool, url: str | None = None) -> Iterator[BinaryIO]:
    """Write to a hidden temp file next to ``final`` (same filesystem, so the publish is a rename or a link)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f".{final.name}.{uuid.uuid4().hex}.part"
    # O_EXCL on a random name; mode 0o666 so the umask, not the temp file, decides the published file's permissions.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            if not file.closed:  # the caller may have closed it already
                file.flush()
                os.fsync(file.fileno())
        _publish_local(temp, final, exclusive=exclusive, url=url or str(final))
    finally:
        temp.unlink(missing_ok=True)


def _publish_local(temp: Path, final: Path, *, exclusive: bool, url: str) -> None:
    if not exclusive:
        os.replace(temp, final)
        return
    try:
        # link() fails atomically if ``final`` exists, so of two racing writers exactly one publishes.
        os.link(temp, final)
    except FileExistsError as error:
        raise FileExistsError(f"{url} already exists; refusing to overwrite it (exclusive write).") from error


@contextmanager
def _remote_atomic_write(
    fs: fsspec.AbstractFileSystem, path: str, url: str, *, exclusive: bool, metadata: dict[str, str] | None = None
) -> Iterator[BinaryIO]:
    """Stream a multipart upload that is completed only on success and aborted otherwise."""
    extra = {"Metadata": dict(metadata)} if metadata else {}
    file = fs.open(path, "xb" if exclusive else "wb", block_size=PART_SIZE, autocommit=False, **extra)
    if not isinstance(file, AbstractBufferedFile):
        file.close()
        raise ValueError(
            f"Cannot write {url} atomically: the {fs.protocol} filesystem cannot defer its commit. "
            "Use a local path or an object store (s3://, gs://, az://)."
        )
    try:
        yield cast(BinaryIO, file)
        file.close()  # uploads the last part; with autocommit=False it does not complete the upload
        _commit_remote(fs, file, path, url, exclusive=exclusive)
    except BaseException:
        _discard_remote(file, url)
        raise


def _commit_remote(
    fs: fsspec.AbstractFileSystem, file: AbstractBufferedFile, path: str, url: str, *, exclusive: bool
) -> None:
    try:
        if exclusive and file.tell() == 0:
            # s3fs commits an empty file with an unconditional touch(), so create it with a conditional PUT instead.
            file.discard()
            fs.pipe_file(path, b"", mode="create")
        else:
            file.commit()
    except FileExistsError as error:
        raise FileExistsError(f"{url} already exists; refusing to overwrite it (exclusive write).") from error


def _discard_remote(file: AbstractBufferedFile, url: str) -> None:
    """Abort the upload and mark the file closed, so neither ``__exit__`` nor ``__del__`` can commit it later."""
    try:
        file.discard()
    except Exception:  # the caller's exception matters more; the orphan is cleaned by a lifecycle rule
        logger.warning(
            "Could not abort the upload to %s; a bucket lifecycle rule "
            "(AbortIncompleteMultipartUpload) will remove the pending parts.",
            url,
            exc_info=True,
        )
    finally:
        file.closed = True
