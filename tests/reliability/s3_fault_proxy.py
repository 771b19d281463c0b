"""A loopback HTTP fault proxy in front of the moto S3 server: real sockets, real retries, faults on a schedule.

Why a proxy rather than a mock or a botocore ``before-send`` hook: the faults must reach every process the same way
(the flow subprocess, Ray workers, s3fs's aiohttp pool), and they must be *network* faults — a response that never
comes, a body cut mid-stream, a socket closed while a part is being sent — which only a real socket can produce. Point
``AWS_ENDPOINT_URL`` at :attr:`FaultProxy.url` (see :meth:`FaultProxy.env`) and every client goes through it.

The rule table is ordered; the first rule that matches a request *and* is due to fire decides what happens, else the
request passes through unchanged. A rule fires on every ``every``-th matching request after ``skip`` matches, at most
``count`` times, and with ``probability`` drawn from the proxy's seeded generator, so a schedule replays exactly.
Every wait is bounded (delays are capped, upstream calls have a timeout) and :meth:`FaultProxy.stop` interrupts them.

Run standalone (for a subprocess-only experiment)::

    python -m tests.reliability.s3_fault_proxy --upstream http://127.0.0.1:5000 \
        --rules '[{"action": "status", "operation": "UploadPart", "status": 503}]'
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit


Action = Literal["pass", "status", "delay", "close_request", "close_response", "stall_response", "lose_response"]

# Hop-by-hop headers are the proxy's own business, never forwarded (RFC 9110 §7.6.1).
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
_ERROR_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
    "AccessDenied": "Access Denied",
    "ConditionalRequestConflict": "A conflicting operation occurred. Please retry.",
}
MAX_DELAY_S = 120.0  # no rule may hold a request longer than this, whatever a test asks
UPSTREAM_TIMEOUT_S = 30.0


def s3_operation(method: str, path: str, query: str) -> str:
    """The S3 API operation a path-style request is, from its method, path and query (enough for rule matching)."""
    params = {p.split("=", 1)[0] for p in query.split("&") if p}
    is_bucket = path.strip("/").count("/") == 0
    if method == "PUT":
        if "partNumber" in params and "uploadId" in params:
            return "UploadPart"
        return "CreateBucket" if is_bucket else "PutObject"
    if method == "POST":
        if "uploads" in params:
            return "CreateMultipartUpload"
        if "uploadId" in params:
            return "CompleteMultipartUpload"
        if "delete" in params:
            return "DeleteObjects"
        return "Post"
    if method == "DELETE":
        if "uploadId" in params:
            return "AbortMultipartUpload"
        return "DeleteBucket" if is_bucket else "DeleteObject"
    if method == "HEAD":
        return "HeadBucket" if is_bucket else "HeadObject"
    if method == "GET":
        if is_bucket:
            if "uploads" in params:
                return "ListMultipartUploads"
            return "ListObjectsV2" if "list-type" in params else "ListObjects"
        return "ListParts" if "uploadId" in params else "GetObject"
    return method


@dataclass
class Rule:
    """One line of the fault schedule.

    Matching (all given conditions must hold): ``operation`` (see :func:`s3_operation`), ``method``, ``path`` (regex
    searched in the URL path, e.g. the key), ``query`` (regex searched in the raw query, e.g. ``partNumber=2``).

    Actions: ``status`` answers ``status`` with an S3 XML error ``code`` without forwarding; ``delay`` waits
    ``delay_s`` then forwards; ``close_request`` reads ``after_bytes`` of the request body then resets the
    connection (a reset mid-upload); ``close_response`` forwards, sends the headers and ``after_bytes`` of the body,
    then resets (a truncated download); ``stall_response`` sends the headers and ``after_bytes`` of the body, then
    goes silent for ``delay_s`` (a stalled body) before closing; ``lose_response`` forwards (the server acts on the
    request) but answers ``status``/``code`` instead of the real response, as when a 500 hides a completed upload;
    ``pass`` forwards (useful to shield a request from later rules).
    """

    action: Action = "status"
    operation: str | None = None
    method: str | None = None
    path: str | None = None
    query: str | None = None
    status: int = 503
    code: str = "SlowDown"
    delay_s: float = 0.0
    after_bytes: int = 0
    count: int | None = None  # fire at most this many times (None: unlimited)
    every: int = 1  # fire on every n-th due match
    skip: int = 0  # let this many matches pass first
    probability: float = 1.0  # drawn from the proxy's seeded generator
    matched: int = field(default=0, compare=False)
    injected: int = field(default=0, compare=False)

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.operation is not None and self.operation != s3_operation(method, path, query):
            return False
        if self.path is not None and not re.search(self.path, path):
            return False
        return self.query is None or re.search(self.query, query) is not None


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it, and what it did to it (``pass`` when nothing was injected)."""

    method: str
    path: str
    query: str
    operation: str
    action: str
    at: float


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 (a free port) forwarding to ``upstream`` under a seeded rule table.

    Use as a context manager; :attr:`url` is the endpoint to hand to clients. :attr:`log` lists every request,
    :meth:`injected` counts the faults (per operation or in all), and :meth:`set_rules` swaps the schedule while
    the proxy runs (e.g. to start a 503 burst mid-batch).
    """

    def __init__(self, upstream: str, rules: list[Rule] | None = None, *, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"upstream {upstream!r} must be http://127.0.0.1:PORT (the proxy is loopback-only)")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self._rules = list(rules or [])
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.log: list[Seen] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        handler = type("_BoundHandler", (_Handler,), {"proxy": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self) -> dict[str, str]:
        """Environment entries that route every AWS client of a (child) process through this proxy."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_S3": self.url}

    # -- schedule -----------------------------------------------------------------------------------------------------

    def set_rules(self, rules: list[Rule]) -> None:
        with self._lock:
            self._rules = list(rules)

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def injected(self, operation: str | None = None) -> int:
        """How many requests (of ``operation``, or all) got a fault instead of a plain pass-through."""
        with self._lock:
            return sum(1 for s in self.log if s.action != "pass" and operation in (None, s.operation))

    def requests(self, operation: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.log if operation in (None, s.operation)]

    def _decide(self, method: str, path: str, query: str) -> Rule | None:
        with self._lock:
            chosen: Rule | None = None
            for rule in self._rules:
                if not rule.matches(method, path, query):
                    continue
                rule.matched += 1
                due = rule.matched - rule.skip
                if due <= 0 or due % max(rule.every, 1) != 0:
                    continue
                if rule.count is not None and rule.injected >= rule.count:
                    continue
                if rule.probability < 1.0 and self._random.random() >= rule.probability:
                    continue
                rule.injected += 1
                chosen = rule
                break
            operation = s3_operation(method, path, query)
            action = "pass" if chosen is None else chosen.action
            self.log.append(Seen(method, path, query, operation, action, time.monotonic()))
            return chosen

    def _sleep(self, seconds: float) -> None:
        """A delay that :meth:`stop` cuts short, so no handler thread outlives the test by more than a moment."""
        self._stopping.wait(min(max(seconds, 0.0), MAX_DELAY_S))


