# Developer and CI entry points. `make test` is what CI runs (via .ci/run).

PYTHON ?= python3.11
VENV := .venv
# The demo command; adjust here when the demo changes.
DEMO_CMD ?= $(VENV)/bin/gatekeeper demo
# DICOM tools the tests use: DCMTK (storescu), dicom3tools (dciodvfy), Orthanc (a PACS to send to),
# openssl (self-signed certificates for the DICOM TLS test), libGL/GLib for OpenCV (rt-utils: RTSTRUCT contours),
# chromium (the worklist's browser test; Playwright cannot download a browser here), docker-compose
# (validates docker-compose.yml; needs no Docker engine), and PostgreSQL and Redis (the tests use the
# running servers on 127.0.0.1, or start throwaway ones from these binaries when nothing answers).
SYSTEM_PACKAGES := dcmtk orthanc dicom3tools openssl libgl1 libglib2.0-0 chromium docker-compose postgresql redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv system-deps lint test test-fast demo

venv: $(VENV)/.installed

# Re-installs only when pyproject.toml changed. torch==2.13.0 (the `train` extra) comes from the
# local wheel folder that pip's configuration points to; it takes a minute.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[train,test]'
	touch $@

# Installs the Debian packages only if one of their programs is missing. Installing orthanc may
# also start a system Orthanc service (ports 4242/8042); the tests start their own and do not use it.
system-deps:
	@if command -v storescu >/dev/null && command -v dciodvfy >/dev/null && command -v openssl >/dev/null && { command -v Orthanc || test -x /usr/sbin/Orthanc; } >/dev/null && \
		/sbin/ldconfig -p | grep -q 'libGL.so.1 ' && /sbin/ldconfig -p | grep -q 'libgthread-2.0.so.0 ' && \
		test -x /usr/bin/chromium && command -v docker-compose >/dev/null && \
		command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "system-deps: storescu, dciodvfy, openssl, Orthanc, libGL, GLib, chromium, docker-compose, PostgreSQL and Redis are installed"; \
	else \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

# Lint and types first: a finding fails the run before the (long) test suite starts.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: system-deps venv lint
	$(VENV)/bin/pytest

# The unit tier for the inner loop (under 3 minutes): no servers, no DICOM tools, no browser, no
# training; tests that use PostgreSQL or Redis are marked integration by tests/conftest.py.
test-fast: venv
	$(VENV)/bin/pytest -q -m "not integration and not slow"

demo: system-deps venv
	$(DEMO_CMD)
