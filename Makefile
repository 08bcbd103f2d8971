# Each target does its own set-up: a local virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override with TORCH=torch (CUDA build) on a GPU machine.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo demo-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples docs
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

# Stylizes an example photo with an example painting into out/ using real VGG19 weights
# (downloaded on first use into torch.hub's cache). DEMO_ARGS adds options, e.g.
# DEMO_ARGS="--weights random" to check the pipeline offline (not real style transfer).
demo: $(STAMP)
	$(PY) examples/demo.py $(DEMO_ARGS)

# Imports three real pretrained fast-style networks (lengstrom/fast-style-transfer) and applies them to
# an example photo: out/fast_demo.jpg, the picture in the README. Downloads them once if ../shared is absent.
demo-fast: $(STAMP)
	$(PY) examples/fast_demo.py

bench: $(STAMP)
	$(PY) bench/artistic.py
	$(PY) bench/photo.py
	$(PY) bench/fast.py

clean:
	rm -rf $(VENV) out
