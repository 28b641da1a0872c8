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
# JupyterLab's settings for this project (one kernel, no news pop-up) are copied into the venv: see jupyter/README.md.
$(STAMP): $(PY) requirements.lock pyproject.toml jupyter/jupyter_server_config.json jupyter/overrides.json
	@echo "[1/4] pip"
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	@echo "[2/4] the pinned packages of requirements.lock (about 1.6 GB in .venv, mostly PyTorch's CPU build)"
	$(PY) -m pip install --no-deps --progress-bar on -r requirements.lock
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

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(NBVAL)
	@echo "Notebooks again, under another numeric environment ($(OTHER_CPU)):"
	$(OTHER_CPU) $(NBVAL)

clean:
	rm -rf $(VENV)
