# matxfer: the README's commands. Every target works on a fresh machine by itself.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned resolve pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# cueq: the cuequivariance compute path, tested on CPU through its torch fallback
	$(BIN)/pip install --quiet -e '.[dev,cueq]'
	# matbench 0.6 hard-pins ancient versions that do not build on Python 3.11.
	$(BIN)/pip install --quiet --no-deps matbench==0.6
	touch $(STAMP)

quickstart: install
	$(BIN)/matxfer tune tune_configs/quickstart.yaml $(QUICKSTART_ARGS)

test: install
	# two test files at a time: a study test mostly waits on Ray (xdist, whole files)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: install
	$(BIN)/python benchmarks/suite.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check matxfer tests

clean:
	rm -rf runs .pytest_cache
