# The README's two set-up commands: `make demo` and `make test`. Both create .venv and install into it.
# TORCH_VERSION pins torch (a bare `torch` would pull the multi-GB CUDA build); override it, e.g.
#   make test TORCH_VERSION=2.5.1   or   make demo TORCH_SPEC="torch --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
# napari's Qt binding: PyQt6 (napari >= 0.7's default); e.g. make demo QT_SPEC=PySide6
QT_SPEC ?= PyQt6
BIN := $(VENV)/bin
DEMO_OUT ?= out/demo

.PHONY: install install-test demo napari test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68" wheel

# Core + napari plugin (what a user needs for the demo).
$(VENV)/.installed: $(BIN)/python pyproject.toml src/napari_memnet/napari.yaml
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[napari,distributed]" "$(QT_SPEC)"
	touch $@

# Plus the test tools (pytest, pytest-qt, pytest-xvfb, ruff, npe2, hypothesis).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/memnet models
	$(BIN)/python scripts/demo.py --output $(DEMO_OUT)

# The plugin in a napari window, with the sample open and both widgets docked (needs a display).
napari: install
	$(BIN)/python scripts/launch_napari.py

lint: install-test
	$(BIN)/ruff check .

# GUI tests need Xvfb and the Qt xcb libraries: installed here when possible, else one line names them.
test: install-test lint
	bash scripts/gui_test_deps.sh
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info out
