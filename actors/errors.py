"""Errors the actors layer raises to the flows layer, so flows can tell a bad job from a lost cluster."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The Ray cluster or its workers are gone (head lost, restarts exhausted, no resources): the job did not fail
    on its own inputs, so the batch marks it and every later row ``unfinished`` and a re-run resumes them."""
