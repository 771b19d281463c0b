"""One redaction function for every place text leaves the process: logs, reports, sidecars, artifacts, errors.

Credentials reach us in URLs (``user:password@``, presigned query values such as ``X-Amz-Signature``), in the
environment (``AWS_SECRET_ACCESS_KEY`` and friends) and inside library exception texts that quote either. Peers
leaked them exactly there (PrefectHQ/prefect#11098, s3fs-fuse#2787, internetarchive#477), so every writer of text
calls :func:`redact`, and :class:`RedactingFilter` puts it in front of every log handler.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any


MASK = "***"
SECRET_ENV_PATTERN = re.compile(
    r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SESSION|PRIVATE|API_?KEY|ACCESS_KEY)", re.IGNORECASE
)
# Values shorter than this are not treated as secrets (they would mask ordinary words such as "true").
MIN_SECRET_LENGTH = 6
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_SIGNED_QUERY = re.compile(
    r"(?P<key>(?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|sig|token|access_token|"
    r"api_key|apikey|key|password|secret)=)(?P<value>[^&\s\"'#]+)",
    re.IGNORECASE,
)
_AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (longest first, so overlapping values mask fully)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_ENV_PATTERN.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """``text`` with URL credentials, signed-URL query values, AWS key ids and secret env values masked."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _SIGNED_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)
    text = _AWS_ACCESS_KEY_ID.sub(MASK, text)
    for secret in [*extra_secrets, *secret_values()]:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, MASK)
    return text


def redact_value(value: Any) -> Any:
    """Redact every string inside nested dicts/lists/tuples (for sidecars, report rows, artifacts)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, arguments and exception text before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach a :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger) once."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
