# Two entry points: `make demo` and `make test`. Both create .venv/ (Python 3.11) when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (boothkit needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The tested versions: pyproject.toml declares ranges, constraints.txt pins the exact set that is tested.
# torch is installed first (pinned by constraints.txt): an unpinned resolve would pull the CUDA wheels.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m boothkit.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_output
