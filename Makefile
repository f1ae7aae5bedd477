# apr_localizer developer entry points. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Venv location (used by the scripts too) and extra pytest arguments, e.g. make test PYTEST_ARGS="-k geometry -x".
VENV ?= .venv
PYTEST_ARGS ?=
export VENV

.PHONY: help venv tf2_msgs lint test demo clean

help: ## Show this help.
	@echo "apr_localizer make targets:"
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "Variables: VENV=$(VENV)  PYTEST_ARGS=<args passed to pytest>  PYTHON=<interpreter for a new venv>"

venv: ## Create/update the venv: requirements.txt, tf2_msgs (built locally), editable apr_localizer. No-op when current.
	@scripts/setup_venv.sh

tf2_msgs: venv ## Force a rebuild of tf2_msgs into the venv.
	@scripts/build_tf2_msgs.sh --force

lint: venv ## ruff check of the whole tree (the ament flake8 + pep257 equivalent).
	$(VENV)/bin/ruff check .

test: venv ## ruff check, then pytest with the ROS test environment (scripts/run_tests.sh).
	$(VENV)/bin/ruff check .
	scripts/run_tests.sh $(PYTEST_ARGS)

demo: ## Render a synthetic test bag, run the node live on it with the bundled model, print accuracy/latency.
	@scripts/demo.sh

clean: ## Remove the venv and build/test caches.
	rm -rf -- "$(VENV)" build install log .pytest_cache .ruff_cache .hypothesis demo_out
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf -- {} +
