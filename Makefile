# Every target does its own set-up: on a fresh clone `make demo` and `make test` create the
# virtual environment and install the pinned stack (constraints.txt) before they run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-full sanitize wheel-check demo bench gpu-check gpu-check-dry clean

# Two steps: the pinned stack first, then normkit itself without build isolation, so its C++
# kernels (normkit._C, setup.py) compile against the torch just installed (~1 min; without a
# compiler the install still succeeds and normkit runs torch's ops).
$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard src/normkit/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch setuptools ninja
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]" --no-build-isolation
	$(PY) -c "from normkit.backends import cpu; print('normkit: compiled CPU kernels (normkit._C):', 'built' if cpu.extension else 'NOT built, the reference composite (torch ops) runs instead: ' + str(cpu.unavailable_reason()))"
	touch $(STAMP)

install: $(STAMP)

# The suite on both cores (pytest-xdist), the ported peer matrices as a fixed sample
# (tests/conftest.py); test-full runs every case of them.
PYTEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-full: install
	NORMKIT_FULL_MATRIX=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The install a user does: an isolated build of the sdist and, from it, the wheel
# (python -m build; the build environment gets the pinned torch through PIP_CONSTRAINT), the
# wheel installed with plain pip into a fresh virtual environment, then .ci/install_smoke.py
# there (the compiled kernels load and match the reference). WHEEL_CHECK_SDIST=1 also installs
# the sdist into a second environment (a second compile).
DIST := dist
WHEEL_CHECK_SDIST ?= 0
wheel-check: install
	rm -rf $(DIST) .wheel-venv .sdist-venv
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m build --outdir $(DIST) .
	$(PYTHON) -m venv .wheel-venv
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt .wheel-venv/bin/python -m pip install --quiet $(DIST)/*.whl
	cd /tmp && $(CURDIR)/.wheel-venv/bin/python $(CURDIR)/.ci/install_smoke.py
	if [ "$(WHEEL_CHECK_SDIST)" = 1 ]; then \
	  $(PYTHON) -m venv .sdist-venv && \
	  PIP_CONSTRAINT=$(CURDIR)/constraints.txt .sdist-venv/bin/python -m pip install --quiet $(DIST)/*.tar.gz && \
	  cd /tmp && $(CURDIR)/.sdist-venv/bin/python $(CURDIR)/.ci/install_smoke.py; fi

# The compiled core under AddressSanitizer + UndefinedBehaviorSanitizer: normkit._C is built again
# with NORMKIT_SANITIZE=1 (setup.py's flags) from a copy of src/ in build/sanitize, so the normal
# build in src/normkit stays as it is, and the fuzz suite (tests/test_fuzz_native.py: every C++
# entry point with empty, odd, huge, NaN, strided, expanded, neg-bit and aliased arguments) runs
# against that copy, first on PYTHONPATH. ASan must be the first library loaded (LD_PRELOAD), with
# libstdc++ beside it: python does not link it, and ASan's throw interceptor needs it at start-up
# (else the first C++ exception aborts with "CHECK failed ... real___cxa_throw").
# Leak detection is off (CPython keeps its objects at exit by design); any UBSan finding stops
# the run with a stack. The copy keeps its objects between runs (ninja rebuilds what changed).
# FUZZ_EXAMPLES sets the examples per fuzz test (the plain test run uses a few). --capture=sys:
# a sanitizer report is written to fd 2 by the dying process, which pytest must not hold.
SANITIZE_DIR := build/sanitize
FUZZ_EXAMPLES ?= 500
SANITIZE_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONPATH=$(SANITIZE_DIR)/src

sanitize: install
	mkdir -p $(SANITIZE_DIR)
	tar -cf - --exclude='*.so' --exclude=__pycache__ src setup.py pyproject.toml | tar -xf - -C $(SANITIZE_DIR)
	cd $(SANITIZE_DIR) && NORMKIT_SANITIZE=1 MAX_JOBS=2 $(abspath $(PY)) setup.py -q build_ext --inplace
	$(SANITIZE_ENV) $(PY) -c "import normkit._C as c; assert '$(SANITIZE_DIR)/' in c.__file__, c.__file__; print('sanitized:', c.__file__)"
	$(SANITIZE_ENV) NORMKIT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider --capture=sys -m fuzz tests/test_fuzz_native.py $(PYTEST_ARGS)

# the lab's quick preset (= normkit demo): the pre-registered primary claims with tuned arms,
# 12-16 test seeds per arm plus tuning seeds, about 5-7 minutes on the 2-core machine;
# report in lab-report/
demo: install
	$(VENV)/bin/normkit lab --quick

bench: install
	$(VENV)/bin/normkit bench

# The Triton backend on a real GPU in under 5 minutes (benchmarks/gpu_check.py); without a CUDA
# device it says so in one line and exits 0. Liger-Kernel/QuACK (constraints-gpu.txt) are
# optional. Report: $(GPU_CHECK_OUT)/gpu-check.json and .md.
GPU_CHECK_OUT ?= gpu-check
gpu-check: install
	$(PY) benchmarks/gpu_check.py --install-optional --out $(GPU_CHECK_OUT)

# The same check on CPU through Triton's interpreter at tiny sizes (tests/test_gpu_check.py runs it too)
gpu-check-dry: install
	TRITON_INTERPRET=1 $(PY) benchmarks/gpu_check.py --dry --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build $(DIST) .wheel-venv .sdist-venv src/*.egg-info .pytest_cache src/normkit/*.so src/normkit/_C_build_info.py
