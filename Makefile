# megatron-prior: every target is idempotent; `make setup` reinstalls nothing when nothing changed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# make demo: the whole pipeline on CPU (about 15 min); QUICK=1 for the 3-minute version.
OUTPUT_DIR ?= demo_output
QUICK ?=
# make sweep: NTP vs PRIOR scaling-law grid on the demo's data.
SWEEP     ?= examples/sweeps/cpu_default.yaml
SWEEP_DIR ?= $(OUTPUT_DIR)/sweep

.PHONY: setup test demo sweep bench fuzz clean

setup: $(VENV)/.setup-done

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-done: | $(PY)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "setuptools>=64" wheel "pybind11>=2.12"
	touch $@

# Rebuilt only when the package metadata or the C++ sources change.
$(VENV)/.setup-done: $(VENV)/.torch-done setup.py pyproject.toml $(wildcard csrc/*.cpp)
	$(PIP) install -q --no-build-isolation -e ".[test]"
	$(PY) -c "import megatron_prior._packer as p; print('C++ packer built:', p.__file__)"
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m megatron_prior.demo.pipeline --output-dir $(OUTPUT_DIR) $(if $(filter 1 yes true,$(QUICK)),--quick,)

# The sweep trains on the demo's scored data (full size): its data stages run first, and are
# skipped in seconds when a full demo has already made them.
sweep: setup
	$(PY) -m megatron_prior.demo.pipeline --output-dir $(OUTPUT_DIR) --data-only
	DEMO_OUTPUT=$(OUTPUT_DIR) $(PY) examples/sweeps/run_sweep.py $(SWEEP) --output-dir $(SWEEP_DIR)

bench: setup
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# make fuzz: coverage-guided fuzzing (atheris) of every reader of untrusted files, FUZZ_SECONDS
# of fuzzing split over the targets (making seeds with the real writers and starting each target
# add 2-5 min); not part of make test. Exits 1, the inputs under build/fuzz/runs/, on a finding.
FUZZ_SECONDS ?= 600
fuzz: setup
	@$(PY) -c "import atheris" 2>/dev/null || $(PIP) install -q atheris
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)

clean:
	rm -rf build *.egg-info megatron_prior/_packer*.so
