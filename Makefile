# Short targets for the usual work. Everything runs in a local virtual
# environment (.venv) that `make setup` creates from requirements.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CC_FILES := $(shell find tf_xent_ops -name '*.h' -o -name '*.cc' -o -name '*.cu.cc')
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONPATH := $(CURDIR)/python

.PHONY: setup build test lint format demo bench clean

setup: $(VENV)/.requirements-installed

$(VENV)/.requirements-installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

# Compiles the op library in place (python/tf_xent_ops/_xent_ops.so).
build: setup
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CC_FILES)

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix --exit-zero .
	$(VENV)/bin/clang-format -i $(CC_FILES)

demo: build
	$(PY) examples/demo.py

bench: build
	$(PY) bench/bench_cpu.py

clean:
	rm -rf build python/tf_xent_ops/_xent_ops.so python/tf_xent_ops/_build_info.py
