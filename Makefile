# Everyday entry points. Each target that needs the environment runs
# scripts/setup first (idempotent, fast when nothing changed). Run as root.

VENV := .venv
RUFF := $(VENV)/bin/ruff

.PHONY: help setup test demo lint format ci deb clean

help:
	@echo "make setup   install Debian packages and the venv (.venv)"
	@echo "make test    set up, then run the test suite (= bash scripts/test)"
	@echo "make demo    set up, then run the end-to-end demo (= bash scripts/demo)"
	@echo "make lint    ruff check + ruff format --check"
	@echo "make format  ruff format + ruff check --fix"
	@echo "make ci      CI=true .ci/run in a fresh clone of HEAD (= bash scripts/ci-local)"
	@echo "make deb     build the Debian package into dist/ (= bash scripts/build-deb)"
	@echo "make clean   remove the venv and caches"

setup:
	bash scripts/setup

test:
	bash scripts/test

demo:
	bash scripts/demo

$(RUFF):
	bash scripts/setup

lint: $(RUFF)
	$(RUFF) check . && $(RUFF) format --check .

format: $(RUFF)
	$(RUFF) format . && $(RUFF) check --fix .

ci:
	bash scripts/ci-local

deb:
	bash scripts/build-deb

clean:
	rm -rf $(VENV) dist .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
