# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
#
#   PYTHON=python3.12 make demo     use this interpreter for .venv (default: the newest
#                                   python3.X >= 3.10 on PATH, else python3 if it is >= 3.10)
#   TORCH_INDEX=URL make install    where the CPU build of torch comes from on machines
#                                   without an NVIDIA GPU (machines with one keep pip's default);
#                                   probed once (TORCH_INDEX_PROBE_S seconds): when it does not answer,
#                                   torch comes from pip's own index configuration instead
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Newest first; `python3` last so a distribution default >= 3.10 also works.
PYTHON_CANDIDATES := python3.14 python3.13 python3.12 python3.11 python3.10 python3
PYTHON ?= $(shell for p in $(PYTHON_CANDIDATES); do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
	&& { echo $$p; break; }; done)
# PyTorch's CPU wheel index: a plain `pip install torch` on Linux pulls the multi-GB CUDA build.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_PROBE_S ?= 5
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

# `beat WHAT CMD...` runs CMD with a line every BEAT_S (5) s while it works: a quiet pip says nothing while it
# downloads, builds DeepSpeed or unpacks torch. (The sleeps write nowhere, so a pipe reading make's
# output closes when make ends.)
BEAT_S ?= 5
BEAT = beat() { what=$$1; shift; ( n=0; while sleep $(BEAT_S) </dev/null >/dev/null 2>&1; do n=$$((n + $(BEAT_S))); \
	echo "  ... $$what ($$n s)"; done ) & b=$$!; "$$@"; s=$$?; kill $$b 2>/dev/null; return $$s; }
# One request to the CPU index, answered or not within TORCH_INDEX_PROBE_S: pip would retry an
# unreachable index for a minute or more (its timeout and retries) before using another source.
PROBE_TORCH_INDEX = $(PY) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))' \
	"$(TORCH_INDEX)/torch/" $(TORCH_INDEX_PROBE_S) >/dev/null 2>&1

# One stamp per extra: the demo needs only the runtime, tests add `dev`, benchmarks add `bench`.
STAMP       := $(VENV)/.installed
STAMP_DEV   := $(VENV)/.installed-dev
STAMP_BENCH := $(VENV)/.installed-bench

.PHONY: install demo test test-all bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || test -n "$(PYTHON)" || { echo "error: no Python >= 3.10 found on PATH; run with PYTHON=/path/to/python3.X" >&2; exit 2; }
	@$(BEAT); test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; beat "creating $(VENV)" $(PYTHON) -m venv $(VENV); }
	@$(BEAT); echo "installing setuptools and wheel"; beat "installing setuptools and wheel" \
		$(PIP) install -q --upgrade "setuptools>=77" wheel
ifeq ($(HAS_GPU),)
	@$(BEAT); if $(PROBE_TORCH_INDEX); then \
		echo "no NVIDIA GPU found: installing the CPU build of torch from $(TORCH_INDEX)"; \
		beat "installing torch" $(PIP) install -q --index-url $(TORCH_INDEX) "$(TORCH_SPEC)"; \
	else \
		echo "no NVIDIA GPU found and $(TORCH_INDEX) did not answer within $(TORCH_INDEX_PROBE_S) s:" \
			"installing $(TORCH_SPEC) from pip's own index configuration (its CPU wheels where it has them)"; \
		beat "installing torch" $(PIP) install -q "$(TORCH_SPEC)"; \
	fi
	@$(BEAT); echo "installing $(TRITON_SPEC)"; beat "installing triton" $(PIP) install -q "$(TRITON_SPEC)"
endif
	@# DeepSpeed's build imports torch: build it against the torch installed above.
	@$(BEAT); echo "installing DeepSpeed (built against that torch)"; beat "installing DeepSpeed" \
		$(PIP) install -q --no-build-isolation "deepspeed>=0.14"
	@$(BEAT); echo "installing biglearn (pip install -e .)"; beat "installing biglearn" $(PIP) install -q -e .
	@touch $(STAMP)

$(STAMP_DEV): $(STAMP)
	@$(BEAT); echo "installing the test extras (pip install -e '.[dev]')"; beat "installing the test extras" \
		$(PIP) install -q -e '.[dev]'
	@touch $(STAMP_DEV)

$(STAMP_BENCH): $(STAMP)
	@$(BEAT); echo "installing the benchmark extras (pip install -e '.[bench]')"; \
		beat "installing the benchmark extras" $(PIP) install -q -e '.[bench]'
	@touch $(STAMP_BENCH)

demo: install
	$(PY) -m pretrain.experiments.demo

test: $(STAMP_DEV)
	$(PY) -m pytest -q

# Everything but GPU tests, then the GPU tests (they skip without CUDA; exit 5 = none collected).
test-all: $(STAMP_DEV)
	$(PY) -m pytest -q -m "not gpu"
	$(PY) -m pytest -q -m gpu || test $$? -eq 5

# Each script prints a table; docs/benchmarks.md records the figures with their commands.
bench: $(STAMP_BENCH)
ifeq ($(HAS_GPU),)
	$(PY) bench/attention.py --quick
else
	$(PY) bench/attention.py
endif
	$(PY) bench/throughput.py
	$(PY) bench/peers.py
	$(PY) bench/data.py
	$(PY) bench/groundtruth.py
	$(PY) bench/decode.py

# Kernel tests, attention kernels, peers and MFU on one GPU (~8 min), one summary table +
# gpu_check.json; without a GPU every part is skipped with the reason (docs/benchmarks.md).
gpu-check: $(STAMP_DEV) $(STAMP_BENCH)
	$(PY) bench/gpu_check.py --json gpu_check.json

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
