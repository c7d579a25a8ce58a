# jaxdiff: one command to set up and run the demo, one to set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-newest lock lint format docs docs-serve notebooks bench clean

setup: $(VENV)/.installed

# the tested versions: constraints.txt pins every dependency CI installs
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,docs]" -c constraints.txt
	touch $@

# the newest release of every dependency, in a separate environment: the deprecation test and
# the fast unit tests (run before updating constraints.txt with `make lock`)
test-newest:
	python3 -m venv .venv-newest
	.venv-newest/bin/python -m pip install -q --upgrade pip
	.venv-newest/bin/python -m pip install -q --upgrade -e ".[dev]"
	.venv-newest/bin/python -m pytest -q -p no:cacheprovider tests/test_warnings.py tests/test_schedules.py tests/test_parametrize.py tests/test_losses.py

lock: setup
	( echo "# The exact versions CI installs and tests (make setup: pip install -c constraints.txt)."; \
	  echo "# Regenerate after an upgrade with 'make lock'; 'make test-newest' checks the newest releases."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v "^jaxdiff" ) > constraints.txt

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
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)
	$(PY) -m pytest -q -n 2 --nbmake --nbmake-timeout=600 -p no:cacheprovider -o addopts="" notebooks
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
	rm -rf $(VENV) .venv-newest site .pytest_cache .ruff_cache samples.png
