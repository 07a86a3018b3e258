# The README's commands. `make demo` trains the quick preset; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data/cifar10-jpeg.tar.gz)

export NO_ALBUMENTATIONS_UPDATE := 1
export GRADIO_ANALYTICS_ENABLED := False
ifneq ($(wildcard $(SHARED_DATA)),)
export CIFARKIT_DATA ?= $(SHARED_DATA)
endif

.PHONY: setup demo test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/cifarkit train --preset quick

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs
