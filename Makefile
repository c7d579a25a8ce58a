# jaxdiff: one command to set up and run the demo, one to set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint format docs docs-serve notebooks bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $@

demo: setup
	$(VENV)/bin/jaxdiff demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The default test run: lint, unit + end-to-end tests (not the slow ones), notebooks, docs.
test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(PY) -m pytest -q --nbmake --nbmake-timeout=600 -p no:cacheprovider -o addopts="" notebooks
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site

test-slow: setup
	$(PY) -m pytest -q -n 2 -m slow

notebooks: setup
	$(PY) -m pytest -q --nbmake --nbmake-timeout=600 -o addopts="" notebooks

docs: setup
	$(VENV)/bin/mkdocs build --strict

docs-serve: setup
	$(VENV)/bin/mkdocs serve

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/samplers.py
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/sde.py
	$(PY) benchmarks/guidance.py
	$(PY) benchmarks/rcgdm.py
	$(PY) benchmarks/gradient_guided.py
	$(PY) benchmarks/reward_finetune.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/digits.py
	$(PY) benchmarks/dit_gp.py

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache samples.png
