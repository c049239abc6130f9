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

# The lowest versions pyproject.toml declares (torch stays at the pin: older CPU wheels are not on these machines).
LOWEST     ?= numpy==1.24.4 tiktoken==0.12.0 regex==2023.3.22 matplotlib==3.7.0 tqdm==4.60.0 \
              pytest==8.0.0 hypothesis==6.100.0 pytest-timeout==2.2.0

.PHONY: install demo test test-all test-lowest bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,bench]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

# The lifecycle so far: the curriculum (chapter 2 data), pretraining on its shards, the shadowing (SFT),
# then the performance review (DPO), ending with ch4_dpo's before/after table.
demo: $(STAMP)
	$(PY) -m minilife.chapters.ch2_data
	$(PY) -m minilife.chapters.ch2_pretrain --overwrite
	$(PY) -m minilife.chapters.ch3_sft --overwrite
	$(PY) -m minilife.chapters.ch4_dpo --overwrite

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest

# Once per dependency change: the suite against the lowest declared versions, in its own venv.
test-lowest:
	$(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-lowest/bin/python -m pip install --quiet -e ".[dev]" "$(TORCH_SPEC)" $(LOWEST)
	HYPOTHESIS_PROFILE=ci .venv-lowest/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-lowest runs .pytest_cache .hypothesis
