# apr_localizer developer entry points. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Venv location (used by the scripts too) and extra pytest arguments, e.g. make test PYTEST_ARGS="-k geometry -x".
VENV ?= .venv
PYTEST_ARGS ?=
export VENV

.PHONY: help venv tf2_msgs format lint typecheck test test-unit test-ros test-gpu demo clean

help: ## Show this help.
	@echo "apr_localizer make targets:"
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "Variables: VENV=$(VENV)  PYTEST_ARGS=<args passed to pytest>  PYTHON=<interpreter for a new venv>"

venv: ## Create/update the venv: requirements.txt, tf2_msgs (built locally), editable apr_localizer. No-op when current.
	@scripts/setup_venv.sh

tf2_msgs: venv ## Force a rebuild of tf2_msgs into the venv.
	@scripts/build_tf2_msgs.sh --force

format: venv ## Format the tree with ruff (and apply ruff's safe fixes).
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lint: venv ## ruff check (ament flake8 + pep257 rules, ROS import boundary, complexity) and ruff format --check.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv ## mypy on the runtime package apr_localizer (mypy.ini).
	$(VENV)/bin/mypy

test: lint typecheck ## lint + typecheck, then the whole pytest suite with the ROS test environment.
	scripts/run_tests.sh $(PYTEST_ARGS)

test-unit: venv ## The quick tier: every test that starts no ROS process and needs no GPU.
	scripts/run_tests.sh -m "not ros and not gpu" $(PYTEST_ARGS)

test-ros: venv ## The ROS tier: tests with real rclpy node processes (loopback-only network namespace).
	scripts/run_tests.sh -m "ros and not gpu" $(PYTEST_ARGS)

test-gpu: venv ## The GPU tier: CUDA torch, GPU preprocessing, TensorRT plumbing (skipped without CUDA).
	scripts/run_tests.sh -m gpu $(PYTEST_ARGS)

.PHONY: fuzz
FUZZ_OUT ?= build/fuzz
fuzz: venv ## Full hostile-input campaign (storms, floods, many hypothesis examples); report in FUZZ_OUT=build/fuzz.
	scripts/fuzz.sh $(FUZZ_OUT)

demo: ## Render a synthetic test bag, run the node live on it with the bundled model, print accuracy/latency.
	@scripts/demo.sh

clean: ## Remove the venv and build/test caches.
	rm -rf -- "$(VENV)" build install log .pytest_cache .ruff_cache .hypothesis demo_out
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf -- {} +
