# noisygrpo_jax: every target sets up its own environment from requirements.txt when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?=
ARGS ?=
PYTEST_ARGS ?=
SWEEP_LEVELS ?= (0.,.2,.4,.6) (0.,.3,.6,.9) (0.,.5,.8,1.)

.PHONY: setup test test-all train sft compare sweep-noise bench bench-forward bench-generate bench-train bench-processing bench-gpu clean

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

# Without CONFIG: the embedded default (SFT warm start, NoisyGRPO, evaluation, plots, summary).
# With CONFIG: one RL run of that config, e.g. make train CONFIG=configs/grpo.py:tiny ARGS=--config.train.steps=10
train: $(STAMP)
ifeq ($(CONFIG),)
	$(PY) experiments/default_run.py $(ARGS)
else
	$(PY) experiments/train.py --config=$(CONFIG) $(ARGS)
endif

sft: $(STAMP)
	$(PY) experiments/sft.py --config=$(or $(CONFIG),configs/sft.py:tiny) $(ARGS)

# GRPO vs NoisyGRPO vs noise without the Bayesian advantage, 3 seeds each, from one warm start.
compare: $(STAMP)
	$(PY) experiments/default_run.py --methods=noisygrpo,grpo,noise_only --seeds=0,1,2 --out=results/compare $(ARGS)

# A sweep is a loop over config overrides: here the noise grid.
sweep-noise: $(STAMP)
	for levels in $(SWEEP_LEVELS); do \
	  $(PY) experiments/train.py --config=$(or $(CONFIG),configs/noisygrpo.py:tiny) \
	    --config.rl.noise.levels="$$levels" --config.train.workdir="workdir/sweep_noise/$$levels" $(ARGS) || exit 1; \
	done

bench-forward: $(STAMP)
	$(PY) experiments/bench/bench_forward.py --markdown BENCHMARKS.md $(ARGS)

bench-generate: $(STAMP)
	$(PY) experiments/bench/bench_generate.py --markdown BENCHMARKS.md $(ARGS)

bench-train: $(STAMP)
	$(PY) experiments/bench/bench_train.py --markdown BENCHMARKS.md $(ARGS)

bench-processing: $(STAMP)
	$(PY) experiments/bench/bench_processing.py $(ARGS)

# Full Qwen2.5-VL-3B shape, random bf16 weights, on one GPU: decode tokens/s and % of the HBM roofline.
bench-gpu: $(STAMP)
	$(PY) experiments/bench/bench_generate.py --gpu $(ARGS)

bench: bench-forward bench-generate bench-train bench-processing

clean:
	rm -rf $(VENV)
