# noisygrpo_jax: every target sets up its own environment from requirements.txt when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/noisygrpo.py:tiny
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test test-all train bench bench-forward lint clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

train: $(STAMP)
	$(PY) experiments/train.py --config=$(CONFIG) $(ARGS)

bench-forward: $(STAMP)
	$(PY) experiments/bench/bench_forward.py $(ARGS)

bench: bench-forward

clean:
	rm -rf $(VENV)
