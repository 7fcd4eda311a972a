# Every target makes its own virtual environment and installs what it needs.
# On CPU-only machines the constraints file keeps pip from pulling a CUDA torch build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONSTRAINTS ?= constraints.txt

.PHONY: demo test test-fast test-e2e comfyui bench clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	@echo "== setting up $(VENV) (once): the CPU build of torch, then the pack with its test extras"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch
	@# setuptools explains every editable install of a remapped package (`.` -> `wanbench`) in a
	@# boxed notice; it is information, not a problem, so it is left out of the progress output.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[test]"
	@echo "== $(VENV) is ready"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/wanbench demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not e2e and not browser" tests

# ComfyUI 0.3.75 for the end-to-end tests, cached under .cache/comfyui (the e2e tests do this themselves).
comfyui: $(BIN)/.installed
	$(BIN)/python tests/e2e/provision.py

test-e2e: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m e2e tests/e2e

bench: $(BIN)/.installed
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .cache wanbench_out tiny_models
