# Two commands for a newcomer: `make demo` renders the sample manifest, `make test` runs every check.
# Each creates .venv and installs the pinned dependencies itself; later runs skip the install.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
DEMO_OUT ?= out/demo

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test lint lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

$(DEV_STAMP): requirements-dev.lock pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@ $(RUNTIME_STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/flashportrait batch examples/manifest.jsonl --out $(DEMO_OUT) --workers 2

# import-linter walks the package on disk; the editable install maps model/ → flashportrait.model through an
# import hook it cannot follow, so the contracts are checked against a real (non-editable) build of the package.
LINT_SITE := build/lint-site
lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	rm -rf $(LINT_SITE)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --target $(LINT_SITE) .
	cd $(LINT_SITE) && PYTHONPATH=. ../../$(BIN)/lint-imports --config ../../pyproject.toml

test: lint
	$(BIN)/python -m pytest

# Re-resolve the pins (needs PyPI): runtime set, then runtime + dev extras.
lock: | $(BIN)/python
	$(BIN)/python -m pip install -q --dry-run --ignore-installed --report /tmp/fp-lock-runtime.json -e .
	$(BIN)/python .ci/lock_from_report.py /tmp/fp-lock-runtime.json > requirements.lock
	$(BIN)/python -m pip install -q --dry-run --ignore-installed --report /tmp/fp-lock-dev.json -e '.[dev]'
	$(BIN)/python .ci/lock_from_report.py /tmp/fp-lock-dev.json > requirements-dev.lock

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info
