# InferenceCenter: `make run` serves the default model, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
LLAMA_CPP_PYTHON := $(shell sed -n 's/^ *llama-cpp-python==\([0-9.]*\).*/\1/p' setup.cfg)
# llama.cpp's AMX kernels, compiled in by -march=native on a CPU with AMX, crash on batched
# decodes (llama.cpp issue 20824): llama-cpp-python and llama-server are built without them. (The
# engine also keeps a llama.cpp built with them, a wheel pip had cached, off those kernels.)
ifeq ($(shell uname -m),x86_64)
NO_AMX := -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8
endif
export CMAKE_ARGS := $(NO_AMX)
# CUDA=1 builds llama-cpp-python from source with CUDA, once per pinned version (the stamp);
# `rm $(VENV)/.cuda-*` builds it again.
ifeq ($(CUDA),1)
export CMAKE_ARGS := $(NO_AMX) -DGGML_CUDA=on
export FORCE_CMAKE := 1
CUDA_STAMP := $(VENV)/.cuda-llama-cpp-python-$(LLAMA_CPP_PYTHON)
endif

.PHONY: install run test lint format bench llama-server loadtest soak clean

$(STAMP): setup.cfg pyproject.toml | $(CUDA_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "from inferencecenter.actors.config import default_model_path as p; print('model:', p())"
	touch $(STAMP)

install: $(STAMP)

# pip would take llama-cpp-python==$(LLAMA_CPP_PYTHON) as already installed, or reuse its cached
# CPU wheel: force a fresh build from the sdist. Runs before $(STAMP), so a new venv builds once;
# --no-deps because $(STAMP) installs the dependencies.
$(CUDA_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install --force-reinstall --no-cache-dir --no-deps \
		--no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_PYTHON)
	touch $@

run: install
	$(VENV)/bin/inferencecenter serve $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

# Load and soak tests against a real daemon of their own (tests/load, docs/reliability.md): minutes
# of work, so not part of `make test`. `make loadtest ARGS="--clients 16 --infers 5"`.
SOAK_SECONDS ?= 600

loadtest: install
	$(PY) -m tests.load.loadtest $(ARGS)

soak: install
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m tests.load.soak $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# mypy needs the folders under their installed names: a tree of symlinks gives them.
	rm -rf build/typecheck && mkdir -p build/typecheck/inferencecenter
	for d in daemon actors protocol clients; do ln -s ../../../$$d build/typecheck/inferencecenter/$$d; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../setup.cfg \
		-p inferencecenter.protocol -p inferencecenter.clients -p inferencecenter.daemon -p inferencecenter.actors

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(VENV)/bin/inferencecenter bench $(ARGS)

# llama.cpp's own server, built from the llama.cpp vendored in the pinned llama-cpp-python sdist
# (the same sources the daemon runs on), for `make bench ARGS="--llama-server $(LLAMA_SERVER)"`.
LLAMA_SERVER_DIR := build/llama-server
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/bin/llama-server
LLAMA_SERVER_SRC := $(LLAMA_SERVER_DIR)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER): | $(STAMP)
	mkdir -p $(LLAMA_SERVER_DIR)/sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(LLAMA_SERVER_DIR)/sdist
	tar -xzf $(LLAMA_SERVER_DIR)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz \
		-C $(LLAMA_SERVER_DIR)/sdist
	cmake -S $(LLAMA_SERVER_SRC) -B $(LLAMA_SERVER_DIR) -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
		-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF $(NO_AMX)
	cmake --build $(LLAMA_SERVER_DIR) --target llama-server -j$$(nproc)
	$(LLAMA_SERVER) --version

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache bench-results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
