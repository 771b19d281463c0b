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

S3 requests are bounded (:class:`S3Settings`): without bounds, s3fs's own retry loop (5 tries) wraps botocore's (5
attempts) and a part that keeps getting 503 takes 50 attempts and 93 s to fail, and a stalled connection waits
botocore's 60 s per attempt. Every error that leaves this module names the URL it was about.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO, cast

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile


logger = logging.getLogger(__name__)

# S3's minimum multipart part size: a streamed upload sends a part every 5 MiB, so memory stays bounded by it.
PART_SIZE = 5 << 20
# Read/copy chunk: big enough to keep S3 throughput up, small enough that nothing holds a whole video in memory.
COPY_CHUNK = 8 << 20

S3_CONNECT_TIMEOUT_ENV = "FLASHPORTRAIT_S3_CONNECT_TIMEOUT_S"
S3_READ_TIMEOUT_ENV = "FLASHPORTRAIT_S3_READ_TIMEOUT_S"
S3_MAX_ATTEMPTS_ENV = "FLASHPORTRAIT_S3_MAX_ATTEMPTS"
S3_OPERATION_ATTEMPTS_ENV = "FLASHPORTRAIT_S3_OPERATION_ATTEMPTS"


@dataclass(frozen=True)
class S3Settings:
    """How long and how often one S3 request may be tried, read from the environment when a filesystem is made.

    Two retry loops are stacked and both are bounded here. botocore tries each HTTP request up to ``max_attempts``
    times in its "standard" mode (exponential backoff with jitter, capped at 20 s, and a per-client retry quota that
    stops retrying when most requests fail) on 5xx, throttling (503 SlowDown), connection errors and timeouts.
    Around it, s3fs repeats the whole operation up to ``operation_attempts`` times on throttling and on errors while
    reading a response *body* (a reset or stalled download), which botocore's loop never sees. A request that keeps
    failing the same way is therefore sent at most ``max_attempts * operation_attempts`` times (8 by default;
    measured: an UploadPart answered 503 every time gives up after 8 attempts in about 12 s and the upload is
    aborted, where unbounded s3fs took 50 attempts and 93 s and left it pending). Other S3 errors (500, 403, 404)
    end after botocore's ``max_attempts``. aiohttp re-sends an idempotent request once more when the connection is
    reset under it, so a reset can cost up to twice the budget in requests. A response that sends no byte for
    ``read_timeout_s`` counts as a failed attempt, so a stalled endpoint costs at most about
    ``attempts_budget * read_timeout_s`` plus the backoff, never an unbounded wait.
    """

    connect_timeout_s: float = 5.0  # TCP (+TLS) connect; S3 answers in milliseconds, a dead host never does
    read_timeout_s: float = 30.0  # silence between bytes of a response; CompleteMultipartUpload can take seconds
    max_attempts: int = 4  # botocore's total attempts per HTTP request (first try included)
    operation_attempts: int = 2  # s3fs's tries of a whole operation (request + reading its body)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Settings from the ``FLASHPORTRAIT_S3_*`` variables; a bad value raises a ValueError naming the variable."""
        environ = os.environ if environ is None else environ
        default = cls()
        return cls(
            connect_timeout_s=_env_number(environ, S3_CONNECT_TIMEOUT_ENV, default.connect_timeout_s, float, 0.1, 600),
            read_timeout_s=_env_number(environ, S3_READ_TIMEOUT_ENV, default.read_timeout_s, float, 0.1, 3600),
            max_attempts=_env_number(environ, S3_MAX_ATTEMPTS_ENV, default.max_attempts, int, 1, 20),
            operation_attempts=_env_number(environ, S3_OPERATION_ATTEMPTS_ENV, default.operation_attempts, int, 1, 10),
        )

    @property
    def attempts_budget(self) -> int:
        """The most times one request is sent before the operation fails."""
        return self.max_attempts * self.operation_attempts

    def config_kwargs(self) -> dict[str, Any]:
        """``botocore.config.Config`` arguments (s3fs passes ``config_kwargs`` through).

        ``total_max_attempts`` counts the first try; botocore's older ``max_attempts`` key counts retries only.
        """
        return {
            "connect_timeout": self.connect_timeout_s,
            "read_timeout": self.read_timeout_s,
            "retries": {"total_max_attempts": self.max_attempts, "mode": "standard"},
        }


