# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Each creates .venv/ with the pinned dependencies on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test lint venv
venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk, never the multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) training/train.py syn2real --demo

test: $(VENV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: $(VENV_STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
