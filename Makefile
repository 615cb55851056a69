# Two commands on a fresh machine: `make demo` (set up, run the embedded platform with an example function)
# and `make test` (set up, run the tests). Everything else here is what those two need.

SHELL := /bin/bash
.DEFAULT_GOAL := demo
PYTHON ?= python3
# uv from PATH when present, else the one pip installs (python -m uv works without PATH changes).
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests use for real: Prometheus and promtool (cluster tests), Chromium (portal tests, driven
# by Playwright; no browser download), curl (the portal's copy-paste example is run as printed) and, when the
# machine has no PostgreSQL server binaries, postgresql (the store's PostgreSQL test).
APT_PACKAGES := prometheus chromium curl

.PHONY: demo test setup lite system-packages lint bench fuzz clean

demo: setup
	.venv/bin/paddlefn demo

test: setup system-packages
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	.venv/bin/pytest $(PYTEST_ARGS)

# The platform's own environment (.venv) and, beside it, the Paddle Lite one (.venv-lite, CPython 3.7:
# the only Paddle Lite build that converts conv models for x86 correctly; see DESIGN.md).
setup: .venv/.synced lite

.venv/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

lite:
	@if [ -x runtime/lite/setup.sh ]; then runtime/lite/setup.sh; fi

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
	.venv/bin/mypy

# Schemathesis against a running platform, seeded (tests/test_openapi.py): longer than the run in `make test`.
# Fails on any 5xx or any answer the OpenAPI document does not describe; the report lands in bench/out/fuzz.txt.
fuzz: setup
	@mkdir -p bench/out
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-100} FUZZ_MAX_TIME=$${FUZZ_MAX_TIME:-300} FUZZ_REPORT=bench/out/fuzz.txt \
		.venv/bin/pytest -q --timeout 0 tests/test_openapi.py -k fuzzer

bench: setup
	@echo "see bench/README.md"

clean:
	rm -rf .venv .venv-lite .paddlefn bench/out