def _env_number(
    environ: Mapping[str, str], name: str, default: float, kind: type[float] | type[int], low: float, high: float
) -> Any:
    raw = environ.get(name, "").strip()
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ValueError(
            f"{name}={raw!r} is not a {'whole number' if kind is int else 'number'} between {low:g} and {high:g}; "
            f"unset it for the default ({default:g}) or set a value in that range."
        )
    return value


def filesystem_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the filesystem-specific path for ``url``.

    For S3 the endpoint is taken from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and passed explicitly: botocore
    would read the variable itself, but fsspec caches filesystem instances by their arguments, so an explicit argument
    makes a changed endpoint (a test server, a different MinIO) yield a new instance instead of a stale one. The same
    holds for the timeouts and retry bounds (:class:`S3Settings`), which are read from the environment here, on every
    call. Region is deliberately left to the environment (``region_name`` in ``client_kwargs`` makes bucket creation
    send a bad ``LocationConstraint``). Listings are not cached, so an object another process just wrote is seen at
    once.
    """
    protocol, _ = fsspec.core.split_protocol(url)
    options: dict[str, object] = {}
    settings: S3Settings | None = None
    if protocol in ("s3", "s3a"):
        settings = S3Settings.from_env()
        options["use_listings_cache"] = False
        options["config_kwargs"] = settings.config_kwargs()
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(url, **options)
    if settings is not None:
        # s3fs takes its own retry count only as an attribute (its constructor would hand ``retries=`` to the
        # botocore session and fail); the cached instance was made from the same environment, so this is stable.
        fs.retries = settings.operation_attempts
    return fs, path


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
    # Read errors name the URL, write errors (a full scratch disk) name the local file: each says where to look.
    with _errors_name(str(dest), "write"), source, _local_atomic_write(dest, exclusive=False) as target:
        while True:
            with _errors_name(url, "download"), _s3fs_range_error_unmasked():
                chunk = source.read(COPY_CHUNK)
            if not chunk:
                break
            target.write(chunk)
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
_TRANSIENT_HINT = (
    "the store kept failing within the retry budget; check its health and the endpoint, or raise "
    f"{S3_MAX_ATTEMPTS_ENV} / {S3_READ_TIMEOUT_ENV}, then re-run (only unfinished rows are redone)"
)
_LOCAL_HINT = "check the disk holding it (free space, file-size limit, permissions)"
_NAMED = "_flashportrait_names_its_url"  # set on errors already re-raised with a URL, so outer layers keep them


@contextmanager
def _errors_name(url: str, action: str) -> Iterator[None]:
    """Re-raise storage errors naming the URL: s3fs's own messages ("The specified bucket does not exist", "Access
    Denied", "Please reduce your request rate.") and botocore's transport errors do not say which of a batch's many
    URLs was meant, and the latter are not even OSErrors. "Already exists" passes unchanged: the conditional create
    decides it and callers treat it as an answer, not a failure. Errors keep their kind (errno and OSError subclass),
    so ``except TimeoutError`` / ``except ConnectionError`` still work."""
    remote = fsspec.core.split_protocol(url)[0] not in (None, "file", "local")
    try:
        yield
    except FileExistsError:
        raise
    except (FileNotFoundError, PermissionError) as error:
        if getattr(error, _NAMED, False) or url in str(error):
            raise
        kind = FileNotFoundError if isinstance(error, FileNotFoundError) else PermissionError
        raise _mark(kind(f"Cannot {action} {url}: {_describe(error, remote)}; {_HINTS[kind]}.")) from error
    except _transport_errors() as error:  # before OSError: botocore's ReadTimeoutError is also an IOError
        timed_out = "timeout" in type(error).__name__.lower()
        what = "timed out" if timed_out else "connection failed or was reset"
        message = f"Cannot {action} {url}: {what} ({_describe(error, remote)}); {_TRANSIENT_HINT}."
        raise _mark(OSError(errno.ETIMEDOUT if timed_out else errno.ECONNABORTED, message)) from error
    except OSError as error:
        if getattr(error, _NAMED, False) or url in str(error):
            raise
        hint = _TRANSIENT_HINT if remote else _LOCAL_HINT
        raise _mark(_named_os_error(error, f"Cannot {action} {url}: {_describe(error, remote)}; {hint}.")) from error


def _mark(error: BaseException) -> BaseException:
    setattr(error, _NAMED, True)
    return error


def _named_os_error(error: OSError, message: str) -> OSError:
    """An OSError of the same kind (same errno, hence same subclass) carrying ``message``."""
    if error.errno is not None:
        return OSError(error.errno, message)
    try:
        return type(error)(message)
    except Exception:  # an exotic constructor: the errno-less base class still says what happened
        return OSError(message)


def _settings() -> S3Settings:
    """The settings for messages; a bad variable must not hide the error being reported (it is reported elsewhere)."""
    try:
        return S3Settings.from_env()
    except ValueError:
        return S3Settings()


def _describe(error: BaseException, remote: bool = True) -> str:
    """The error's text plus, for S3, the HTTP status, the error code and how many attempts were spent on it."""
    text = str(error) or type(error).__name__
    if not remote:
        return text
    settings = _settings()
    if isinstance(error, TimeoutError) and not str(error):
        text = f"timed out (no data for {settings.read_timeout_s:g} s, {S3_READ_TIMEOUT_ENV})"
    response = getattr(error.__cause__, "response", None)
    if not isinstance(response, dict):
        if isinstance(error, (TimeoutError, *_transport_errors())):
            text += f"; gave up within the retry budget of {settings.attempts_budget} attempts"
        return text
    meta = response.get("ResponseMetadata", {})
    status = meta.get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    # A HEAD error has no body, so botocore makes its status the code: say it once.
    details = " ".join(dict.fromkeys(str(part) for part in (status, code) if part))
    if not details:
        return text
    attempts = int(meta.get("RetryAttempts", 0)) + 1
    if attempts > 1 and _s3fs_repeats(code, text):
        attempts *= settings.operation_attempts
    return f"{text} (S3 {details}; failed after {attempts} attempt{'s' if attempts != 1 else ''})"


