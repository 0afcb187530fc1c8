# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := torch,tensorflow,sidecar,operator,dev
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint servers unit e2e bench testbed testbed-build testbed-down dev-cluster crds clean

$(INSTALLED): pyproject.toml constraints.txt hatch_build.py $(wildcard native/*.c native/blake3/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

demo: $(INSTALLED)
	$(PY) examples/demo.py

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m sluicegate_operator.crdgen --check

# The Kubernetes testbed (with its real node) and the S3 server are built from Go modules, and the image
# with buildah, once per machine (cached under ~/.cache by content), before pytest, so no test pays for a
# cold build inside its timeout.
servers: $(INSTALLED)
	@if command -v go >/dev/null; then \
		$(PY) -m tests.testbed build && $(PY) -c "from tests.s3server import build; build()" \
			&& $(PY) -m tests.testbed.image; \
	else echo "no Go toolchain: the e2e tests will be skipped (and fail under CI=true)"; fi

# pytest exits non-zero when it collects no test, so an empty run never passes.
test: lint servers
	$(PY) -m pytest

unit: $(INSTALLED)
	$(PY) -m pytest -m "not integration and not e2e"

BENCH ?=
bench: $(INSTALLED) servers
	$(PY) -m pip install -q -c constraints.txt -r bench/requirements.txt
	$(PY) -m pip install -q --no-deps -r bench/requirements-nodeps.txt
	$(PY) -m bench $(BENCH)

e2e: $(INSTALLED)
	$(PY) -m pytest tests/e2e -m e2e

# A Kubernetes control plane on loopback for interactive use (built from Go modules on first use).
testbed: $(INSTALLED)
	$(PY) -m tests.testbed up

testbed-build: $(INSTALLED)
	$(PY) -m tests.testbed build

testbed-down:
	$(PY) -m tests.testbed down

# The testbed plus the CRDs, the chart, the operator running locally, a loopback S3 server and a
# sample Dataset: what the README's Kubernetes quick start runs against.
dev-cluster: $(INSTALLED) servers
	$(PY) -m tests.testbed up
	$(PY) -m tests.operator.devcluster

# Regenerate crds/ (and the chart's copy) from the pydantic models.
crds: $(INSTALLED)
	$(PY) -m sluicegate_operator.crdgen

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
