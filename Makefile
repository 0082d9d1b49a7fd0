# Two commands on a fresh machine: `make demo` and `make test`. Each creates the project
# venv (.venv) and installs the pinned dependencies when they are missing or pyproject changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sskd-installed
export FIFTYONE_DO_NOT_TRACK := true
export MPLBACKEND := Agg

.PHONY: install demo test lab clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sskd run --preset demo --name demo

test: $(STAMP)
	-bash scripts/install_chromium.sh  # for the FiftyOne App test; it skips, saying why, without
	$(BIN)/python -m pytest -q -rs

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

clean-runs:
	rm -rf runs
