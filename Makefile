# Entry points. Every target creates and uses the virtual environment in .venv.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Images for `make run`'s demo are served from here; the service may fetch from it.
DEMO_ORIGIN := 127.0.0.1:8090
# The try-a-photo page (python -m category_suggester web); it serves its uploads to the service too.
WEB_ORIGIN := 127.0.0.1:8080

.PHONY: help install system-deps stack stack-down run test unit lint format train-demo bench bench-soak chaos fuzz clean

help:
	@echo "make run         start the local stack (Kafka, Triton), the service and the try-a-photo page"
	@echo "make test        install what is missing and run lint and the whole test suite"
	@echo "make stack       start the local stack in the background; make stack-down stops and wipes it"
	@echo "make train-demo  fine-tune EfficientNet-Lite0 on the committed real photos and serve it"
	@echo "make bench       benchmark the service against a naive consumer and Triton's ceiling"

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[stack,training,dev]'
	touch $@

install: $(INSTALLED) system-deps

# Debian packages the tests need: prometheus and promtool (alert rules, dashboard queries),
# docker-compose (validates docker-compose.yml; no engine is needed for `config`), chromium
# and chromedriver (the browser test of the try-a-photo page).
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
system-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
	  && command -v docker-compose >/dev/null \
	  && command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian packages prometheus docker-compose chromium chromium-driver"; \
	  apt-get update -qq \
	  && $(APT_INSTALL) prometheus docker-compose chromium chromium-driver >/dev/null; }
	@command -v java >/dev/null && command -v mvn >/dev/null || { \
	  echo "installing Java 17 and Maven"; \
	  apt-get update -qq && $(APT_INSTALL) openjdk-17-jre-headless maven >/dev/null; }

stack: install
	$(PY) -m devstack up

stack-down:
	test -x $(PY) && $(PY) -m devstack down || rm -rf .stack

# The try-a-photo page runs in the background beside the service and prints its URL.
# Ctrl-C reaches both (each stops on SIGINT); when the service exits on its own, the EXIT
# trap stops the page.
run: install
	$(PY) -m devstack up
	export SUGGESTER_FETCH__ALLOWED_HOSTS=$(DEMO_ORIGIN),$(WEB_ORIGIN) \
	  SUGGESTER_WEB__PORT=$(lastword $(subst :, ,$(WEB_ORIGIN))); \
	$(PY) -m category_suggester web & web=$$!; \
	trap 'kill $$web 2>/dev/null || true; wait $$web || true' EXIT; \
	$(PY) -m category_suggester run

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint
	$(PY) -m pytest -m "not chaos"
	$(PY) -m fuzz --seconds 20

# Long runs: fault injection under load (ledger totals per fault) and the fuzzers.
FUZZ_SECONDS ?= 600
chaos: install
	$(PY) -m pytest -m chaos -s

fuzz: install
	$(PY) -m fuzz --seconds $(FUZZ_SECONDS)

unit: $(INSTALLED)
	$(PY) -m pytest tests/unit

# The committed real photos (training/photos) -> prepare -> fine-tune EfficientNet-Lite0 from
# its ImageNet weights, backbone frozen but its last stage, 3 epochs at 224 px on the CPU ->
# evaluate on the held-out 30% -> export a new version into model_repository/{cpu,gpu}; a
# running Triton (make stack) picks it up.
train-demo: install
	$(PY) -m training demo --out runs/demo

# The benchmark starts its own Kafka and Triton on free ports (~10 min; needs a quiet machine).
bench: install
	$(PY) -m bench

bench-soak: install
	$(PY) -m bench --phases service,soak --soak-minutes 10

clean: stack-down
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
