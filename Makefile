# Two entry points, both safe on a fresh clone on a fresh machine:
#   make demo   set up .venv, then run the main job on the bundled MNIST
#   make test   set up .venv, then run the whole test suite
# make test-quick runs it without the tests marked slow (the end-to-end ones; CI runs them all)
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dropkit-installed

.PHONY: demo test test-quick wheel-check bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dropkit compare --p 0 0.5 --epochs 10 --out runs/demo

# worksteal: a worker that runs out of tests takes half of the other's queue, so that one long
# test does not end the run on a worker alone (tests/conftest.py also starts the slow ones first)
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist worksteal -q

test-quick: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist worksteal -q -m "not slow"

# builds the wheel and installs it into fresh virtual environments, outside the source tree
wheel-check: $(STAMP)
	$(BIN)/python tools/wheel_check.py

bench: $(STAMP)
	$(BIN)/dropkit bench kernels

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
