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

.PHONY: lab test unit notebooks notebooks-other-cpu install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The lock is complete (every transitive package pinned), so install it with --no-deps:
# nothing unpinned sneaks in, and fschat's serving stack is not needed to import its templates.
$(STAMP): $(PY) requirements.lock pyproject.toml
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name mixtral-edu --display-name "Python (mixtral-edu)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

lab: $(STAMP)
	@echo "Starting JupyterLab on notebooks/ (the URL with its token is printed below)."
	$(VENV)/bin/jupyter lab --no-browser --port=$(PORT) --notebook-dir=notebooks $(ROOT_FLAG)

unit: $(STAMP)
	$(PY) -m pytest -q tests

# Notebooks run twice. First as a learner runs them. Then under another numeric environment, which changes
# floating-point rounding the way another CPU does (Intel vs AMD vs Apple kernels, 1 vs 2 threads) without
# changing any claim: MKL limited to its SSE4.2 kernels, ATen's generic ("default") CPU kernels instead of
# AVX2/AVX-512, one thread. A stored output that differs between the two passes prints float noise and
# fails here before it fails on a learner's laptop. (Measured on an AMD EPYC host: with the noisy outputs of
# notebooks 09 and 11 this pass changed exactly those two cells, and nothing else.)
NBVAL := env -u MPLBACKEND $(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg notebooks
OTHER_CPU := MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

notebooks: $(STAMP)
	$(NBVAL)

notebooks-other-cpu: $(STAMP)
	$(OTHER_CPU) $(NBVAL)

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(NBVAL)
	@echo "Notebooks again, under another numeric environment ($(OTHER_CPU)):"
	$(OTHER_CPU) $(NBVAL)

clean:
	rm -rf $(VENV)
