"""Waiting on events in tests, never on a fixed deadline: the suite must hold on a machine twice as slow (CI
shares its machine). A wait ends when the event happens, fails at once when the process it waits on has exited,
and otherwise gives up only at a ceiling far above any normal run."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


CEILING_S = 900.0  # a ceiling against hangs, not a performance limit


def wait_for(
    event: Callable[[], bool], what: str, process: subprocess.Popen | None = None, poll_s: float = 0.1
) -> None:
    """Return once ``event()`` is true; raise AssertionError if ``process`` exits first or the ceiling passes."""
    started = time.monotonic()
    while not event():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) before {what}")
        if time.monotonic() - started > CEILING_S:
            raise AssertionError(f"no {what} within {CEILING_S:.0f} s")
        time.sleep(poll_s)