def _s3fs_repeats(code: object, text: str) -> bool:
    """Whether s3fs (2026.9) repeats an operation after botocore gave up on this error: only throttling answers,
    matched on these words (its ``_error_wrapper``); other S3 errors end after botocore's own attempts."""
    return any(word in f"{code} {text}" for word in ("SlowDown", "reduce your request rate", "XAmzContentSHA256"))


@contextmanager
def _s3fs_range_error_unmasked() -> Iterator[None]:
    """s3fs 2026.9's ranged read inspects ``error.args[0]`` of any OSError and so turns an argument-less timeout
    (a stalled body) into ``IndexError: tuple index out of range``; give the caller the timeout it hid."""
    try:
        yield
    except IndexError as error:
        if isinstance(error.__context__, OSError):
            raise error.__context__ from None
        raise


@cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """botocore's and aiohttp's connection/timeout errors, which s3fs lets through untranslated (and not as
    OSErrors) once its retries are spent; imported lazily so local-only use needs neither package. Other botocore
    errors (no credentials, bad parameters) are not transport failures and pass unchanged."""
    found: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        found += [BotoConnectionError, HTTPClientError]  # refused/timed-out connects; resets, read timeouts
    except ImportError:  # pragma: no cover - s3fs depends on botocore
        pass
    try:
        from aiohttp import ClientError

        found.append(ClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


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
