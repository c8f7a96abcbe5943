# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Each creates .venv/ with the pinned dependencies on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test lint venv mutation serve compare
venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build (the CUDA build is several GB).
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) training/train.py syn2real --demo

# RecycleLoRA vs SoMA: both demos, then the table into benchmarks/out/compare.{json,md} and
# RESULTS.md (COMPARE_ARGS=--reuse: read the existing demo runs instead of training).
compare: $(VENV_STAMP)
	$(PY) benchmarks/run_all.py --only compare --compare-args="$(COMPARE_ARGS)"

# The BentoML service over the newest export under exports/ (RECYCLELORA_EXPORT to choose).
serve: $(VENV_STAMP)
	BENTOML_DO_NOT_TRACK=True .venv/bin/bentoml serve

test: $(VENV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: $(VENV_STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Mutation testing of the adapter core ([tool.mutmut] in pyproject.toml); by developers, not CI.
# One OpenMP thread: forked test runs with torch hang otherwise.
mutation: $(VENV_STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[mutation]"
	OMP_NUM_THREADS=1 $(PY) -m mutmut run
	$(PY) -m mutmut results
