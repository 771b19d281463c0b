"""One redaction function: URL credentials, signed-URL values, AWS key ids and secret env values never leak."""

from __future__ import annotations

import logging

from flashportrait.infra.redact import RedactingFilter, redact, redact_value


def test_urls_keys_and_env_secrets_are_masked(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-canary-123456")
    text = (
        "GET s3://user:pa55word@bucket/k?X-Amz-Signature=abcdef123&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F2026 "
        "key AKIAIOSFODNN7EXAMPLE and tok-canary-123456"
    )
    out = redact(text)
    for secret in ("pa55word", "abcdef123", "AKIAIOSFODNN7EXAMPLE", "tok-canary-123456", "user:"):
        assert secret not in out
    assert "s3://***@bucket/k" in out


def test_nested_values_and_log_records(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret-value-42")
    assert redact_value({"a": ["x canary-secret-value-42"], "b": 3}) == {"a": ["x ***"], "b": 3}
    logger = logging.getLogger("test.redaction")
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    record = logger.makeRecord("t", logging.ERROR, __file__, 1, "failed %s", ("canary-secret-value-42",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == "failed ***"


def test_short_or_ordinary_values_are_left_alone(monkeypatch):
    monkeypatch.setenv("SOME_TOKEN", "true")
    assert redact("it is true") == "it is true"
