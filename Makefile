# Short targets for the usual work. Everything runs in a local virtual
# environment (.venv) that `make setup` creates from requirements.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CC_FILES := $(shell find tf_xent_ops bench tests/gpu tests/cpu -name '*.h' -o -name '*.cc' -o -name '*.cu')
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONPATH := $(CURDIR)/python

.PHONY: setup cuda-toolkit build wheel wheel-test test lint format demo demo-lm bench bench-linear bench-functors sanitize bazel-build bazel-wheel bazel-test clean

setup: $(VENV)/.requirements-installed

$(VENV)/.requirements-installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

# A CUDA toolkit from PyPI in .venv, for `make cuda-toolkit build` where no
# toolkit is installed (setup.py looks there after CUDA_HOME and PATH).
cuda-toolkit: setup
	$(PY) -m pip install -r requirements-cuda.txt

# Compiles the op library and the CPU levels' libraries in place
# (python/tf_xent_ops/_xent_ops.so, _xent_cpu_<level>.so). TFXENT_CPU_LEVELS=native
# builds for this machine's instruction set alone.
build: setup
	$(PY) setup.py -q build_ext --inplace

# A binary wheel in dist/: the portable CPU levels, and the GPU kernels where a
# CUDA toolkit is found; tagged for this platform and the TensorFlow series.
wheel: setup
	rm -rf dist
	$(PY) -m pip wheel --no-deps --no-build-isolation -q -w dist .
	ls dist/tf_xent_ops-*.whl

# The wheel installed into a fresh virtual environment, then the test suite
# run against that installation with no compiler on PATH.
wheel-test: wheel
	pip_package/test_wheel.sh dist/tf_xent_ops-*.whl build/wheel-test-venv $(PYTHON)

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

# A small causal LM trained plain and with tf_xent_ops.fuse_head: docs/lm_demo.png.
demo-lm: build
	$(PY) examples/lm_demo.py

bench: build
	$(PY) bench/bench_cpu.py

bench-linear: build
	$(PY) bench/bench_linear.py

# The CPU functors timed alone (no TensorFlow runtime): what the kernels cost.
FUNCTOR_SHAPES ?= 4096,1000 1024,32768
FUNCTOR_ARCH_FLAGS ?= -march=native -mno-avx512fp16
bench-functors: setup
	mkdir -p build
	$(CXX) -O3 $(FUNCTOR_ARCH_FLAGS) -I$(CURDIR) \
		$$($(PY) -c "import tensorflow as tf; print(' '.join(tf.sysconfig.get_compile_flags()))") \
		bench/functor_bench.cc tf_xent_ops/cc/kernels/xent_functor_cpu_*.cc \
		-o build/functor_bench -lpthread
	for shape in $(FUNCTOR_SHAPES); do build/functor_bench $$(echo $$shape | tr , ' '); done

# The op library built with AddressSanitizer and UndefinedBehaviorSanitizer
# into build/sanitize, and the test suite run against it with the sanitizer
# runtimes preloaded (Python itself is not instrumented, so leaks are not
# checked). Any report aborts the run.
SANITIZE_DIR := $(CURDIR)/build/sanitize
# GCC cannot constant-evaluate TensorFlow's bundled absl headers under UBSan's
# pointer-attribute checks, so those four are off; the rest of UBSan is on.
SANITIZE_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all \
	-fno-sanitize=vptr,null,nonnull-attribute,returns-nonnull-attribute \
	-fno-omit-frame-pointer -g
sanitize: setup
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	cp -r python/tf_xent_ops $(SANITIZE_DIR)/
	rm -f $(SANITIZE_DIR)/tf_xent_ops/*.so $(SANITIZE_DIR)/tf_xent_ops/_build_info.py
	TFXENT_EXTRA_CFLAGS="$(SANITIZE_FLAGS)" $(PY) setup.py -q build_ext --force \
		--build-lib $(SANITIZE_DIR) --build-temp $(CURDIR)/build/sanitize-objs
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	TFXENT_PACKAGE_DIR=$(SANITIZE_DIR) PYTHONPATH=$(SANITIZE_DIR) TFXENT_FUZZ_EXAMPLES=1000 \
	$(PY) -m pytest -o pythonpath=tests -o addopts="-ra -p no:cacheprovider" tests -m "not slow" \
		--deselect tests/test_install.py

# The second build path: Bazel (Debian's bazel-bootstrap 4.2.3 installs
# /usr/bin/bazel-4; bazelisk reads .bazelversion), offline; GPU kernels too
# where cuda_configure finds a toolkit.
BAZEL ?= $(shell command -v bazel-4 || command -v bazelisk || command -v bazel)
bazel-build: setup
	$(BAZEL) build --repo_env=PYTHON_BIN_PATH=$(CURDIR)/$(PY) \
		//tf_xent_ops:_xent_ops.so //tf_xent_ops:build_info //tf_xent_ops:cpu_levels_list

bazel-wheel: bazel-build
	rm -rf build/wheel
	pip_package/build_pip_package.sh build/wheel $(CURDIR)/$(PY)

# The Bazel wheel tested as wheel-test tests setup.py's.
bazel-test: bazel-wheel
	pip_package/test_wheel.sh build/wheel/tf_xent_ops-*.whl build/bazel-test-venv $(PYTHON)

clean:
	rm -rf build dist python/tf_xent_ops/_xent_ops.so python/tf_xent_ops/_xent_cpu_*.so \
		python/tf_xent_ops/_build_info.py
