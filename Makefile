# One entry point: setup, run, lint, typecheck, test, bench.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.inferq-installed
PYTEST_ARGS ?=

.PHONY: setup run models test test-fast fuzz lint typecheck imports check bench bench-frontdoor schemas clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# CPU torch first (only the model export needs it), or pip pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[export,dev]"
	touch $(STAMP)

setup: $(STAMP)

models: setup
	$(BIN)/inferq models build

# The main job: broker, API, worker pool and a SQLite job store, embedded. Ctrl-C stops all.
# `make run PORT=8080` for another API port (taken default ports fall back to free ones)
run: models
	$(BIN)/inferq dev $(if $(PORT),--port $(PORT))

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# schemathesis over the OpenAPI document against a real API on PostgreSQL + Kafka, with a
# larger budget than the suite's (which `make test` also runs). FUZZ_EXAMPLES per operation.
FUZZ_EXAMPLES ?= 300
fuzz: setup
	INFERQ_FUZZ_MAX_EXAMPLES=$(FUZZ_EXAMPLES) INFERQ_FUZZ_TIMEOUT_S=1200 \
		$(BIN)/python -m pytest tests/test_fuzz_api.py -s $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# the layering contract in pyproject.toml ([tool.importlinter])
imports: setup
	$(BIN)/lint-imports

check: lint typecheck imports test

bench: models
	$(BIN)/python -m bench.run

# the front door against Celery, Dramatiq and raw ONNX Runtime, in one run;
# `make bench-frontdoor BENCH_ARGS="--quick --only submit,wait --store postgres"`
bench-frontdoor: models
	$(BIN)/python -m bench.frontdoor $(BENCH_ARGS)

schemas: setup
	$(BIN)/python -m schemas.export

clean:
	rm -rf $(VENV) .inferq .pytest_cache .mypy_cache .ruff_cache
