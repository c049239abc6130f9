# minilife: the two commands of the README.
#   make demo   runs the main job on the embedded default world
#   make test   installs everything from nothing and runs the test suite
# Both bootstrap a local virtualenv (.venv) first. Override the torch pin with
#   make test TORCH_SPEC="torch==2.13.0"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.minilife-installed
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,bench]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

# The lifecycle so far: the curriculum (chapter 2 data), then pretraining on its shards.
demo: $(STAMP)
	$(PY) -m minilife.chapters.ch2_data
	$(PY) -m minilife.chapters.ch2_pretrain

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
