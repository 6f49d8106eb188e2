# ShopLens: every target sets up what it needs first (scripts/setup.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
SHOPLENS := $(VENV)/bin/shoplens

.PHONY: setup demo test test-fast lint bench eval clean

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

lint:
	$(VENV)/bin/ruff check .

eval: setup
	$(SHOPLENS) eval next-item --dataset amazon-games --protocol llmrank --candidates random --users 200 --ranker fused

clean:
	rm -rf var/indexes var/cache
