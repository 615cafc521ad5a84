# The two set-up commands of the README. Each creates or refreshes .venv first.
#   make demo   the main job on the embedded default (CPU, 2 processes, local MLflow store)
#   make test   the default test suite (what .ci/run runs)

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsedist-installed
# A CPU-only machine gets this CPU build (no CUDA wheels); a machine with `nvidia-smi` gets
# PyPI's default CUDA build. A torch already in the environment is kept either way.
CPU_TORCH ?= torch==2.13.0

.PHONY: venv demo test

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install -q $$(command -v nvidia-smi >/dev/null && echo torch || echo "$(CPU_TORCH)")
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsedist demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest
