# tf_lora: every set-up step, safe to repeat (each reuses what is already there).
#
#   make demo    set up, build, install the wheel into .venv and run the main example
#   make test    set up, lint, build, install the wheel, then `bazel test //...` and pytest over tests/
#   make wheel   leave the wheel in dist/
#   make format  ruff format (Python) and clang-format (C++, needs Debian's clang-format)
#
# Set-up: `make bootstrap` (Debian's bazel-bootstrap, g++ and googletest when missing, via sudo when not root),
# .venv with the pinned requirements.txt, and .cuda/ (tools/cuda_toolchain.py: the pinned CUDA 11.8 compiler
# the GPU kernels are built with, downloaded once). Builds use .bazelrc (offline, optimised) and .bazelrc.user
# (tools/configure.py); docs/building.md says why.

SHELL := /bin/bash
PYTHON ?= python3
BAZEL ?= bazel
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
DIST := $(CURDIR)/dist
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test lint format wheel install build configure deps bootstrap clean

demo: install
	$(PY) examples/digits_lora.py

test: lint install
	$(BAZEL) test //...
	TF_LORA_WHEEL_DIR=$(DIST) $(VENV)/bin/pytest tests

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: deps
	$(VENV)/bin/ruff format .
	clang-format -i core/*/*.cc core/*/*.h tests/gpu/*.cc
	clang-format -i --assume-filename=x.cc core/*/*.inc

# The wheel Bazel writes is tagged linux_x86_64; auditwheel checks that its libraries need nothing newer than
# the manylinux_2_27 policy allows (TensorFlow's own tag) and retags it. libtensorflow_framework.so.2 is
# TensorFlow's, loaded by TensorFlow before any op library: never copied into the wheel.
MANYLINUX := manylinux_2_27_x86_64

wheel: build
	rm -rf $(DIST)/tf_lora-*.whl $(DIST)/.linux
	bazel-bin/pip_package/build_pip_package $(DIST)/.linux
	PATH=$(VENV)/bin:$$PATH $(VENV)/bin/auditwheel repair --plat $(MANYLINUX) --only-plat \
	  --exclude libtensorflow_framework.so.2 -w $(DIST) $(DIST)/.linux/tf_lora-*.whl
	rm -rf $(DIST)/.linux

install: wheel
	$(PY) -m pip install --quiet --no-deps --force-reinstall $(DIST)/tf_lora-*.whl

build: configure
	$(BAZEL) build //...

configure: deps
	$(PY) tools/cuda_toolchain.py --python $(PY)
	$(PY) tools/configure.py --python $(PY)

deps: bootstrap $(VENV)/.requirements-installed

# The Debian packages the build needs and a fresh machine lacks, installed only when missing (as root, or
# through sudo): bazel-bootstrap (Bazel 4, which builds offline), g++ (the kernels' compiler) and googletest
# (the C++ tests' framework, built from its sources by Bazel: third_party/googletest).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

bootstrap:
	@command -v $(BAZEL) >/dev/null 2>&1 || { \
	  echo "make bootstrap: installing Debian's bazel-bootstrap (Bazel 4, builds offline): bazel is missing"; \
	  $(APT) update -qq && $(APT) install -y -qq bazel-bootstrap; }
	@command -v g++ >/dev/null 2>&1 || { \
	  echo "make bootstrap: installing Debian's g++ (compiles the kernels): g++ is missing"; \
	  $(APT) update -qq && $(APT) install -y -qq g++; }
	@test -f /usr/src/googletest/googletest/src/gtest-all.cc || { \
	  echo "make bootstrap: installing Debian's googletest (sources of the C++ tests' framework): missing"; \
	  $(APT) update -qq && $(APT) install -y -qq googletest; }

$(VENV)/.requirements-installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

clean:
	$(BAZEL) clean
	rm -rf $(DIST)
