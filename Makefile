# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# CPU machines get the CPU build of torch; machines with an NVIDIA driver keep pip's default build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install demo test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "setuptools>=64" wheel
ifeq ($(HAS_GPU),)
	$(PIP) install -q torch==2.13.0 triton==3.6.0
endif
	# DeepSpeed's build imports torch: build it against the torch installed above.
	$(PIP) install -q --no-build-isolation "deepspeed>=0.14"
	$(PIP) install -q -e '.[dev,bench]'
	@touch $(STAMP)

demo: install
	$(PY) -m pretrain.demo

test: install
	$(PY) -m pytest -q

# Everything but GPU tests, then the GPU tests (they skip without CUDA; exit 5 = none collected).
test-all: install
	$(PY) -m pytest -q -m "not gpu"
	$(PY) -m pytest -q -m gpu || test $$? -eq 5

# Each script prints a table; docs/benchmarks.md records the figures with their commands.
bench: install
ifeq ($(HAS_GPU),)
	$(PY) bench/attention.py --quick
else
	$(PY) bench/attention.py
endif
	$(PY) bench/throughput.py
	$(PY) bench/peers.py
	$(PY) bench/data.py
	$(PY) bench/groundtruth.py

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
