# Two commands on a fresh machine:
#   make demo   set everything up (venv, pinned torch, the build) and run the main job
#   make test   set everything up and run the tests (what CI runs)
#
# Other targets: setup, build, lint, cmake-check, bench, gpu-check, gpu-wheels, clean.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every .cu file is compiled whenever a CUDA toolkit is found, GPU or not.
export TORCH_CUDA_ARCH_LIST ?= 7.5;8.0;9.0+PTX
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=

.PHONY: setup build browser test unit-test lint cmake-check demo bench gpu-check gpu-wheels clean

$(VENV)/.deps-installed: requirements.txt requirements-oracle.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-oracle.txt
	touch $@

setup: $(VENV)/.deps-installed build browser

browser:
	bash tools/install_browser.sh

# Incremental: ninja recompiles only what changed.
build: $(VENV)/.deps-installed
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "from auditkit.ops import extension_status as s; st = s(); print('auditkit kernels:', st.reason, '| CUDA:', st.cuda_reason); raise SystemExit(0 if st.loaded else 1)"

unit-test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test: lint unit-test cmake-check

$(VENV)/.lint-installed: requirements-lint.txt $(VENV)/.deps-installed
	$(PY) -m pip install --quiet -r requirements-lint.txt
	touch $@

# Python by ruff (pyproject.toml [tool.ruff]), csrc/ by clang-format (.clang-format); both pinned.
lint: $(VENV)/.lint-installed
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/clang-format --dry-run --Werror $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

# Proves CMakeLists.txt configures and builds the same csrc/ sources against
# libtorch and that its C++ test passes (CPU kernels; setup.py compiles CUDA).
cmake-check: $(VENV)/.deps-installed
	bash tools/cmake_check.sh $(PY)

# The main job on real digits: train a shortcut model, audit, repair with TAP, audit again.
demo: setup
	$(VENV)/bin/auditkit doctor
	$(VENV)/bin/auditkit demo --out auditkit-demo --force

$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.deps-installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

bench: setup $(VENV)/.bench-installed
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name $(PYTEST_ARGS)

# The prepared GPU check (tools/gpu_check.py): build for this GPU, every CUDA test, the demo on
# the GPU, the GPU benchmarks, all figures to $OUT/gpu-results.md/.json (rewritten after every step,
# so a killed check keeps them). Without a GPU: one line, exit 0. The device call: README, "On a GPU machine".
gpu-check:
	bash tools/gpu_check.sh

# The wheels gpu-check installs on the GPU machine (no network there): fills .whl/, which the device
# call carries (carry=[".whl"]), and says how much of the call's 64 MiB the tree and wheels take.
gpu-wheels:
	bash tools/gpu_wheels.sh

clean:
	rm -rf build auditkit/_C*.so *.egg-info .pytest_cache .benchmarks
