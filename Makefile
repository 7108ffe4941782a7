# InferenceCenter: `make run` serves the default model, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
ifeq ($(CUDA),1)
export CMAKE_ARGS := -DGGML_CUDA=on
export FORCE_CMAKE := 1
endif

.PHONY: install run test lint format bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "from inferencecenter.daemon.config import default_model_path as p; print('model:', p())"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/inferencecenter serve $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

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
	$(VENV)/bin/inferencecenter bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache bench-results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
