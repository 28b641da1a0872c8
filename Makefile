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

.PHONY: lab test unit notebooks install clean

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

notebooks: $(STAMP)
	env -u MPLBACKEND $(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg notebooks

test: $(STAMP)
	$(PY) -m pytest -q tests
	env -u MPLBACKEND $(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg notebooks

clean:
	rm -rf $(VENV)
