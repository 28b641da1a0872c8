# Two commands for learners: `make lab` and `make test`. Both create .venv when it is missing.
# Notebooks run with matplotlib's inline backend (a forced MPLBACKEND such as Agg would drop the figures
# that nbval compares), hence `env -u MPLBACKEND`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8888
# JupyterLab refuses to run as root without --allow-root.
ROOT_FLAG := $(shell [ "$$(id -u)" = "0" ] && echo --allow-root)

.PHONY: lab test unit unit-other-cpu notebooks notebooks-other-cpu install lock lock-check preflight clean

# Which torch build (tools/install.py): auto = the CPU-only build on Linux without an NVIDIA GPU, PyPI's elsewhere;
# TORCH=pypi for PyPI's (on Linux the CUDA build), TORCH=cpu to insist on the CPU-only one.
TORCH ?= auto

# The lock and its tests are written for Python 3.11 (any 3.11.x): stop at once, in one line, on another.
$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { echo "error: mixtral-edu needs Python 3.11, and '$(PYTHON)' is $$($(PYTHON) --version 2>&1 || echo missing): install 3.11 (Debian/Ubuntu: apt-get install python3.11 python3.11-venv; macOS: brew install python@3.11) and run make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The lock pins every package for every platform (uv's universal resolution of requirements.in; `make lock`),
# so it is installed with --no-deps and then `pip check`ed: nothing unpinned sneaks in and nothing is missing.
# JupyterLab's settings for this project (one kernel, no news pop-up) are copied into the venv: see jupyter/README.md.
$(STAMP): $(PY) requirements.lock pyproject.toml tools/install.py jupyter/jupyter_server_config.json jupyter/overrides.json
	@echo "[1/4] pip"
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	@echo "[2/4] the pinned packages of requirements.lock for this platform (README: sizes and times per platform)"
	$(PY) tools/install.py --torch $(TORCH)
	@echo "[3/4] the mixtral_edu package itself, editable (changes to mixtral_edu/ apply without reinstalling)"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@echo "[4/4] the Jupyter kernel \"Python (mixtral-edu)\" and JupyterLab's settings"
	$(PY) -m ipykernel install --sys-prefix --name mixtral-edu --display-name "Python (mixtral-edu)" >/dev/null
	mkdir -p $(VENV)/etc/jupyter $(VENV)/share/jupyter/lab/settings
	cp jupyter/jupyter_server_config.json $(VENV)/etc/jupyter/
	cp jupyter/overrides.json $(VENV)/share/jupyter/lab/settings/
	touch $(STAMP)
	@echo "Installed. make lab starts JupyterLab; make test runs every test and notebook."

install: $(STAMP)

# Rooted at the repository (so the package's source, data/ and the README are one click away), notebook 00 open.
lab: $(STAMP)
	@echo "Starting JupyterLab on port $(PORT) with notebooks/00_overview.ipynb open: open the URL with its token printed below."
	@echo "Stop it with Ctrl-C (twice, or once and answer y). Another port: make lab PORT=8890."
	$(VENV)/bin/jupyter lab --no-browser --port=$(PORT) --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks/00_overview.ipynb $(ROOT_FLAG)

unit: $(STAMP)
	$(PY) -m pytest -q tests

# Re-resolve requirements.lock from requirements.in for every platform, keeping the current pins where they still
# fit (add --upgrade to move them). Needs PyPI.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile requirements.in --universal --python-version 3.11 --custom-compile-command "make lock" -o requirements.lock
	$(PY) tools/environment_yml.py

# Resolve the locked set as Linux x86-64/aarch64, macOS 14 on Apple silicon and Windows would, against PyPI with
# this machine's pip configuration ignored, and fail if any platform needs a package the lock lacks. Needs PyPI
# (about a minute on a cold cache), so it is not part of the offline `make test`; CI runs it.
lock-check: $(STAMP)
	$(PY) tools/check_lock.py

# make test's browser tests need Chromium: say so in the first second, not after ten minutes.
preflight:
	@$(PYTHON) tools/preflight.py

# Notebooks run twice. First as a learner runs them. Then under another numeric environment, which changes
# floating-point rounding the way another CPU does (Intel vs AMD vs Apple kernels, 1 vs 2 threads) without
# changing any claim: MKL limited to its SSE4.2 kernels, ATen's generic ("default") CPU kernels instead of
# AVX2/AVX-512, one thread. A stored output that differs between the two passes prints float noise and
# fails here before it fails on a learner's laptop. (Measured on an AMD EPYC host: with the noisy outputs of
# notebooks 09 and 11 this pass changed exactly those two cells, and nothing else.)
NBVAL := env -u MPLBACKEND $(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks
OTHER_CPU := MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

notebooks: $(STAMP)
	$(NBVAL)

notebooks-other-cpu: $(STAMP)
	$(OTHER_CPU) $(NBVAL)

# The unit tests run twice, like the notebooks: a result that depends on the CPU's rounding fails here first.
# Same idea as OTHER_CPU, with two differences the unit tests need because some of them compile with inductor:
# on x86-64 ATen's AVX2 kernels rather than its generic ones (inductor's generated C++ does not build under
# ATEN_CPU_CAPABILITY=default in torch 2.13), and a fresh inductor cache, so no kernel built for the first pass's
# instruction set is reused (a reused one gave wrong tokens in the compiled decoder, seen on an AMD EPYC).
UNIT_OTHER_CPU = MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=$(if $(filter x86_64 amd64,$(shell uname -m)),avx2,default) \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TORCHINDUCTOR_CACHE_DIR=$(abspath $(VENV))/inductor-other-cpu
unit-other-cpu: $(STAMP)
	rm -rf $(VENV)/inductor-other-cpu
	$(UNIT_OTHER_CPU) $(PY) -m pytest -q tests

test: preflight $(STAMP)
	$(PY) -m pytest -q tests
	@echo "Unit tests again, under another numeric environment:"
	$(MAKE) --no-print-directory unit-other-cpu
	$(NBVAL)
	@echo "Notebooks again, under another numeric environment ($(OTHER_CPU)):"
	$(OTHER_CPU) $(NBVAL)

clean:
	rm -rf $(VENV)