def error_body(code: str, resource: str) -> bytes:
    """An S3 XML error document, as botocore parses it (code, message, resource, request id)."""
    message = _ERROR_MESSAGES.get(code, code)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
        "<RequestId>fault-proxy</RequestId><HostId>fault-proxy</HostId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    """Forwards one request at a time per connection (HTTP/1.1 keep-alive, as aiohttp and urllib3 expect)."""

    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet: the proxy's own log is :attr:`FaultProxy.log`, and stderr noise would hide test output."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parts.query
        rule = self.proxy._decide(self.command, path, query)
        action = "pass" if rule is None else rule.action

        if rule is not None and action == "close_request":
            self._read_body(limit=rule.after_bytes)
            self._reset()
            return
        body = self._read_body()
        if rule is not None and action == "status":
            payload = b"" if self.command == "HEAD" else error_body(rule.code, path)
            self._respond(rule.status, [("Content-Type", "application/xml")], payload, len(payload))
            return
        if rule is not None and action == "delay":
            self.proxy._sleep(rule.delay_s)
            if self.proxy._stopping.is_set():  # the test is over: do not act on a request its client gave up on
                self._reset()
                return
        status, headers, response = self._forward(body)
        if rule is not None and action == "lose_response":
            payload = b"" if self.command == "HEAD" else error_body(rule.code, path)
            self._respond(rule.status, [("Content-Type", "application/xml")], payload, len(payload))
            return
        if rule is not None and action in ("close_response", "stall_response"):
            self._respond(status, headers, response[: rule.after_bytes], len(response), keep_open=True)
            if action == "stall_response":
                self.proxy._sleep(rule.delay_s)
            self._reset()
            return
        self._respond(status, headers, response, len(response))

    def _read_body(self, limit: int | None = None) -> bytes:
        """The request body (Content-Length or chunked); with ``limit``, only that many bytes of it."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            total = 0
            while limit is None or total < limit:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                total += size
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(length, limit))

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(
            self.proxy.upstream_host, self.proxy.upstream_port, timeout=UPSTREAM_TIMEOUT_S
        )
        try:
            connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    connection.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body or None)
            response = connection.getresponse()
            data = b"" if self.command == "HEAD" else response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command == "HEAD":
                return response.status, headers, data
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            return response.status, headers, data
        finally:
            connection.close()

    def _respond(
        self, status: int, headers: list[tuple[str, str]], body: bytes, length: int, *, keep_open: bool = False
    ) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        if not any(name.lower() == "content-length" for name, _ in headers):
            self.send_header("Content-Length", str(length))
        if not keep_open and length != len(body):
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0 makes the server's close abortive), as a crashed peer would."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


class _QuietServer(ThreadingHTTPServer):
    """Resets are the point of this server: a client hanging up mid-request is no reason to print a traceback."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def iter_rules(spec: str) -> Iterator[Rule]:
    """Rules from a JSON list of objects with :class:`Rule`'s field names (for the command line)."""
    for item in json.loads(spec):
        yield Rule(**item)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback S3 fault proxy (tests only).")
    parser.add_argument("--upstream", required=True, help="the moto server, http://127.0.0.1:PORT")
    parser.add_argument("--rules", default="[]", help="JSON list of rules (Rule's field names)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long (bounded)")
    args = parser.parse_args(argv)
    with FaultProxy(args.upstream, list(iter_rules(args.rules)), seed=args.seed) as proxy:
        print(proxy.url, flush=True)
        proxy._stopping.wait(min(args.seconds, 3600.0))
        print(json.dumps([asdict(r) for r in proxy.rules]), flush=True)


if __name__ == "__main__":
    main()
