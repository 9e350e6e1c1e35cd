# megatron-prior: every target is idempotent; `make setup` reinstalls nothing when nothing changed.
# Python 3.12, the version megatron-core 0.19 is tested on here: python3.12 on PATH when it runs
# (pyenv puts a shim for every installed version on PATH, which fails unless pyenv selects that
# version), else pyenv's own 3.12. `make setup PYTHON=/path/to/python3.12` overrides.
PYTHON ?= $(shell for p in python3.12 "$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { command -v "$$p"; break; }; \
	done)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch first, pinned to the tested version. On Python 3.12 the registry's torch==2.13.0 is its
# CUDA build (a ~530 MB wheel plus the nvidia-* libraries: most of the venv's ~5 GB); it runs on
# a CPU-only machine too, where torch.cuda.is_available() is False and the CPU shim applies.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# make demo: the whole pipeline on CPU (12.5 min alone on 2 cores); QUICK=1 for the 2.5-minute version.
OUTPUT_DIR ?= demo_output
QUICK ?=
# make sweep: NTP vs PRIOR scaling-law grid on the demo's data.
SWEEP     ?= examples/sweeps/cpu_default.yaml
SWEEP_DIR ?= $(OUTPUT_DIR)/sweep

# make noise-grid: each weighting against NTP at 0, 15 and 30 % wrong training captions (README:
# what it showed and its measured time).
NOISE_DIR  ?= $(OUTPUT_DIR)/noise_grid
NOISE_ARGS ?= --seed-offset 6 --archs hlvlm --other-losses mi rho1 cal
# make reference-grid: PRIOR (alpha 0.5) against NTP with PRIOR's reference at 1x32, 2x128 and 4x256
# (layers x width; README: what it showed and its measured time).
REFERENCE_DIR  ?= $(OUTPUT_DIR)/reference_grid
REFERENCE_ARGS ?= --seed-offset 6 --alphas 0.5

.PHONY: setup test demo sweep noise-grid reference-grid bench fuzz clean

setup: $(VENV)/.setup-done

# The stamp names the interpreter: a .venv of another Python (the 3.11 one that megatron-core
# 0.16 needed) is replaced, not reused.
$(VENV)/.python-3.12:
	@test -n "$(PYTHON)" || { echo "make setup: no Python 3.12 found (tried python3.12 on PATH and" \
	  "pyenv's versions/3.12*); install Python 3.12 or pass PYTHON=/path/to/python3.12" >&2; exit 1; }
	@"$(PYTHON)" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || { echo "make setup:" \
	  "PYTHON=$(PYTHON) is not a working Python 3.12 (megatron-core 0.19 is tested on 3.12)" >&2; exit 1; }
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then \
	  echo "make setup: $(VENV) is $$($(PY) --version 2>&1), not 3.12: rebuilding it"; rm -rf $(VENV); fi
	"$(PYTHON)" -m venv $(VENV)
	touch $@

$(VENV)/.torch-done: $(VENV)/.python-3.12
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

noise-grid: setup
	$(PY) -m megatron_prior.demo.noise_grid --output-dir $(NOISE_DIR) -- $(NOISE_ARGS)

reference-grid: setup
	$(PY) -m megatron_prior.demo.reference_grid --output-dir $(REFERENCE_DIR) -- $(REFERENCE_ARGS)

bench: setup
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# make fuzz: coverage-guided fuzzing (atheris) of every reader of untrusted files, FUZZ_SECONDS
# of fuzzing split over the targets (seeds from the real writers first, 1-2 min); not part of
# make test. Exits 1 with the inputs under build/fuzz/runs/ when something was found.
FUZZ_SECONDS ?= 600
fuzz: setup
	@$(PY) -c "import atheris" 2>/dev/null || $(PIP) install -q atheris
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)

clean:
	rm -rf build *.egg-info megatron_prior/_packer*.so
