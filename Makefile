# Tidegate: two set-up commands (make demo, make test); both create or reuse .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench scale images compose-smoke clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,postgres,aws]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tidegate demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m bench.run

# The documented 50,000-device run (docs/SCALING.md); minutes, not part of `make bench`.
scale: $(STAMP)
	$(PY) -m bench.fleet_scale --devices $(or $(DEVICES),50000)

# Every image compose.yaml runs, built with podman where no registry is reachable, then the
# compose file run on them and checked (docs/SCALING.md); needs root, podman, debootstrap and
# podman-compose; minutes, not part of `make test`.
images:
	deploy/container/build-local.sh

compose-smoke: $(STAMP)
	$(PY) deploy/container/smoke_local.py

clean:
	rm -rf .demo bench/results .pytest_cache .mypy_cache .ruff_cache
