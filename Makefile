# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# PyTorch is pinned here (an unpinned torch pulls a multi-GB CUDA build); pyproject.toml keeps a range.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Optional: a wheel index for torch, e.g. https://download.pytorch.org/whl/cpu for the CPU build elsewhere.
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst =,,$(subst <,,$(subst >,,$(TORCH))))

.PHONY: demo test test-fast lint docs setup clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test,real,peers,trainer,lightning,deepspeed,lora,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/gcbench sweep quick --fresh

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

lint: $(STAMP)
	$(BIN)/ruff check gcbench tests experiments
	$(BIN)/ruff format --check gcbench tests experiments
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/python -c 'from pathlib import Path; from gcbench.experiment.schema import with_key_table as t; \
	p = Path("docs/experiments.md"); p.write_text(t(p.read_text()))'

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
