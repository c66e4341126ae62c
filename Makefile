# The README's two commands. Both set everything up first (idempotent).
#   make run   – the default edit pipeline end to end, offline
#   make test  – the test suite
# Params overrides (the one mechanism, as `dvc exp run -S`): make run S='train.steps=4 search.max_evals=2'
# runs `taskvec run -S train.steps=4 -S search.max_evals=2` (params.yaml untouched, no DVC commit).
VENV ?= .venv
PY := $(VENV)/bin/python
# DVC stages run bin/python (the project interpreter); PATH is set for the other tools
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: setup run test bench paper repro clean

setup: $(VENV)/.installed

# the C kernel is compiled by the editable install: a changed source re-runs it
$(VENV)/.installed: pyproject.toml $(wildcard taskvec/_kernels.c)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[pipeline,test]'
	touch $@

S ?=

run: setup
	$(VENV)/bin/taskvec run $(addprefix -S ,$(S))

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_overhead.py

paper: setup
	$(VENV)/bin/taskvec benchmark --paper-json benchmarks/results/paper.json $(addprefix -S ,$(S))

repro: setup
	$(VENV)/bin/dvc repro

clean:
	rm -rf outputs mlruns mlartifacts mlflow.db
